"""One sequence being served: its tokens, how many of them have K/V in pages, and its page table."""

import enum
import time

from jaxpage.kv_shift import KVShift
from jaxpage.page_pool import PageKey
from jaxpage.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; holds no pages
    RUNNING = "running"  # admitted; holds pages for its computed (and this step's) tokens
    PREEMPTED = "preempted"  # pages taken back; waits at the queue's head to recompute its tokens
    SWAPPED = "swapped"  # pages copied to host memory; waits at the queue's head to copy them back
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len reached
    FINISHED_ABORTED = "abort"  # the caller gave up on it
    FINISHED_ERROR = "error"  # the device produced something unusable for it (non-finite logits)

    @property
    def is_finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
            RequestStatus.FINISHED_ERROR,
        )

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI-style reason ("stop", "length", "abort"), or "error"; None while unfinished."""
        return self.value if self.is_finished else None


class Request:
    """Mutable state of one request, owned by the scheduler once added.

    The K/V of the first `num_computed_tokens` tokens is in `page_ids`; the remaining tokens still have to
    run. A decoding request has exactly one such token: the one it sampled last step. With overlapped steps
    that token may still be on the device (`num_pending_tokens`): its value reaches `output_token_ids` one
    step late, while the next step already computes its K/V from the device's copy.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        *,
        fork_source: "Request | None" = None,
        extra_key=None,
        kv_shift: KVShift | None = None,
    ):
        """`fork_source`: a request with the same prompt whose pages this one shares when admitted after it
        (the samples of one prompt). `extra_key`: whatever else changes the K/V, part of its page keys.
        `kv_shift`: the prompt drops tokens from the middle of earlier ones, whose cached K/V it may move."""
        assert prompt_token_ids, "an empty prompt must be rejected before a Request is built"
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.output_token_ids: list[int] = []  # known on the host
        # Tokens sampled by steps still in flight, after `output_token_ids`; 0 between synchronous steps.
        self.num_pending_tokens = 0
        self.output_logprobs: list[float] = []
        # With sampling_params.logprobs = k: per output token, {token id: logprob} of the chosen token, then
        # the k most likely (the chosen one once), as vLLM reports them.
        self.output_top_logprobs: list[dict[int, float]] = []
        # With sampling_params.prompt_logprobs = k: per prompt position computed so far, the same for the
        # prompt token there; position 0 has nothing before it (None).
        self.prompt_logprobs: list[dict[int, float] | None] = (
            [None] if sampling_params.prompt_logprobs is not None else []
        )
        self.num_computed_tokens = 0
        self.page_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.cumulative_logprob = 0.0  # of the sampled tokens, whether or not logprobs were asked for
        self.fork_source = fork_source
        self.extra_key = extra_key
        self.page_keys: list[PageKey] = []  # prefix-cache keys of the leading full pages known so far
        self.num_registered_pages = 0  # leading pages already offered to the prefix cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache (or shared) at first admission
        self.num_swapped_pages = 0  # pages held in host swap space while SWAPPED
        # Prompt tokens whose K/V came from the tiers under the device pool at first admission, by tier.
        self.tier_hit_tokens = {"host": 0, "disk": 0}
        # Pages found in the tiers at this admission attempt, (page, key, tier, K/V): loaded before the step.
        self.loads: list[tuple] = []
        self.wanted_keys: list[PageKey] = []  # keys the tiers' look-ahead keeps for this queued request
        self.num_prefetched_keys = 0  # of those, how many the look-ahead has had in the pool (loaded ahead)
        self.kv_shift = kv_shift
        self.source_keys: list[PageKey] | None = None  # kv_shift's source pages' keys, once looked up
        # At an admission attempt with kv_shift: the source pages held (until the moves are dispatched), and
        # the token moves from them (`kv_shift.token_moves`).
        self.shift_sources: list[int] = []
        self.shift_moves = None
        self.num_shifted_tokens = 0  # prompt tokens moved from kv_shift's source at first admission
        # Monotonic timestamps for the metrics; None until the event happens.
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        """The tokens known on the host (pending ones excluded)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Every token of the request, pending ones included."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_sampled_tokens(self) -> int:
        """Output tokens, pending ones included: what length limits and min_tokens count."""
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens known on the host."""
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, pages={len(self.page_ids)})"
        )
