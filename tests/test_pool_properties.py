"""Random operation sequences over the scheduler and its page pool with every feature at once: prefix caching,
samples of one prompt sharing pages with copy-on-write, recompute and swap preemption, abort, and what beam
search does between steps: forking a request (its pages shared), replacing its pending token, holding it;
and requests whose prompt drops tokens from the middle of an earlier one's, whose cached pages move.

After every operation: reference counts equal the live page tables' references, no page is both free and held,
cached pages hold the tokens of their key, swap space is accounted for. At the end the pool is full again and
every request that was not aborted produced exactly what it would alone (the fake model checks every token it
reads from the pages). A second test runs the same operations over tiers below the pool (host memory, then
disk): evicted pages are saved down and prefix lookups load them back, and no tier grows past its size. Host
only; about 12,000 operations in each test.
"""

import collections
import dataclasses
import tempfile

import hypothesis.strategies as st
from fake_kv_model import EOS, VOCAB, FakeKVModel, next_token
from hypothesis import given, settings

from jaxpage.kv_shift import KVShift
from jaxpage.kv_tiers import DiskTier, KVStore
from jaxpage.page_pool import PagePool
from jaxpage.request import Request, RequestStatus
from jaxpage.sampling_params import SamplingParams, sample_seed
from jaxpage.scheduler import Scheduler

MAX_MODEL_LEN = 48
PREFIXES = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [2, 7, 1, 8, 2, 8, 1, 8], [9]]


def salt(request: Request) -> int:
    return request.sampling_params.seed


def expected_output(request: Request, forced: list[int]) -> tuple[list[int], str]:
    """What the request yields after `forced`, its output tokens when last forked or replaced: the fake
    model's tokens from there on, with every stop applied to them (none to the forced ones)."""
    params = request.sampling_params
    tokens, out = request.prompt_token_ids + forced, list(forced)
    while True:
        token = next_token(tokens, salt(request))
        tokens.append(token)
        out.append(token)
        if token == EOS:
            return out, "stop"
        if len(out) >= params.max_tokens or len(tokens) >= MAX_MODEL_LEN:
            return out, "length"


def check_tiers(store: KVStore) -> None:
    assert store.num_host_pages <= store.host_capacity_pages
    for key, kv in store.host_entries():  # a tier hit must hand out exactly the tokens of its key
        assert [token for _, token in kv] == list(key.token_ids)
    if store.disk is not None:
        assert len(store.disk) <= store.disk.capacity_pages


def check_invariants(sched: Scheduler, model: FakeKVModel) -> None:
    pool = sched.pool
    if sched.kv_cache.store is not None:
        check_tiers(sched.kv_cache.store)
        # The look-ahead wants exactly the pages of the requests never admitted yet.
        wanted = collections.Counter(key.digest for r in sched.requests.values() for key in r.wanted_keys)
        assert sched.kv_cache.store.wanted == wanted
        assert not any(r.wanted_keys for r in sched.running)
    assert sched.held <= set(sched.requests)
    pool.check_invariants([r.page_ids for r in sched.running] + [sched.kv_cache.held_shift_sources])
    for r in sched.waiting:
        assert not r.page_ids and r.status != RequestStatus.RUNNING
        assert r.status == RequestStatus.SWAPPED or r.num_computed_tokens == 0
    for r in sched.running:
        assert len(r.page_ids) == -(-r.num_computed_tokens // sched.page_size), r
    swapped = [r for r in sched.waiting if r.status == RequestStatus.SWAPPED]
    assert (
        sched.kv_cache.num_used_swap_pages
        == sum(r.num_swapped_pages for r in swapped)
        <= sched.kv_cache.num_swap_pages
    )
    assert set(model.host) == {r.request_id for r in swapped}
    for page, key in pool._key_of.items():  # a hit must hand out exactly the tokens of its key
        assert [token for _, token in model.page(page)] == list(key.token_ids), page


def operations(kinds: list[str]):
    """70-90 random operations, each (kind, then the arguments the kinds take)."""
    return st.lists(
        st.tuples(
            st.sampled_from(kinds),
            st.integers(0, 2),  # prefix
            st.integers(0, 6),  # suffix length
            st.integers(1, 3),  # samples
            st.integers(1, 10),  # max_tokens
            st.integers(0, 99),  # which request to abort, fork, replace, hold or release
        ),
        min_size=70,
        max_size=90,
    )


@settings(max_examples=150, deadline=None)
@given(
    num_pages=st.integers(10, 40),
    page_size=st.sampled_from([1, 2, 4]),
    max_num_seqs=st.integers(1, 6),
    max_num_batched_tokens=st.integers(6, 40),
    caching=st.booleans(),
    mode=st.sampled_from(["recompute", "swap"]),
    num_swap_pages=st.integers(0, 30),
    ops=operations(["add", "step", "step", "step", "step", "abort", "fork", "replace", "hold", "shift"]),
)
def test_random_operations_keep_the_pool_consistent_and_outputs_exact(
    num_pages, page_size, max_num_seqs, max_num_batched_tokens, caching, mode, num_swap_pages, ops
):
    run_operations(
        num_pages, page_size, max_num_seqs, max_num_batched_tokens, caching, mode, num_swap_pages, ops
    )


@settings(max_examples=150, deadline=None)
@given(
    num_pages=st.integers(6, 24),
    page_size=st.sampled_from([1, 2, 4]),
    max_num_seqs=st.integers(1, 6),
    max_num_batched_tokens=st.integers(6, 40),
    mode=st.sampled_from(["recompute", "swap"]),
    host_pages=st.integers(1, 12),
    disk_pages=st.sampled_from([None, 1, 4, 30]),
    lookahead=st.booleans(),
    write_through=st.booleans(),
    ops=operations(
        ["add", "add", "step", "step", "step", "step", "abort", "fork", "replace", "hold", "shift"]
    ),
)
def test_random_operations_over_host_and_disk_tiers_keep_them_consistent_and_outputs_exact(
    num_pages,
    page_size,
    max_num_seqs,
    max_num_batched_tokens,
    mode,
    host_pages,
    disk_pages,
    lookahead,
    write_through,
    ops,
):
    with tempfile.TemporaryDirectory() as directory:
        disk = None if disk_pages is None else DiskTier(directory, disk_pages, {"model": "fake"})
        store = KVStore(host_pages, disk, lookahead)
        sizes = (num_pages, page_size, max_num_seqs, max_num_batched_tokens)
        run_operations(*sizes, True, mode, 8, ops, store, write_through)
        store.close()
        if disk is not None:
            assert len(list(disk.directory.glob("*.kv"))) == len(disk) <= disk_pages


def run_operations(
    num_pages,
    page_size,
    max_num_seqs,
    max_num_batched_tokens,
    caching,
    mode,
    num_swap_pages,
    ops,
    store=None,
    write_through=False,
):
    pool = PagePool(num_pages, enable_prefix_caching=caching)
    sched = Scheduler(
        pool,
        page_size=page_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=MAX_MODEL_LEN,
        preemption_mode=mode,
        num_swap_pages=num_swap_pages,
        store=store,
        write_through=write_through,
    )
    model = FakeKVModel(page_size)
    added: list[Request] = []
    aborted: set[str] = set()
    forced: dict[str, list[int]] = {}  # request id -> its output when last forked or replaced

    def step():
        out = sched.schedule()
        if out.is_empty:
            assert set(sched.requests) <= sched.held, "unfinished requests but nothing scheduled: a deadlock"
            return
        assert not any(item.request.request_id in sched.held for item in out.scheduled)
        assert out.num_scheduled_tokens <= max_num_batched_tokens and len(out.scheduled) <= max_num_seqs
        samples = model.step(out, salt, store)
        sched.advance(out)
        sched.update_from_output(out, samples)

    for index, (op, prefix, suffix, n, max_tokens, which) in enumerate(ops):
        if op == "add":
            prompt = PREFIXES[prefix] + [(index * 7 + j) % 40 + 1 for j in range(suffix)]
            params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=[EOS])
            group = []
            for i in range(n):
                sample_params = dataclasses.replace(params, seed=sample_seed(index, i))
                source = group[0] if group else None
                group.append(Request(f"r{index}/{i}", prompt, sample_params, fork_source=source))
            for request in group:
                try:
                    sched.add_request(request)
                    added.append(request)
                except ValueError:
                    assert request.request_id not in sched.requests
        elif op == "shift" and caching and added:
            # A conversation truncated in the middle: an earlier request's tokens without some after the
            # first `keep`, then one more; its cached pages move to the new positions.
            source = added[which % len(added)]
            tokens = source.all_token_ids
            keep, drop = which % 5, 1 + suffix
            if keep + drop < len(tokens):
                shift = KVShift(tuple(tokens), keep, drop, source.extra_key)
                prompt = tokens[:keep] + tokens[keep + drop :] + [index % 40 + 1]
                params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=[EOS])
                params = dataclasses.replace(params, seed=sample_seed(index, 0))
                request = Request(f"r{index}/s", prompt, params, extra_key=f"s{index}", kv_shift=shift)
                try:
                    sched.add_request(request)
                    added.append(request)
                except ValueError:
                    assert request.request_id not in sched.requests
        elif op == "step" and sched.has_unfinished_requests:
            step()
        elif op == "abort" and added:
            victim = added[which % len(added)]
            if sched.finish_request(victim.request_id, RequestStatus.FINISHED_ABORTED) is not None:
                aborted.add(victim.request_id)
                model.host.pop(victim.request_id, None)  # what the engine does with its swap copy
        elif op in ("fork", "replace", "hold") and sched.requests:
            ids = sorted(sched.requests)
            request = sched.requests[ids[which % len(ids)]]
            if op == "fork":
                request = sched.fork_request(request.request_id, f"{request.request_id}+{index}")
                added.append(request)
            if op == "hold":
                (sched.release if request.request_id in sched.held else sched.hold)(request.request_id)
            elif request.output_token_ids:  # a fork or a replace: the pending token becomes another
                token = (request.output_token_ids[-1] + 1 + which) % VOCAB
                sched.replace_last_token(request.request_id, token, -1.0, request.cumulative_logprob)
                forced[request.request_id] = list(request.output_token_ids)
            else:
                forced[request.request_id] = []
        check_invariants(sched, model)

    for request_id in list(sched.held):
        sched.release(request_id)
    while sched.has_unfinished_requests:
        step()
        check_invariants(sched, model)
    assert pool.num_free_pages == pool.num_usable_pages and sched.kv_cache.num_used_swap_pages == 0
    for request in added:
        expected, reason = expected_output(request, forced.get(request.request_id, []))
        if request.request_id in aborted:
            assert request.output_token_ids == expected[: request.num_output_tokens]
        else:
            assert (request.output_token_ids, request.status.finish_reason) == (expected, reason)
