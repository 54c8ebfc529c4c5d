import zlib

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from jaxpage.batch import NO_TOKEN, Bucket, BucketGrid, build_step_inputs, request_seed, step_size
from jaxpage.request import Request
from jaxpage.sampling_params import SamplingParams
from jaxpage.scheduler import ScheduledRequest, SchedulerOutput

PAGE = 4


def _request(request_id, prompt, pages, computed=0, output=(), **params):
    request = Request(request_id, list(prompt), SamplingParams(**params))
    request.output_token_ids = list(output)
    request.num_computed_tokens = computed
    request.page_ids = list(pages)
    return request


def _step(*rows):
    return SchedulerOutput(scheduled=[ScheduledRequest(r, n) for r, n in rows], preempted=[])


def test_prefill_chunk_and_decode_rows_are_packed_back_to_back():
    # Row 0: a 10-token prompt whose first 4 tokens are in pages; 6 more run now (positions 4..9).
    prefill = _request("a", range(100, 110), pages=[7, 3, 9], computed=4, temperature=0.0)
    # Row 1: a decode step: 5 prompt tokens + 2 outputs in pages except the last output (position 6).
    decode = _request(
        "b",
        [1, 2, 3, 4, 5],
        pages=[5, 2],
        computed=6,
        output=[60, 61],
        temperature=0.8,
        top_k=5,
        top_p=0.9,
        seed=42,
    )
    inputs = build_step_inputs(_step((prefill, 6), (decode, 1)), Bucket(16, 4, 4), PAGE)

    assert inputs.bucket == Bucket(16, 4, 4)
    np.testing.assert_array_equal(inputs.token_ids, [104, 105, 106, 107, 108, 109, 61] + [0] * 9)
    np.testing.assert_array_equal(inputs.positions, [4, 5, 6, 7, 8, 9, 6] + [0] * 9)
    # slot = page_ids[pos // PAGE] * PAGE + pos % PAGE; padding writes slot 0 (the null page).
    np.testing.assert_array_equal(inputs.slot_mapping, [12, 13, 14, 15, 36, 37, 10] + [0] * 9)
    np.testing.assert_array_equal(inputs.cu_q_lens, [0, 6, 7, 7, 7])
    np.testing.assert_array_equal(inputs.kv_lens, [10, 7, 0, 0])
    np.testing.assert_array_equal(inputs.page_table, [[7, 3, 9, 0], [5, 2, 0, 0], [0] * 4, [0] * 4])
    np.testing.assert_array_equal(inputs.logits_indices[:2], [5, 6])
    assert np.all((inputs.logits_indices >= 0) & (inputs.logits_indices < 16))
    np.testing.assert_allclose(inputs.temperature, [0, 0.8, 0, 0])
    np.testing.assert_array_equal(inputs.top_k, [0, 5, 0, 0])
    np.testing.assert_allclose(inputs.top_p, [1, 0.9, 1, 1])
    assert inputs.seeds[1] == 42
    np.testing.assert_array_equal(inputs.sample_positions, [10, 7, 0, 0])
    assert not inputs.all_greedy
    for name, dtype in (
        ("token_ids", np.int32),
        ("slot_mapping", np.int32),
        ("page_table", np.int32),
        ("temperature", np.float32),
        ("top_p", np.float32),
        ("seeds", np.uint32),
    ):
        assert getattr(inputs, name).dtype == dtype, name


def test_all_greedy_when_no_row_samples():
    rows = [(_request(str(i), [1, 2, 3], pages=[i + 1], temperature=0.0), 3) for i in range(3)]
    assert build_step_inputs(_step(*rows), Bucket(16, 4, 2), PAGE).all_greedy


def test_decode_only_when_row_b_owns_exactly_token_b():
    decoding = [(_request(str(i), [1, 2], pages=[i + 1], computed=2, output=[5]), 1) for i in range(3)]
    assert build_step_inputs(_step(*decoding), Bucket(8, 4, 2), PAGE).decode_only  # padded row at the end
    prefill = (_request("p", [1, 2, 3], pages=[9]), 3)
    assert not build_step_inputs(_step(decoding[0], prefill), Bucket(8, 4, 2), PAGE).decode_only
    # Row 0 empty, row 1 owning token 0: one token per row at most, yet not token b for row b.
    x = build_step_inputs(_step(*decoding[:2]), Bucket(8, 4, 2), PAGE)
    assert not x._replace(cu_q_lens=np.array([0, 0, 1, 2, 2], np.int32)).decode_only


@pytest.mark.parametrize("row_sized_decode", [False, True])
def test_bucket_grid_decode_buckets_are_what_decode_steps_select(row_sized_decode):
    grid = BucketGrid((8, 32, 128), (4, 16, 64), (2, 8), row_sized_decode)
    selected = {grid.select(n, n, p) for n in range(1, 65) for p in range(1, 9)}
    assert set(grid.decode_buckets) == selected


def test_row_sized_decode_pads_decode_steps_to_their_row_bucket_only():
    grid = BucketGrid((256, 2048), (32, 256), (128,), row_sized_decode=True)
    assert grid.select(20, 20, 5) == Bucket(32, 32, 128)  # not the 256-token bucket
    assert grid.select(200, 200, 5) == Bucket(256, 256, 128)
    assert grid.select(21, 20, 5) == Bucket(256, 32, 128)  # a prompt chunk among them: token buckets
    assert set(grid.decode_buckets) == {Bucket(32, 32, 128), Bucket(256, 256, 128)}
    assert BucketGrid((256, 2048), (32, 256), (128,)).select(20, 20, 5) == Bucket(256, 32, 128)


def test_min_tokens_bans_eos_and_stop_token_ids_of_sampling_rows_until_reached():
    def row(output, **params):
        request = Request("r", [1, 2], SamplingParams(max_tokens=9, **params), frozenset({0, 2}))
        request.output_token_ids, request.num_computed_tokens, request.page_ids = output, 1 + len(output), [1]
        return request, 1

    x = build_step_inputs(
        _step(
            row([], min_tokens=2, stop_token_ids=[7]),  # no output yet: banned
            row([4], min_tokens=2, stop_token_ids=[7], ignore_eos=True),  # one of two: EOS banned too
            row([4, 4], min_tokens=2, stop_token_ids=[7]),  # reached: nothing
            row([], stop_token_ids=[7]),  # no min_tokens: nothing
        ),
        Bucket(4, 4, 2),
        PAGE,
    )
    banned = [sorted(set(ids) - {NO_TOKEN}) for ids in x.banned_token_ids.tolist()]
    assert banned == [[0, 2, 7], [0, 2, 7], [], []]


def test_unseeded_request_gets_a_seed_fixed_by_its_id():
    request = _request("req-7", [1], pages=[1])
    assert request_seed(request) == zlib.crc32(b"req-7")
    assert request_seed(_request("x", [1], pages=[1], seed=5)) == 5


def test_step_size_counts_tokens_rows_and_widest_page_table():
    a = _request("a", range(9), pages=[1, 2, 3])
    b = _request("b", range(2), pages=[4])
    assert step_size(_step((a, 9), (b, 2))) == (11, 2, 3)


def test_bucket_grid_selects_the_smallest_fitting_bucket():
    grid = BucketGrid((8, 32, 128), (4, 16), (2, 8))
    assert grid.select(5, 3, 1) == Bucket(8, 4, 2)
    assert grid.select(9, 3, 3) == Bucket(32, 4, 8)
    assert grid.select(10, 10, 8) == Bucket(32, 16, 8)  # 10 rows need the 16-row bucket, hence >= 16 tokens
    assert grid.select(128, 16, 8) == Bucket(128, 16, 8)
    assert all(b.num_rows <= b.num_tokens for b in grid.buckets)
    assert grid.select(6, 6, 2) in grid.buckets  # a row bucket above the token need still has a bucket


def test_bucket_grid_caps_row_buckets_at_the_largest_token_bucket():
    grid = BucketGrid((8, 16), (4, 64), (2,))
    assert grid.seq_buckets == (4, 16)
    assert grid.select(16, 16, 1) == Bucket(16, 16, 2)


def test_a_bucket_of_many_tokens_has_rows_in_proportion():
    grid = BucketGrid((256, 512, 2048), (32, 64, 256, 1024), (128,), max_tokens_per_row=8)
    rows = {t: sorted(b.num_rows for b in grid.buckets if b.num_tokens == t) for t in (256, 512, 2048)}
    assert rows == {256: [32, 64, 256], 512: [64, 256], 2048: [256, 1024]}
    assert grid.select(2000, 20, 3) == Bucket(2048, 256, 128)  # few rows among many tokens: rows padded
    assert grid.select(300, 20, 3) == Bucket(512, 64, 128)
    assert grid.select(20, 20, 3) == Bucket(256, 32, 128)
    # No row bucket reaches 256 / 1: the largest that fits in the token bucket.
    assert BucketGrid((256,), (32, 64), (128,), max_tokens_per_row=1).buckets == [Bucket(256, 64, 128)]


@settings(max_examples=60, deadline=None)
@given(
    num_tokens=st.integers(1, 64),
    num_rows=st.integers(1, 64),
    pages=st.integers(1, 4),
    ratio=st.sampled_from([None, 1, 2, 4, 16]),
    decode=st.booleans(),
)
def test_every_step_selects_a_bucket_of_the_grid_that_holds_it(num_tokens, num_rows, pages, ratio, decode):
    grid = BucketGrid((4, 16, 64), (2, 8, 32), (2, 4), row_sized_decode=decode, max_tokens_per_row=ratio)
    num_rows = min(num_rows, num_tokens, 32)  # the largest row bucket
    bucket = grid.select(num_tokens, num_rows, pages)
    if decode and num_tokens <= num_rows:  # one token per row: the decode kernel's bucket
        rows = min(b for b in grid.seq_buckets if b >= num_rows)
        assert bucket == Bucket(rows, rows, min(p for p in grid.page_buckets if p >= pages))
    else:  # the smallest of the grid's buckets that holds the step
        holding = [
            b
            for b in grid.buckets
            if b.num_tokens >= num_tokens and b.num_rows >= num_rows and b.pages_per_row >= pages
        ]
        assert bucket == min(holding, key=lambda b: (b.num_tokens, b.num_rows, b.pages_per_row))
    assert bucket.num_tokens >= num_tokens and bucket.num_rows >= num_rows and bucket.pages_per_row >= pages


@pytest.mark.parametrize(
    "size, field", [((129, 1, 1), "num_tokens"), ((64, 17, 1), "num_rows"), ((64, 4, 9), "max_pages")]
)
def test_bucket_grid_rejects_a_step_beyond_every_bucket(size, field):
    with pytest.raises(ValueError, match=field):
        BucketGrid((8, 32, 128), (4, 16), (2, 8)).select(*size)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_every_token_writes_its_own_slot_in_its_own_pages(data):
    num_pages = 40
    free = list(range(1, num_pages))
    data.draw(st.randoms(use_true_random=False)).shuffle(free)
    rows = []
    for i in range(data.draw(st.integers(1, 4))):
        total = data.draw(st.integers(1, 20))
        computed = data.draw(st.integers(0, total - 1))
        pages = [free.pop() for _ in range(-(-total // PAGE))]
        request = _request(str(i), range(1, total + 1), pages=pages, computed=computed)
        rows.append((request, total - computed))
    inputs = build_step_inputs(_step(*rows), Bucket(128, 4, 8), PAGE)

    real = inputs.cu_q_lens[len(rows)]
    slots = inputs.slot_mapping[:real]
    assert len(set(slots.tolist())) == real and np.all(slots >= PAGE), "slots collide or hit the null page"
    assert np.all(inputs.slot_mapping[real:] == 0)
    for b, (request, n) in enumerate(rows):
        lo, hi = inputs.cu_q_lens[b], inputs.cu_q_lens[b + 1]
        assert hi - lo == n and inputs.kv_lens[b] == request.num_tokens
        for t in range(lo, hi):
            pos = inputs.positions[t]
            assert request.page_ids[pos // PAGE] * PAGE + pos % PAGE == inputs.slot_mapping[t]
            assert inputs.token_ids[t] == request.all_token_ids[pos]
        assert inputs.logits_indices[b] == hi - 1


def test_penalised_sampled_rows_carry_their_history_and_the_rest_none():
    penalised = _request(
        "p", [5, 6, 5], pages=[1, 2], computed=4, output=[7, 7], repetition_penalty=1.2, frequency_penalty=0.5
    )
    plain = _request("q", [1, 2], pages=[3], computed=2, output=[9])
    chunk = _request("c", range(10, 20), pages=[4, 5, 6], computed=0, presence_penalty=1.0)  # samples nothing
    inputs = build_step_inputs(_step((penalised, 1), (plain, 1), (chunk, 4)), Bucket(16, 4, 4), PAGE)
    assert inputs.has_penalties and inputs.history.shape == (4, 4 * PAGE)
    np.testing.assert_array_equal(inputs.history[0, :5], [5, 6, 5, 7, 7])
    np.testing.assert_array_equal(inputs.history_lens, [5, 0, 0, 0])
    np.testing.assert_array_equal(inputs.history_prompt_lens, [3, 0, 0, 0])
    np.testing.assert_allclose(inputs.repetition_penalty, [1.2, 1, 1, 1])
    np.testing.assert_allclose(inputs.frequency_penalty, [0.5, 0, 0, 0])
    np.testing.assert_allclose(inputs.presence_penalty, [0, 0, 0, 0])  # the chunk's sample is dropped anyway

    without = build_step_inputs(_step((plain, 1), (chunk, 4)), Bucket(16, 4, 4), PAGE)
    assert not without.has_penalties and without.history.shape == (4, 0)


def test_prompt_logprob_targets_are_the_next_prompt_tokens_of_the_rows_that_ask():
    asking = _request("a", [11, 12, 13, 14, 15, 16], pages=[1, 2], computed=2, prompt_logprobs=2)
    asking.prompt_logprobs += [{12: -1.0}, {13: -1.0}]  # positions 1 and 2 recorded; 3 is next
    plain = _request("b", [1, 2, 3], pages=[3], computed=0)
    inputs = build_step_inputs(_step((plain, 3), (asking, 4)), Bucket(16, 4, 2), PAGE)
    assert inputs.wants_prompt_logprobs
    # Row 1 runs positions 2..5 (flat 3..6): each predicts the next prompt token; the last has none.
    np.testing.assert_array_equal(inputs.prompt_logprob_targets[3:7], [14, 15, 16, 0])
    assert not np.any(inputs.prompt_logprob_targets[:3])

    done = _request("d", [11, 12, 13], pages=[1], computed=2, prompt_logprobs=0)
    done.prompt_logprobs += [{12: -1.0}, {13: -1.0}]  # every prompt position recorded
    assert not build_step_inputs(_step((done, 1), (plain, 3)), Bucket(16, 4, 2), PAGE).wants_prompt_logprobs
    assert not build_step_inputs(
        _step(
            (plain, 3),
        ),
        Bucket(16, 4, 2),
        PAGE,
    ).wants_prompt_logprobs


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_each_row_is_packed_as_its_request_says(data):
    """Row by row, the arrays say what the row's request does; padded rows are empty. Covers prefill chunks,
    decode rows whose last token is pending on the device, min_tokens bans and sampling parameters."""
    free = list(range(1, 200))
    data.draw(st.randoms(use_true_random=False)).shuffle(free)
    in_flight_rows, rows = {}, []
    num_rows = data.draw(st.integers(1, 6))
    for i in range(num_rows):
        prompt = data.draw(st.lists(st.integers(1, 999), min_size=1, max_size=20))
        output = data.draw(st.lists(st.integers(1, 999), max_size=6))
        pending = bool(output) and data.draw(st.booleans())  # the last output token is still on the device
        total = len(prompt) + len(output)
        computed = total - 1 if pending else data.draw(st.integers(0, total - 1))
        params = dict(
            temperature=data.draw(st.sampled_from([0.0, 0.7])),
            top_k=data.draw(st.integers(0, 5)),
            min_tokens=data.draw(st.integers(0, 8)),
            stop_token_ids=data.draw(st.lists(st.integers(1, 50), max_size=3)),
            seed=data.draw(st.one_of(st.none(), st.integers(0, 99))),
        )
        request = Request(str(i), prompt, SamplingParams(max_tokens=20, **params), frozenset({3}))
        request.output_token_ids = output[:-1] if pending else output
        request.num_pending_tokens = int(pending)
        request.num_computed_tokens = computed
        request.page_ids = [free.pop() for _ in range(-(-total // PAGE))]
        if pending:
            in_flight_rows[request.request_id] = data.draw(st.integers(0, 7))
        num_new = 1 if pending else data.draw(st.integers(1, total - computed))  # a chunk may stop short
        rows.append((request, output, num_new))
    x = build_step_inputs(_step(*[(r, n) for r, _, n in rows]), Bucket(128, 8, 8), PAGE, in_flight_rows)

    start = 0
    for b, (request, output, n) in enumerate(rows):
        first, end = request.num_computed_tokens, request.num_computed_tokens + n
        tokens = request.prompt_token_ids + output
        assert (x.cu_q_lens[b], x.cu_q_lens[b + 1]) == (start, start + n)
        assert x.kv_lens[b] == x.sample_positions[b] == end and x.logits_indices[b] == start + n - 1
        assert x.page_table[b].tolist() == request.page_ids + [0] * (8 - len(request.page_ids))
        for t, pos in zip(range(start, start + n), range(first, end), strict=True):
            assert x.positions[t] == pos
            assert x.slot_mapping[t] == request.page_ids[pos // PAGE] * PAGE + pos % PAGE
            if request.num_pending_tokens and pos == end - 1:
                assert (x.token_ids[t], x.source_rows[t]) == (0, in_flight_rows[request.request_id])
            else:
                assert (x.token_ids[t], x.source_rows[t]) == (tokens[pos], -1)
        params = request.sampling_params
        assert (x.temperature[b], x.top_k[b], x.seeds[b]) == (
            np.float32(params.temperature),
            params.top_k,
            request_seed(request),
        )
        samples = end == request.num_tokens
        expected_bans = (
            sorted({3, *params.stop_token_ids}) if samples and len(output) < params.min_tokens else []
        )
        assert [t for t in x.banned_token_ids[b].tolist() if t != NO_TOKEN] == expected_bans
        start += n
    assert np.all(x.cu_q_lens[num_rows:] == start) and np.all(x.kv_lens[num_rows:] == 0)
    assert np.all(x.page_table[num_rows:] == 0) and np.all(x.source_rows[start:] == -1)
    assert np.all(x.token_ids[start:] == 0) and np.all(x.slot_mapping[start:] == 0)
