"""Latency of one request and the state of the engine, as plain dataclasses (host only, no jax)."""

import dataclasses

from jaxpage.request import Request


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    """Seconds, measured with a monotonic clock; None until the event has happened."""

    queue_time: float | None  # arrival -> first scheduled
    ttft: float | None  # arrival -> first output token (time to first token)
    tpot: float | None  # mean time per output token after the first (None below two tokens or unfinished)
    e2e_latency: float | None  # arrival -> finished
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int  # prompt tokens taken from the prefix cache or a sibling sample
    num_preemptions: int


def request_metrics(request: Request) -> RequestMetrics:
    def since(start, end):
        return None if start is None or end is None else end - start

    tpot = None
    if request.finished_time is not None and request.first_token_time is not None:
        if request.num_output_tokens > 1:
            tpot = (request.finished_time - request.first_token_time) / (request.num_output_tokens - 1)
    return RequestMetrics(
        queue_time=since(request.arrival_time, request.first_scheduled_time),
        ttft=since(request.arrival_time, request.first_token_time),
        tpot=tpot,
        e2e_latency=since(request.arrival_time, request.finished_time),
        num_prompt_tokens=request.num_prompt_tokens,
        num_output_tokens=request.num_output_tokens,
        num_cached_tokens=request.num_cached_tokens,
        num_preemptions=request.num_preemptions,
    )


@dataclasses.dataclass(frozen=True)
class EngineMetrics:
    """Counters since the engine started, and the pool as it is now."""

    num_steps: int
    kv_usage: float  # fraction of the usable pages held by requests now
    peak_kv_usage: float  # the most of it any step has used
    num_cached_pages: int  # pages holding a prefix-cache entry (held or free but revivable)
    prefix_query_tokens: int  # prompt tokens of admitted requests
    prefix_hit_tokens: int  # of those, taken from the prefix cache or a sibling sample
    num_preemptions: int  # recompute and swap
    num_swap_outs: int
    num_swap_ins: int
    num_copies: int  # copy-on-write page copies
    num_evictions: int  # prefix-cache entries dropped when their free page was reallocated

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    def summary(self) -> str:
        """One line for a log or the end of a CLI run."""
        return (
            f"steps {self.num_steps}, peak KV usage {self.peak_kv_usage:.1%} (now {self.kv_usage:.1%}), "
            "prefix-cache hit rate "
            f"{self.prefix_cache_hit_rate:.1%} ({self.prefix_hit_tokens}/{self.prefix_query_tokens} tokens), "
            f"preemptions {self.num_preemptions}, swaps out/in {self.num_swap_outs}/{self.num_swap_ins}, "
            f"copy-on-write copies {self.num_copies}, evictions {self.num_evictions}"
        )
