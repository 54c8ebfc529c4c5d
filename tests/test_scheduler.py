"""Continuous batching against a fake model whose next token is a function of the whole prefix.

The fake model also keeps a fake KV store keyed by slot, so a page written by one request and read by another,
a page freed too early, or a token computed out of order all change the outputs or trip an assert.
"""

import dataclasses

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
        samples = model.step(output, sched.max_num_batched_tokens, sched.max_num_seqs)
        sched.advance(output)
        sched.update_from_output(output, samples)
        steps.append(output)
        if check_each_step:
            check_invariants(sched)
    raise AssertionError("did not finish")


def check_invariants(sched):
    sched.pool.check_invariants([r.page_ids for r in sched.running])
    assert len(sched.running) <= sched.max_num_seqs
    for r in sched.waiting:
        assert not r.page_ids and (r.status == RequestStatus.SWAPPED or r.num_computed_tokens == 0)
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
    samples = model.step(out, 32, 1)
    sched.advance(out)
    sched.update_from_output(out, samples)
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
    samples = model.step(out, 32, 1)
    sched.advance(out)
    sched.update_from_output(out, samples)
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
    sched.advance(out)
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
            samples = model.step(out, max_num_batched_tokens, max_num_seqs)
            sched.advance(out)
            sched.update_from_output(out, samples)
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


# ---- what beam search does between steps: fork, replace the pending token, hold ---------------------------


def step(sched, model):
    out = sched.schedule()
    samples = model.step(out, sched.max_num_batched_tokens, sched.max_num_seqs)
    sched.advance(out)
    sched.update_from_output(out, samples)
    check_invariants(sched)
    return out


def continued_output(request, forced):
    """What the request yields when its output began with `forced` (a fork or a replaced token)."""
    params = dataclasses.replace(
        request.sampling_params, max_tokens=request.sampling_params.max_tokens - len(forced)
    )
    return forced + reference_output(request.prompt_token_ids + forced, params)[0]


def test_forked_request_shares_every_page_and_copies_the_partly_filled_one_when_written():
    sched, model = make_scheduler(page_size=4)
    parent = make_request(0, prompt_len=6, max_tokens=5)
    sched.add_request(parent)
    step(sched, model)
    child = sched.fork_request("r0", "r0+")
    assert child.page_ids == parent.page_ids and all(sched.pool.ref_count(p) == 2 for p in parent.page_ids)
    assert sched.running == [parent, child] and child.num_computed_tokens == parent.num_computed_tokens == 6
    forced = [(parent.output_token_ids[0] + 1) % VOCAB]
    sched.replace_last_token("r0+", forced[0], -0.5, -0.5)
    assert child.output_token_ids == forced and child.cumulative_logprob == -0.5
    out = step(sched, model)
    (full, partial) = parent.page_ids
    assert len(out.copies) == 1 and out.copies[0][0] in (partial, child.page_ids[1])
    assert child.page_ids[0] == full and sched.pool.ref_count(full) == 2 and child.page_ids[1] != partial
    run_to_completion(sched, model)
    assert parent.output_token_ids == reference_output(parent.prompt_token_ids, parent.sampling_params)[0]
    assert child.output_token_ids == continued_output(child, forced)
    assert sched.pool.num_free_pages == sched.pool.num_usable_pages


def test_held_request_is_not_scheduled_until_released():
    sched, model = make_scheduler()
    held, other = make_request(0, 5, max_tokens=4), make_request(1, 7, max_tokens=6)
    sched.add_request(held)
    sched.add_request(other)
    step(sched, model)
    sched.hold("r0")
    before = list(held.output_token_ids)
    for _ in range(3):
        assert [item.request for item in step(sched, model).scheduled] == [other]
    assert held.output_token_ids == before and held.status == RequestStatus.RUNNING
    sched.release("r0")
    run_to_completion(sched, model)
    for r in (held, other):
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params)[0]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_held_requests_give_way_when_nothing_else_can_run(mode):
    # One row: a held request would keep the waiting one out forever.
    pool = PagePool(64)
    sched = Scheduler(
        pool,
        page_size=4,
        max_num_seqs=1,
        max_num_batched_tokens=32,
        max_model_len=128,
        preemption_mode=mode,
        num_swap_pages=16,
    )
    model = FakeModel(4)
    first, second = make_request(0, 9, max_tokens=3), make_request(1, 5, max_tokens=3)
    sched.add_request(first)
    sched.add_request(second)
    step(sched, model)
    sched.hold("r0")
    out = step(sched, model)
    assert out.preempted == [first] and [item.request for item in out.scheduled] == [second]
    assert first.status == (RequestStatus.SWAPPED if mode == "swap" else RequestStatus.PREEMPTED)
    assert bool(out.swap_out) == (mode == "swap") and "r0" in sched.held
    while second.status == RequestStatus.RUNNING:
        step(sched, model)  # the held request stays out while the other one runs
    sched.release("r0")
    run_to_completion(sched, model)
    for r in (first, second):
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params)[0]
    assert pool.num_free_pages == pool.num_usable_pages and sched.kv_cache.num_used_swap_pages == 0


def test_fork_without_a_free_row_or_of_a_queued_parent_waits_and_computes_its_tokens():
    sched, model = make_scheduler(max_num_seqs=1)
    running, queued = make_request(0, 6, max_tokens=4), make_request(1, 5, max_tokens=3)
    sched.add_request(running)
    sched.add_request(queued)
    step(sched, model)
    row_child = sched.fork_request("r0", "r0+")
    queue_child = sched.fork_request("r1", "r1+")
    assert list(sched.waiting) == [row_child, queued, queue_child]
    assert not row_child.page_ids and row_child.num_computed_tokens == 0 and row_child.output_token_ids
    run_to_completion(sched, model)
    assert row_child.output_token_ids == running.output_token_ids
    assert queue_child.output_token_ids == queued.output_token_ids
    assert sched.pool.num_free_pages == sched.pool.num_usable_pages


def test_sample_admitted_in_the_step_its_source_copies_its_page_reads_the_right_tokens():
    # The source copies its partly filled page (shared with a fork) in the step its sibling sample is admitted
    # sharing the copy: the sibling's own copy must come from the original page, as the copies all read the
    # pool as it was before them.
    sched, model = make_scheduler(page_size=4)
    source = make_request(0, prompt_len=6, max_tokens=4)
    sibling = Request("s", source.prompt_token_ids, source.sampling_params, fork_source=source)
    sched.add_request(source)
    sched.add_request(sibling)
    step(sched, model)  # the sibling waits for the source to compute the prompt
    sched.fork_request("r0", "r0+")
    out = step(sched, model)
    assert sibling in [item.request for item in out.scheduled] and len(out.copies) == 2
    run_to_completion(sched, model)
    assert sibling.output_token_ids == source.output_token_ids


def test_replacing_the_pending_token_keeps_its_alternatives():
    sched, model = make_scheduler()
    parent = Request("r", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0, logprobs=2))
    sched.add_request(parent)
    step(sched, model)
    # What the engine records per token: the chosen one first, then the 2 most likely.
    parent.output_top_logprobs.append({7: -3.0, 4: -0.5, 9: -1.0})
    child = sched.fork_request("r", "r+")
    sched.replace_last_token("r+", 9, -1.0, -1.5)
    sched.replace_last_token("r", 5, -2.0, -2.5)
    assert list(child.output_top_logprobs[-1].items()) == [(9, -1.0), (4, -0.5)]
    assert list(parent.output_top_logprobs[-1].items()) == [(5, -2.0), (4, -0.5), (9, -1.0)]
    assert (child.output_logprobs[-1], child.cumulative_logprob, parent.output_logprobs[-1]) == (
        -1.0,
        -1.5,
        -2.0,
    )
