"""Continuous batching against a fake model whose next token is a function of the whole prefix.

The fake model also keeps a fake KV store keyed by slot, so a page written by one request and read by another,
a page freed too early, or a token computed out of order all change the outputs or trip an assert.
"""

import hypothesis.strategies as st
import pytest
from fake_kv_model import EOS, VOCAB, FakeKVModel, next_token
from hypothesis import given, settings

from jaxpage.page_pool import PagePool
from jaxpage.request import Request, RequestStatus
from jaxpage.sampling_params import SamplingParams
from jaxpage.scheduler import Scheduler


class FakeModel(FakeKVModel):
    """The shared fake model, also checking that every step stays within the scheduler's budgets."""

    def step(self, output, max_num_batched_tokens: int, max_num_seqs: int):
        assert output.num_scheduled_tokens <= max_num_batched_tokens
        assert len(output.scheduled) <= max_num_seqs
        return super().step(output)


def make_scheduler(num_pages=64, page_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128):
    pool = PagePool(num_pages)
    sched = Scheduler(
        pool,
        page_size=page_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
    )
    return sched, FakeModel(page_size)


def run_to_completion(sched, model, check_each_step=True, max_steps=10_000):
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests:
            return steps
        output = sched.schedule()
        assert not output.is_empty, "unfinished requests but nothing scheduled: a deadlock"
        sched.update_from_output(output, model.step(output, sched.max_num_batched_tokens, sched.max_num_seqs))
        steps.append(output)
        if check_each_step:
            check_invariants(sched)
    raise AssertionError("did not finish")


def check_invariants(sched):
    sched.pool.check_invariants([r.page_ids for r in sched.running])
    assert len(sched.running) <= sched.max_num_seqs
    for r in sched.waiting:
        assert not r.page_ids and r.num_computed_tokens == 0
    for r in sched.running:
        assert len(r.page_ids) == -(-r.num_computed_tokens // sched.page_size)


def reference_output(prompt, params, max_model_len=128):
    tokens = list(prompt)
    out = []
    while True:
        token = next_token(tokens)
        tokens.append(token)
        out.append(token)
        if token == EOS and not params.ignore_eos:
            return out, "stop"
        if len(out) >= params.max_tokens or len(tokens) >= max_model_len:
            return out, "length"


def make_request(i, prompt_len, max_tokens, ignore_eos=True):
    prompt = [1 + (i * 7 + j) % (VOCAB - 1) for j in range(prompt_len)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
    return Request(f"r{i}", prompt, params, eos_token_ids=frozenset({EOS}))


def test_one_request_prefill_then_decode():
    sched, model = make_scheduler()
    request = make_request(0, prompt_len=10, max_tokens=3)
    sched.add_request(request)
    steps = run_to_completion(sched, model)
    assert [s.num_scheduled_tokens for s in steps] == [10, 1, 1]
    assert (request.output_token_ids, request.status.finish_reason) == reference_output(
        request.prompt_token_ids, request.sampling_params
    )
    assert sched.pool.num_free_pages == sched.pool.num_usable_pages and not request.page_ids


def test_long_prompt_is_prefilled_in_chunks_under_the_budget():
    sched, model = make_scheduler(max_num_batched_tokens=8)
    request = make_request(0, prompt_len=20, max_tokens=2)
    sched.add_request(request)
    steps = run_to_completion(sched, model)
    assert [s.num_scheduled_tokens for s in steps] == [8, 8, 4, 1]
    assert request.output_token_ids == reference_output(request.prompt_token_ids, request.sampling_params)[0]


def test_finished_request_frees_its_row_for_a_waiting_one_in_the_same_step():
    sched, model = make_scheduler(max_num_seqs=1)
    first, second = make_request(0, 4, max_tokens=1), make_request(1, 4, max_tokens=1)
    sched.add_request(first)
    sched.add_request(second)
    out = sched.schedule()
    assert [s.request for s in out.scheduled] == [first]
    sched.update_from_output(out, model.step(out, 32, 1))
    assert first.status == RequestStatus.FINISHED_LENGTH
    assert [s.request for s in sched.schedule().scheduled] == [second]


def test_waiting_requests_are_admitted_in_arrival_order():
    sched, model = make_scheduler(num_pages=5, page_size=4)  # 4 usable pages
    big = make_request(0, prompt_len=12, max_tokens=4)  # needs 4 pages at its longest
    small = make_request(1, prompt_len=2, max_tokens=1)
    blocked = make_request(2, prompt_len=12, max_tokens=1)
    for r in (big, blocked, small):
        sched.add_request(r)
    out = sched.schedule()
    # big takes 3 pages; blocked needs 3 more and heads the queue, so small waits behind it although it fits.
    assert [s.request for s in out.scheduled] == [big]
    run_to_completion(sched, model)
    assert all(
        r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params)[0]
        for r in (big, small, blocked)
    )


def test_newest_request_is_preempted_and_recomputes_to_the_same_tokens():
    sched, model = make_scheduler(num_pages=5, page_size=4, max_num_batched_tokens=64)
    old, new = make_request(0, prompt_len=7, max_tokens=8), make_request(1, prompt_len=8, max_tokens=4)
    sched.add_request(old)
    sched.add_request(new)
    steps = run_to_completion(sched, model)
    assert any(new in s.preempted for s in steps) and new.num_preemptions >= 1 and old.num_preemptions == 0
    for r in (old, new):
        assert (r.output_token_ids, r.status.finish_reason) == reference_output(
            r.prompt_token_ids, r.sampling_params
        )
    assert sched.pool.num_free_pages == 4


def test_eos_and_stop_token_ids_finish_with_stop():
    sched, model = make_scheduler()
    prompt = [3, 4, 5]
    first = next_token(prompt)
    eos_req = Request(
        "eos", prompt, SamplingParams(max_tokens=5, temperature=0), eos_token_ids=frozenset({first})
    )
    stop_req = Request("stop", prompt, SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[first]))
    ignore = Request(
        "ignore",
        prompt,
        SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
        eos_token_ids=frozenset({first}),
    )
    for r in (eos_req, stop_req, ignore):
        sched.add_request(r)
    run_to_completion(sched, model)
    assert eos_req.output_token_ids == [first] and eos_req.status.finish_reason == "stop"
    assert stop_req.output_token_ids == [first] and stop_req.status.finish_reason == "stop"
    assert len(ignore.output_token_ids) == 2 and ignore.status.finish_reason == "length"


def test_max_model_len_caps_generation():
    sched, model = make_scheduler(max_model_len=12)
    request = make_request(0, prompt_len=10, max_tokens=50)
    sched.add_request(request)
    run_to_completion(sched, model)
    assert request.num_tokens == 12 and request.status.finish_reason == "length"


def test_abort_frees_pages_of_running_and_waiting_requests():
    sched, model = make_scheduler(max_num_seqs=1)
    running, waiting = make_request(0, 9, 5), make_request(1, 9, 5)
    sched.add_request(running)
    sched.add_request(waiting)
    out = sched.schedule()
    sched.update_from_output(out, model.step(out, 32, 1))
    assert running.page_ids
    assert sched.finish_request("r0", RequestStatus.FINISHED_ABORTED) is running
    assert sched.finish_request("r1", RequestStatus.FINISHED_ABORTED) is waiting
    assert sched.finish_request("r1", RequestStatus.FINISHED_ABORTED) is None
    assert running.status.finish_reason == "abort" and not sched.has_unfinished_requests
    assert sched.pool.num_free_pages == sched.pool.num_usable_pages


def test_request_aborted_mid_step_drops_its_sample():
    sched, model = make_scheduler()
    request = make_request(0, 5, 5)
    sched.add_request(request)
    out = sched.schedule()
    samples = model.step(out, 32, 8)
    sched.finish_request("r0", RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(out, samples) == [] and request.output_token_ids == []


@pytest.mark.parametrize(
    "prompt_len, max_tokens, match",
    [(128, 1, "max_model_len"), (200, 1, "max_model_len"), (100, 28, "pages")],
)
def test_request_that_could_never_run_is_rejected_without_holding_pages(prompt_len, max_tokens, match):
    sched, _ = make_scheduler(num_pages=26, page_size=4, max_model_len=128)  # 25 pages = 100 tokens
    with pytest.raises(ValueError, match=match):
        sched.add_request(make_request(0, prompt_len, max_tokens))
    assert not sched.has_unfinished_requests and sched.pool.num_free_pages == 25


def test_duplicate_request_id_is_rejected():
    sched, _ = make_scheduler()
    sched.add_request(make_request(0, 3, 1))
    with pytest.raises(ValueError, match="request_id 'r0'"):
        sched.add_request(make_request(0, 3, 1))


@settings(max_examples=60, deadline=None)
@given(
    num_pages=st.integers(8, 40),
    page_size=st.sampled_from([1, 2, 4, 8]),
    max_num_seqs=st.integers(1, 6),
    max_num_batched_tokens=st.integers(1, 40),
    requests=st.lists(
        st.tuples(st.integers(1, 30), st.integers(1, 12), st.booleans()), min_size=1, max_size=12
    ),
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "step", "step", "step", "abort"]), st.integers(0, 99)), max_size=80
    ),
)
def test_any_workload_matches_unbatched_outputs_and_returns_every_page(
    num_pages, page_size, max_num_seqs, max_num_batched_tokens, requests, ops
):
    sched, model = make_scheduler(
        num_pages, page_size, max_num_seqs, max_num_batched_tokens, max_model_len=40
    )
    pending = [make_request(i, p, m, ignore_eos=ig) for i, (p, m, ig) in enumerate(requests)]
    added, aborted = [], set()
    for op, arg in ops:
        if op == "add" and pending:
            request = pending.pop(0)
            try:
                sched.add_request(request)
                added.append(request)
            except ValueError:
                assert request.request_id not in sched.requests
        elif op == "step" and sched.has_unfinished_requests:
            out = sched.schedule()
            sched.update_from_output(out, model.step(out, max_num_batched_tokens, max_num_seqs))
        elif op == "abort" and added:
            victim = added[arg % len(added)]
            if sched.finish_request(victim.request_id, RequestStatus.FINISHED_ABORTED) is not None:
                aborted.add(victim.request_id)
        check_invariants(sched)
    for request in pending:
        try:
            sched.add_request(request)
            added.append(request)
        except ValueError:
            pass
    run_to_completion(sched, model)
    assert sched.pool.num_free_pages == num_pages - 1
    for request in added:
        expected, reason = reference_output(
            request.prompt_token_ids, request.sampling_params, max_model_len=40
        )
        if request.request_id in aborted:
            assert request.status.finish_reason == "abort"
            assert request.output_token_ids == expected[: len(request.output_token_ids)]
        else:
            assert (request.output_token_ids, request.status.finish_reason) == (expected, reason)
