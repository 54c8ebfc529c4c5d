"""The page side of scheduling (jaxpage/kv_cache_manager.py), without a scheduler: a prefix taken from the
cache, copy-on-write of a shared page, and swap-space accounting. The scheduler's own tests and the pool
property test cover the same operations inside whole schedules."""

from jaxpage.kv_cache_manager import KVCacheManager
from jaxpage.kv_tiers import KVStore
from jaxpage.page_pool import PagePool, page_hashes
from jaxpage.request import Request, RequestStatus
from jaxpage.sampling_params import SamplingParams

PAGE = 4


def _request(request_id, prompt):
    return Request(request_id, list(prompt), SamplingParams(max_tokens=8, temperature=0))


def _manager(num_pages=16, num_swap_pages=0):
    pool = PagePool(num_pages, enable_prefix_caching=True)
    return KVCacheManager(pool, page_size=PAGE, num_swap_pages=num_swap_pages)


def test_a_prompt_takes_the_cached_pages_of_an_earlier_one_but_computes_its_last_token():
    kv = _manager()
    first = _request("a", range(10))
    kv.name_prompt_pages(first)
    assert kv.take_prefix(first) and first.page_ids == [] and first.num_computed_tokens == 0
    assert kv.allocate(first, 10, copies := [])
    first.status, first.num_computed_tokens = RequestStatus.RUNNING, 10
    kv.cache_full_pages(first)  # pages 0 and 1 are full
    kv.free(first)

    second = _request("b", range(8))  # the same 8 tokens: two full pages, but its last token is computed
    kv.name_prompt_pages(second)
    assert kv.take_prefix(second)
    assert second.num_computed_tokens == PAGE and len(second.page_ids) == 1
    kv.count_prefix_hit(second)
    second.first_scheduled_time = 1.0  # as the scheduler stamps it: a readmission after preemption
    kv.count_prefix_hit(second)  # counts nothing again
    assert kv.num_prefix_hit_tokens == PAGE and kv.num_prefix_query_tokens == 8
    assert copies == []


def test_writing_into_a_shared_page_copies_it_first():
    kv = _manager()
    parent = _request("p", range(6))
    assert kv.allocate(parent, 6, [])
    parent.num_computed_tokens = 6
    child = _request("c", range(6))
    kv.share_all(parent, child)
    child.num_computed_tokens = 6
    assert kv.pool.ref_count(parent.page_ids[1]) == 2
    copies = []
    assert kv.allocate(child, 1, copies)  # token 6 goes into the shared, partly filled page 1
    assert copies == [(parent.page_ids[1], child.page_ids[1])] and kv.num_copies == 1
    assert child.page_ids[0] == parent.page_ids[0] and child.page_ids[1] != parent.page_ids[1]
    assert kv.pool.ref_count(parent.page_ids[1]) == 1


def test_swap_space_is_booked_on_swap_out_and_given_back_on_swap_in():
    kv = _manager(num_pages=8, num_swap_pages=3)
    request = _request("s", range(10))
    assert kv.allocate(request, 10, [])
    request.num_computed_tokens = 10
    assert kv.can_swap_out(request)
    pages = kv.swap_out(request)
    kv.free(request)
    assert len(pages) == 3 and kv.num_used_swap_pages == 3 and request.num_swapped_pages == 3
    assert not kv.can_swap_out(_request("t", range(2)))  # nothing computed: recomputing costs nothing
    back = kv.swap_in(request, 4)  # one more page than it had: its next token opens a page
    assert len(back) == 3 and len(request.page_ids) == 4 and back == request.page_ids[:3]
    assert kv.num_used_swap_pages == 0 and request.num_swapped_pages == 0
    assert kv.swap_in(_request("u", range(2)), 100) is None


def test_the_look_ahead_loads_a_queued_requests_history_from_host_memory_into_the_pool():
    kv = KVCacheManager(PagePool(16, enable_prefix_caching=True), page_size=PAGE, store=KVStore(8))
    request = _request("q", range(13))  # 3 full pages before its last token
    for i, key in enumerate(page_hashes(list(range(13)), PAGE)):
        kv.store.save(key, f"kv{i}")
    kv.name_prompt_pages(request)  # it is queued
    assert [data for _, data in kv.prefetch([request], keep_free=13)] == ["kv0", "kv1"]  # 15 free, 13 kept
    loads = kv.prefetch([request], keep_free=0)
    assert [data for _, data in loads] == ["kv2"] and kv.num_prefetched_pages == 3
    assert kv.pool.num_free_pages == 15  # the loaded pages are cached but free
    assert kv.prefetch([request], keep_free=0) == []  # nothing left to load
    assert kv.take_prefix(request) and request.loads == [] and request.num_computed_tokens == 12


def test_pages_loaded_ahead_and_evicted_before_admission_are_not_loaded_again():
    kv = KVCacheManager(PagePool(8, enable_prefix_caching=True), page_size=PAGE, store=KVStore(8))
    request = _request("q", range(13))
    for i, key in enumerate(page_hashes(list(range(13)), PAGE)):
        kv.store.save(key, f"kv{i}")
    kv.name_prompt_pages(request)
    assert len(kv.prefetch([request], keep_free=0)) == 3
    running = _request("r", range(100, 128))
    assert kv.allocate(running, 28, [])  # takes all 7 pages: the loaded ones are evicted too
    kv.free(running)
    assert kv.prefetch([request], keep_free=0) == []  # the pool cannot hold them ahead: admission loads them
    assert kv.take_prefix(request) and len(request.loads) == 3


def test_the_look_ahead_of_several_requests_gives_each_page_one_load_within_the_bound():
    """The pages loaded for one queued request stay free: the next one must not take (and overwrite) them,
    nor may all of them together leave fewer than `keep_free` pages that hold nothing wanted."""
    kv = KVCacheManager(PagePool(21, enable_prefix_caching=True), page_size=PAGE, store=KVStore(64))
    requests = [_request(name, range(start, start + 61)) for name, start in (("a", 0), ("b", 1000))]
    for request in requests:  # 15 full pages each before the last token
        for i, key in enumerate(page_hashes(list(request.prompt_token_ids), PAGE)):
            kv.store.save(key, (request.request_id, i))
        kv.name_prompt_pages(request)
    loads = kv.prefetch(requests, keep_free=5)
    pages = [page for page, _ in loads]
    assert len(pages) == len(set(pages)) == 15  # 20 free, 5 kept
    assert [data for _, data in loads] == [("a", i) for i in range(15)]
    assert kv.pool.num_cached_leading(requests[0].wanted_keys) == 15
