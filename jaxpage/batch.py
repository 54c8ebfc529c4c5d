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

    @property
    def bucket(self) -> Bucket:
        return Bucket(len(self.token_ids), len(self.kv_lens), self.page_table.shape[1])

    @property
    def all_greedy(self) -> bool:
        return not bool(np.any(self.temperature > 0))


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


def padding_inputs(bucket: Bucket) -> StepInputs:
    """Step inputs of the bucket's shape holding only padding: the arrays a step's rows are written into, and
    the shapes and dtypes each bucket's program is compiled for."""
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
    )


def _tokens(request, first: int, end: int) -> list[int]:
    # Decode rows read only their last output token: skip building prompt + output for them.
    num_prompt = request.num_prompt_tokens
    if first >= num_prompt:
        return request.output_token_ids[first - num_prompt : end - num_prompt]
    return request.all_token_ids[first:end]


def build_step_inputs(output: SchedulerOutput, bucket: Bucket, page_size: int) -> StepInputs:
    """Packs the scheduled rows into arrays of the bucket's shape, padding as the module docstring says."""
    num_tokens, num_rows, max_pages = step_size(output)
    assert num_tokens <= bucket.num_tokens and num_rows <= bucket.num_rows, (output, bucket)
    assert max_pages <= bucket.pages_per_row, (max_pages, bucket)
    x = padding_inputs(bucket)

    start = 0
    for row, item in enumerate(output.scheduled):
        request, n = item.request, item.num_new_tokens
        first = request.num_computed_tokens
        end = first + n
        assert n > 0 and end <= request.num_tokens, (request, n)
        pages = np.asarray(request.page_ids, np.int32)
        assert len(pages) * page_size >= end, f"{request} lacks pages for {end} tokens"
        pos = np.arange(first, end, dtype=np.int32)
        x.token_ids[start : start + n] = _tokens(request, first, end)
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
    # Padded rows own empty ranges; their logits index stays 0, a valid token whose sample is dropped.
    x.cu_q_lens[num_rows + 1 :] = start
    return x
