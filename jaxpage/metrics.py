"""Latency of one request, the state of the engine, and KV occupancy (host only: numpy, no jax)."""

import dataclasses
import itertools

import numpy as np

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
    # Of those, the tokens whose K/V came back from the tiers under the pool: {"host": n, "disk": m}.
    tier_hit_tokens: dict[str, int]
    # Of those, the tokens whose K/V was moved from a truncated conversation's earlier tokens (kv_shift).
    num_shifted_tokens: int
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
        tier_hit_tokens=dict(request.tier_hit_tokens),
        num_shifted_tokens=request.num_shifted_tokens,
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
    host_hit_tokens: int  # of the prefix hits, tokens whose K/V came back from the host tier
    disk_hit_tokens: int  # ... from the disk tier
    shifted_tokens: int  # of the prefix hits, tokens moved from a truncated conversation's K/V (kv_shift)
    num_host_pages: int  # pages held in the host tier now
    num_disk_pages: int  # ... in the disk tier
    # Look-ahead for queued requests: pages read from disk into host memory, and loaded from host memory into
    # free device pages, before their request was admitted.
    disk_prefetched_pages: int
    host_prefetched_pages: int
    # XLA compilations that steps ran after warm-up (each a stall): programs of page-copy sizes not seen yet,
    # or step programs warm-up left out (see EngineConfig.compile_after_warmup).
    num_compiles_after_warmup: int

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
            f"copy-on-write copies {self.num_copies}, evictions {self.num_evictions}, "
            f"tier hits host/disk {self.host_hit_tokens}/{self.disk_hit_tokens} tokens, "
            f"shifted {self.shifted_tokens} tokens, "
            f"prefetched from disk/host {self.disk_prefetched_pages}/{self.host_prefetched_pages} pages, "
            f"compilations after warm-up {self.num_compiles_after_warmup}"
        )


def kv_occupancy(running: list[Request], page_size: int) -> tuple[int, int]:
    """(page slots, tokens held) of the pages in the running requests' page tables, each page counted once
    however many requests share it (a common prefix is stored once).

    Summed over steps, (slots - tokens) / tokens is the KV waste. A benchmark counts it after every step
    inside its timed loop, so it is numpy over all pages at once: a Python loop per page took ~9 ms a step at
    256 rows of 40 pages on a CPU core, time that was charged to the engine."""
    lens = np.fromiter((len(r.page_ids) for r in running), np.int64, len(running))
    pages = np.fromiter(itertools.chain.from_iterable(r.page_ids for r in running), np.int64, int(lens.sum()))
    if not len(pages):
        return 0, 0
    computed = np.fromiter((r.num_computed_tokens for r in running), np.int64, len(running))
    index = np.arange(len(pages)) - np.repeat(np.cumsum(lens) - lens, lens)  # page's place in its table
    held = np.clip(np.repeat(computed, lens) - index * page_size, 0, page_size)
    order = np.lexsort((-held, pages))  # by page, the fullest holder first
    first = np.ones(len(pages), bool)
    first[1:] = pages[order][1:] != pages[order][:-1]
    return int(first.sum()) * page_size, int(held[order][first].sum())
