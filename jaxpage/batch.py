"""Packs one scheduled step into padded numpy arrays of a bucketed shape (docs/architecture.md, step inputs).

Host only: the runner moves the arrays to the device and picks the compiled program of the bucket. Padding
follows the null-page rule: padded tokens are token 0 at position 0 writing slot 0 (page 0), padded rows own
no tokens, see nothing (`kv_len` 0) and point at page 0; their samples are discarded.
"""

import bisect
import dataclasses
import functools
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
    # i32[B]: tokens each row samples in a multi-step decode call (`decode_steps` > 1); 0 for padded rows.
    num_steps: np.ndarray
    # i32[B]: of those, how many `banned_token_ids` holds for (the row has fewer than min_tokens outputs).
    banned_steps: np.ndarray
    # Whether some row reports top logprobs or runs a beam search: only then does the sampler find the
    # `max_logprobs` likeliest tokens of every row (a vocabulary top-k: ~10 ms a CPU step at 64 rows).
    wants_top_logprobs: bool = False
    # > 1: a multi-step decode call of this many forward passes and samples (`SchedulerOutput.decode_steps`).
    decode_steps: int = 1

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
    """Every (T, B, P) combination of the configured sizes in which each row can own a token (B <= T) and,
    with `max_tokens_per_row`, B >= T / max_tokens_per_row (else the largest B <= T); with
    `row_sized_decode`, steps of one token per row take T = B instead (`select`)."""

    def __init__(
        self,
        token_buckets: tuple[int, ...],
        seq_buckets: tuple[int, ...],
        page_buckets: tuple[int, ...],
        row_sized_decode: bool = False,
        max_tokens_per_row: int | None = None,
    ):
        """row_sized_decode: a decode step's tokens are its rows, padded to the row bucket, not to a token
        bucket. The decode kernel's steps want this: every padded token costs the matmuls its rows' work
        (a 32-row decode step of an 8B model padded to 256 tokens spent 6.3 of its 9 device ms in matmuls,
        benchmarks/README.md). The jnp backends leave it off: their configs make the row buckets token
        buckets anyway, and a separate decode shape would only add programs.

        max_tokens_per_row: see `EngineConfig.max_bucket_tokens_per_row`."""
        for name, sizes in (("token", token_buckets), ("seq", seq_buckets), ("page", page_buckets)):
            assert sizes and list(sizes) == sorted(set(sizes)) and sizes[0] > 0, f"bad {name} buckets {sizes}"
        self.token_buckets = tuple(token_buckets)
        # A step never has more rows than tokens, so row counts above the largest token bucket are capped.
        self.seq_buckets = tuple(sorted({min(b, token_buckets[-1]) for b in seq_buckets}))
        self.page_buckets = tuple(page_buckets)
        self.row_sized_decode = row_sized_decode
        self.max_tokens_per_row = max_tokens_per_row

    def _fewest_rows(self, num_tokens: int) -> int:
        """The smallest row bucket of the buckets of `num_tokens` tokens (a token bucket): the first at least
        num_tokens / max_tokens_per_row, else the largest that fits in num_tokens (the smallest row bucket
        when none fits: the token bucket then has no buckets)."""
        fitting = [b for b in self.seq_buckets if b <= num_tokens]
        if self.max_tokens_per_row is None or not fitting:
            return self.seq_buckets[0]
        wanted = -(-num_tokens // self.max_tokens_per_row)
        return next((b for b in fitting if b >= wanted), fitting[-1])

    @property
    def buckets(self) -> list[Bucket]:
        sizes = itertools.product(self.token_buckets, self.seq_buckets, self.page_buckets)
        return [Bucket(t, b, p) for t, b, p in sizes if self._fewest_rows(t) <= b <= t]

    @property
    def decode_buckets(self) -> list[Bucket]:
        """The buckets `select` picks for steps of one token per row."""
        return sorted({self.select(b, b, p) for b in self.seq_buckets for p in self.page_buckets})

    def select(self, num_tokens: int, num_rows: int, max_pages: int) -> Bucket:
        """The smallest bucket holding a step of this size. Raises ValueError if none does."""
        b = _smallest_at_least(self.seq_buckets, num_rows, "num_rows")
        if self.row_sized_decode and num_tokens <= num_rows:  # one token per row
            t = b
        else:
            t = _smallest_at_least(self.token_buckets, max(num_tokens, b), "num_tokens")
            b = max(b, self._fewest_rows(t))
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


def min_tokens_bans(eos_token_ids, params) -> tuple[int, ...]:
    """The ids vLLM's min_tokens holds back: EOS (even under ignore_eos, which only keeps EOS from stopping
    a request) and the stop token ids."""
    return _sorted_union(frozenset(eos_token_ids), params.stop_token_ids)


@functools.lru_cache(maxsize=256)  # a request asks every step; requests mostly share their EOS and stop ids
def _sorted_union(eos_token_ids: frozenset[int], stop_token_ids: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(eos_token_ids | set(stop_token_ids)))


def banned_token_ids(request) -> tuple[int, ...]:
    """What the request may not draw next: `min_tokens_bans` while it has fewer than min_tokens outputs."""
    if request.num_sampled_tokens >= request.sampling_params.min_tokens:
        return ()
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
        num_steps=zeros(b),
        banned_steps=zeros(b),
    )


def _tokens(request, first: int, end: int) -> list[int]:
    """The known tokens among `first:end` (a pending token, always the last, is left out)."""
    # Decode rows read only their last output token: skip building prompt + output for them.
    num_prompt = request.num_prompt_tokens
    if first >= num_prompt:
        return request.output_token_ids[first - num_prompt : end - num_prompt]
    return request.all_token_ids[first:end]


def _concatenate(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(i32[sum of lengths]: the lists one after another, i64[len(lists)]: each one's length)."""
    lengths = np.fromiter(map(len, lists), np.int64, len(lists))
    flat = np.fromiter(itertools.chain.from_iterable(lists), np.int32, int(lengths.sum()))
    return flat, lengths


def _index_within(lengths: np.ndarray) -> np.ndarray:
    """For each element of concatenated lists of these lengths, its index within its own list."""
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum())) - np.repeat(starts, lengths)


def _fill_rows(table: np.ndarray, rows: list[int], lists: list[list[int]]) -> None:
    """table[rows[i], :len(lists[i])] = lists[i] for every i, in one scatter."""
    flat, lengths = _concatenate(lists)
    table[np.repeat(np.asarray(rows, np.int64), lengths), _index_within(lengths)] = flat


def build_step_inputs(
    output: SchedulerOutput, bucket: Bucket, page_size: int, in_flight_rows: dict[str, int] | None = None
) -> StepInputs:
    """Packs the scheduled rows into arrays of the bucket's shape, padding as the module docstring says.

    Per row, Python only reads the request's numbers and lists; the arrays are built by numpy, so a decode
    step of 256 rows packs in about a millisecond.

    in_flight_rows: request id -> its row in the step in flight, for requests with a pending token.
    """
    scheduled = output.scheduled
    num_rows = len(scheduled)
    requests = [item.request for item in scheduled]
    params = [request.sampling_params for request in requests]
    samples = [item.samples_token for item in scheduled]
    first = np.fromiter((item.first for item in scheduled), np.int64, num_rows)
    num_new = np.fromiter((item.num_new_tokens for item in scheduled), np.int64, num_rows)
    end = first + num_new
    num_tokens = int(num_new.sum())
    max_pages = max(map(len, (r.page_ids for r in requests)), default=0)
    assert num_tokens <= bucket.num_tokens and num_rows <= bucket.num_rows, (output, bucket)
    assert max_pages <= bucket.pages_per_row, (max_pages, bucket)
    assert np.all(num_new > 0), output
    assert all(e <= r.num_tokens for e, r in zip(end.tolist(), requests, strict=True)), output
    penalised = [s and uses_penalties(p) for s, p in zip(samples, params, strict=True)]
    asks_prompt_logprobs = [p.prompt_logprobs is not None for p in params]
    x = padding_inputs(
        bucket,
        bucket.pages_per_row * page_size if any(penalised) else 0,
        prompt_logprobs=any(asks_prompt_logprobs),
    )

    # Rows: the token ranges, the page table, and what is sampled.
    x.cu_q_lens[1 : num_rows + 1] = np.cumsum(num_new)
    x.cu_q_lens[num_rows + 1 :] = num_tokens  # padded rows own empty ranges
    x.kv_lens[:num_rows] = end
    x.sample_positions[:num_rows] = end  # the sampled token's position is one past the row's last token
    # Padded rows keep logits index 0, a valid token whose sample is dropped.
    x.logits_indices[:num_rows] = x.cu_q_lens[1 : num_rows + 1] - 1
    page_ids = [request.page_ids for request in requests]
    _fill_rows(x.page_table, range(num_rows), page_ids)
    assert np.all(np.fromiter(map(len, page_ids), np.int64, num_rows) * page_size >= end), output

    # Tokens: positions and slots from the rows' ranges and pages.
    token_rows = np.repeat(np.arange(num_rows), num_new)
    positions = np.repeat(first, num_new) + _index_within(num_new)
    x.positions[:num_tokens] = positions
    x.slot_mapping[:num_tokens] = (
        x.page_table[token_rows, positions // page_size] * page_size + positions % page_size
    )
    # Token ids: the known ones; a pending token (always a row's last) comes from the step in flight.
    known = [_tokens(r, f, e) for r, f, e in zip(requests, first.tolist(), end.tolist(), strict=True)]
    flat, num_known = _concatenate(known)
    x.token_ids[np.repeat(x.cu_q_lens[:num_rows], num_known) + _index_within(num_known)] = flat
    pending = np.flatnonzero(num_known < num_new)
    if len(pending):
        assert np.all(num_known[pending] == num_new[pending] - 1), output
        # (A multi-step call's row left several pending, all sampled by the step in flight; the last is this.)
        assert all(requests[row].num_pending_tokens >= 1 for row in pending), output
        x.source_rows[x.cu_q_lens[pending + 1] - 1] = [
            in_flight_rows[requests[row].request_id] for row in pending
        ]

    # Sampling parameters.
    x.temperature[:num_rows] = [p.temperature for p in params]
    x.top_k[:num_rows] = [p.top_k for p in params]
    x.top_p[:num_rows] = [p.top_p for p in params]
    x.min_p[:num_rows] = [p.min_p for p in params]
    x.seeds[:num_rows] = [request_seed(r) for r in requests]
    banning = [row for row in range(num_rows) if samples[row] and params[row].min_tokens > 0]
    _fill_rows(x.banned_token_ids, banning, [banned_token_ids(requests[row]) for row in banning])
    for row in itertools.compress(range(num_rows), penalised):
        request, p = requests[row], params[row]
        assert request.num_pending_tokens == 0, request  # a penalised row's step is synchronous
        x.repetition_penalty[row] = p.repetition_penalty
        x.presence_penalty[row] = p.presence_penalty
        x.frequency_penalty[row] = p.frequency_penalty
        x.history[row, : end[row]] = request.all_token_ids
        x.history_prompt_lens[row] = request.num_prompt_tokens
        x.history_lens[row] = end[row]
    any_prompt_logprobs = False
    for row in itertools.compress(range(num_rows), asks_prompt_logprobs):
        request = requests[row]
        if prompt_logprob_positions(request, int(first[row]), int(end[row])):
            any_prompt_logprobs = True
            row_positions = np.arange(first[row], end[row])
            following = row_positions[row_positions + 1 < request.num_prompt_tokens]
            start = x.cu_q_lens[row]
            x.prompt_logprob_targets[start : start + len(following)] = [
                request.prompt_token_ids[q + 1] for q in following
            ]
    if not any_prompt_logprobs:
        x = x._replace(prompt_logprob_targets=x.prompt_logprob_targets[:0])
    if output.decode_steps > 1:
        x.num_steps[:num_rows] = [item.num_steps for item in scheduled]
        x.banned_steps[:num_rows] = [r.sampling_params.min_tokens - r.num_sampled_tokens for r in requests]
        np.maximum(x.banned_steps, 0, out=x.banned_steps)
    wants_top_logprobs = any(bool(p.logprobs) or p.use_beam_search for p in params)
    return x._replace(wants_top_logprobs=wants_top_logprobs, decode_steps=output.decode_steps)
