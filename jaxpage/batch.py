"""Packs one scheduled step into padded numpy arrays of a bucketed shape (docs/architecture.md, step inputs).

Host only: the runner moves the arrays to the device and picks the compiled program of the bucket. Padding
follows the null-page rule: padded tokens are token 0 at position 0 writing slot 0 (page 0), padded rows own
no tokens, see nothing (`kv_len` 0) and point at page 0; their samples are discarded.
"""

import bisect
import dataclasses
import itertools
import zlib
from typing import NamedTuple

import numpy as np

from jaxpage.scheduler import SchedulerOutput

# Columns of a row's banned token ids: the most EOS plus stop token ids a request with min_tokens may have.
MAX_BANNED_TOKENS = 16
# Fills the unused columns: an id past every vocabulary, which the sampler's scatter drops.
NO_TOKEN = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    """The static shape of one compiled step."""

    num_tokens: int  # T: flat new tokens of all rows
    num_rows: int  # B: requests
    pages_per_row: int  # P: columns of the page table


class StepInputs(NamedTuple):
    """One step's device inputs; row b belongs to `SchedulerOutput.scheduled[b]`."""

    token_ids: np.ndarray  # i32[T]
    positions: np.ndarray  # i32[T]
    slot_mapping: np.ndarray  # i32[T]
    cu_q_lens: np.ndarray  # i32[B + 1]
    kv_lens: np.ndarray  # i32[B]
    page_table: np.ndarray  # i32[B, P]
    logits_indices: np.ndarray  # i32[B]
    temperature: np.ndarray  # f32[B]; 0 = greedy (padded rows too)
    top_k: np.ndarray  # i32[B]; 0 = off
    top_p: np.ndarray  # f32[B]
    seeds: np.ndarray  # u32[B]
    sample_positions: np.ndarray  # i32[B]: position of the token sampled for the row
    min_p: np.ndarray  # f32[B]; 0 = off
    # i32[B, MAX_BANNED_TOKENS]: ids a sampled row may not draw (its EOS and stop token ids until it has
    # min_tokens outputs); NO_TOKEN elsewhere.
    banned_token_ids: np.ndarray
    repetition_penalty: np.ndarray  # f32[B]; 1 = off
    presence_penalty: np.ndarray  # f32[B]; 0 = off
    frequency_penalty: np.ndarray  # f32[B]; 0 = off
    # i32[B, H]: prompt then output tokens of each sampled row with penalties. H is the bucket's
    # P * page_size when some row has them (every row's tokens fit its pages), else 0: no penalty program.
    history: np.ndarray
    history_prompt_lens: np.ndarray  # i32[B]: leading entries of `history` that are prompt tokens
    history_lens: np.ndarray  # i32[B]: entries of `history` that are tokens; 0 for rows without penalties
    # i32[T] when some row needs prompt logprobs (then the step computes logits at every token), else i32[0]:
    # for each token of such a row, the prompt token that follows it (0 where none does).
    prompt_logprob_targets: np.ndarray
    # i32[T]: for a token still pending on the device (sampled by the step in flight, see
    # `Request.num_pending_tokens`), the row of that step that sampled it, whose device copy the forward
    # pass takes instead of `token_ids`; -1 for tokens known on the host.
    source_rows: np.ndarray
    # Whether some row reports top logprobs or runs a beam search: only then does the sampler find the
    # `max_logprobs` likeliest tokens of every row (a vocabulary top-k: ~10 ms a CPU step at 64 rows).
    wants_top_logprobs: bool = False

    @property
    def bucket(self) -> Bucket:
        return Bucket(len(self.token_ids), len(self.kv_lens), self.page_table.shape[1])

    @property
    def all_greedy(self) -> bool:
        return not bool(np.any(self.temperature > 0))

    @property
    def has_penalties(self) -> bool:
        return self.history.shape[1] > 0

    @property
    def wants_prompt_logprobs(self) -> bool:
        return len(self.prompt_logprob_targets) > 0

    @property
    def decode_only(self) -> bool:
        """Row b's only token is token b (padded rows at the end own none): the step can take the decode
        kernel."""
        rows = np.arange(len(self.cu_q_lens))
        return bool(np.array_equal(self.cu_q_lens, np.minimum(rows, self.cu_q_lens[-1])))


class BucketGrid:
    """Every (T, B, P) combination of the configured sizes in which each row can own a token (B <= T)."""

    def __init__(
        self, token_buckets: tuple[int, ...], seq_buckets: tuple[int, ...], page_buckets: tuple[int, ...]
    ):
        for name, sizes in (("token", token_buckets), ("seq", seq_buckets), ("page", page_buckets)):
            assert sizes and list(sizes) == sorted(set(sizes)) and sizes[0] > 0, f"bad {name} buckets {sizes}"
        self.token_buckets = tuple(token_buckets)
        # A step never has more rows than tokens, so row counts above the largest token bucket are capped.
        self.seq_buckets = tuple(sorted({min(b, token_buckets[-1]) for b in seq_buckets}))
        self.page_buckets = tuple(page_buckets)

    @property
    def buckets(self) -> list[Bucket]:
        sizes = itertools.product(self.token_buckets, self.seq_buckets, self.page_buckets)
        return [Bucket(t, b, p) for t, b, p in sizes if b <= t]

    @property
    def decode_buckets(self) -> list[Bucket]:
        """The buckets `select` picks for steps of one token per row."""
        return sorted({self.select(b, b, p) for b in self.seq_buckets for p in self.page_buckets})

    def select(self, num_tokens: int, num_rows: int, max_pages: int) -> Bucket:
        """The smallest bucket holding a step of this size. Raises ValueError if none does."""
        b = _smallest_at_least(self.seq_buckets, num_rows, "num_rows")
        t = _smallest_at_least(self.token_buckets, max(num_tokens, b), "num_tokens")
        p = _smallest_at_least(self.page_buckets, max_pages, "max_pages")
        return Bucket(t, b, p)


def _smallest_at_least(sizes: tuple[int, ...], value: int, name: str) -> int:
    i = bisect.bisect_left(sizes, value)
    if i == len(sizes):
        raise ValueError(f"{name} {value} exceeds the largest bucket {sizes[-1]}")
    return sizes[i]


def step_size(output: SchedulerOutput) -> tuple[int, int, int]:
    """(num_tokens, num_rows, max_pages) of a scheduled step, what `BucketGrid.select` takes."""
    scheduled = output.scheduled
    max_pages = max((len(item.request.page_ids) for item in scheduled), default=0)
    return output.num_scheduled_tokens, len(scheduled), max(max_pages, 1)


def request_seed(request) -> int:
    """The seed of a request's sampling key: its own, else one fixed by its id (the same in every run)."""
    seed = request.sampling_params.seed
    return seed if seed is not None else zlib.crc32(request.request_id.encode())


def min_tokens_bans(eos_token_ids, params) -> list[int]:
    """The ids vLLM's min_tokens holds back: EOS (even under ignore_eos, which only keeps EOS from stopping
    a request) and the stop token ids."""
    return sorted(set(eos_token_ids) | set(params.stop_token_ids))


def banned_token_ids(request) -> list[int]:
    """What the request may not draw next: `min_tokens_bans` while it has fewer than min_tokens outputs."""
    if request.num_sampled_tokens >= request.sampling_params.min_tokens:
        return []
    return min_tokens_bans(request.eos_token_ids, request.sampling_params)


def uses_penalties(params) -> bool:
    return params.repetition_penalty != 1 or params.presence_penalty != 0 or params.frequency_penalty != 0


def prompt_logprob_positions(request, first: int, end: int) -> range:
    """Positions of the step's tokens `first:end` of a request whose logits give a prompt logprob not yet
    recorded in `request.prompt_logprobs` (the logits at position q give the logprob of prompt token q + 1).
    Chunks are contiguous and a prefix-cache hit never covers unrecorded tokens, so there is no gap."""
    start = len(request.prompt_logprobs) - 1  # recorded: positions 0 .. start (0 is None)
    if not 0 <= start < request.num_prompt_tokens - 1:
        return range(0)  # not asked for, or all recorded
    assert first <= start, (request, first, start)
    return range(start, min(end, request.num_prompt_tokens - 1))


def padding_inputs(bucket: Bucket, history_width: int = 0, prompt_logprobs: bool = False) -> StepInputs:
    """Step inputs of the bucket's shape holding only padding: the arrays a step's rows are written into, and
    the shapes and dtypes each bucket's program is compiled for (a history of `history_width` tokens per row,
    and prompt logprob targets when asked)."""
    t, b, p = bucket.num_tokens, bucket.num_rows, bucket.pages_per_row
    zeros = lambda *shape: np.zeros(shape, np.int32)
    return StepInputs(
        token_ids=zeros(t),
        positions=zeros(t),
        slot_mapping=zeros(t),
        cu_q_lens=zeros(b + 1),
        kv_lens=zeros(b),
        page_table=zeros(b, p),
        logits_indices=zeros(b),
        temperature=np.zeros(b, np.float32),
        top_k=zeros(b),
        top_p=np.ones(b, np.float32),
        seeds=np.zeros(b, np.uint32),
        sample_positions=zeros(b),
        min_p=np.zeros(b, np.float32),
        banned_token_ids=np.full((b, MAX_BANNED_TOKENS), NO_TOKEN, np.int32),
        repetition_penalty=np.ones(b, np.float32),
        presence_penalty=np.zeros(b, np.float32),
        frequency_penalty=np.zeros(b, np.float32),
        history=zeros(b, history_width),
        history_prompt_lens=zeros(b),
        history_lens=zeros(b),
        prompt_logprob_targets=zeros(t if prompt_logprobs else 0),
        source_rows=np.full(t, -1, np.int32),
    )


def _tokens(request, first: int, end: int) -> list[int]:
    """The known tokens among `first:end` (a pending token, always the last, is left out)."""
    # Decode rows read only their last output token: skip building prompt + output for them.
    num_prompt = request.num_prompt_tokens
    if first >= num_prompt:
        return request.output_token_ids[first - num_prompt : end - num_prompt]
    return request.all_token_ids[first:end]


def build_step_inputs(
    output: SchedulerOutput, bucket: Bucket, page_size: int, in_flight_rows: dict[str, int] | None = None
) -> StepInputs:
    """Packs the scheduled rows into arrays of the bucket's shape, padding as the module docstring says.

    in_flight_rows: request id -> its row in the step in flight, for requests with a pending token.
    """
    num_tokens, num_rows, max_pages = step_size(output)
    assert num_tokens <= bucket.num_tokens and num_rows <= bucket.num_rows, (output, bucket)
    assert max_pages <= bucket.pages_per_row, (max_pages, bucket)
    penalised = [
        item.samples_token and uses_penalties(item.request.sampling_params) for item in output.scheduled
    ]
    x = padding_inputs(
        bucket, bucket.pages_per_row * page_size if any(penalised) else 0, prompt_logprobs=True
    )
    any_prompt_logprobs = False
    wants_top_logprobs = False

    start = 0
    for row, item in enumerate(output.scheduled):
        request, n = item.request, item.num_new_tokens
        first = request.num_computed_tokens
        end = first + n
        assert n > 0 and end <= request.num_tokens, (request, n)
        pages = np.asarray(request.page_ids, np.int32)
        assert len(pages) * page_size >= end, f"{request} lacks pages for {end} tokens"
        pos = np.arange(first, end, dtype=np.int32)
        known = _tokens(request, first, end)
        x.token_ids[start : start + len(known)] = known
        if len(known) < n:  # the last token is pending: the step in flight sampled it
            assert len(known) == n - 1 and request.num_pending_tokens == 1, request
            x.source_rows[start + n - 1] = in_flight_rows[request.request_id]
        x.positions[start : start + n] = pos
        x.slot_mapping[start : start + n] = pages[pos // page_size] * page_size + pos % page_size
        x.page_table[row, : len(pages)] = pages
        x.kv_lens[row] = end
        # The sampled token's position is the row's kv_len (one past its last token in the pages).
        x.sample_positions[row] = end
        start += n
        x.cu_q_lens[row + 1] = start
        x.logits_indices[row] = start - 1

        params = request.sampling_params
        x.temperature[row] = params.temperature
        x.top_k[row] = params.top_k
        x.top_p[row] = params.top_p
        x.seeds[row] = request_seed(request)
        x.min_p[row] = params.min_p
        if item.samples_token:
            banned = banned_token_ids(request)
            x.banned_token_ids[row, : len(banned)] = banned
        wants_top_logprobs |= bool(params.logprobs) or params.use_beam_search
        if penalised[row]:
            x.repetition_penalty[row] = params.repetition_penalty
            x.presence_penalty[row] = params.presence_penalty
            x.frequency_penalty[row] = params.frequency_penalty
            assert request.num_pending_tokens == 0, request  # a penalised row's step is synchronous
            x.history[row, :end] = request.all_token_ids
            x.history_prompt_lens[row] = request.num_prompt_tokens
            x.history_lens[row] = end
        if prompt_logprob_positions(request, first, end):
            any_prompt_logprobs = True
            following = pos[pos + 1 < request.num_prompt_tokens]
            x.prompt_logprob_targets[start - n : start - n + len(following)] = [
                request.prompt_token_ids[q + 1] for q in following
            ]
    # Padded rows own empty ranges; their logits index stays 0, a valid token whose sample is dropped.
    x.cu_q_lens[num_rows + 1 :] = start
    if not any_prompt_logprobs:
        x = x._replace(prompt_logprob_targets=x.prompt_logprob_targets[:0])
    return x._replace(wants_top_logprobs=wants_top_logprobs)
