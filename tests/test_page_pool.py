"""The page pool: the null page is never handed out, ref counts equal live references, nothing leaks."""

import collections

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from jaxpage.page_pool import PagePool, page_hashes


def test_null_page_is_never_allocated():
    pool = PagePool(5)
    pages = pool.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4]
    assert not pool.can_allocate(1)
    pool.free(pages)
    assert pool.num_free_pages == 4


def test_shared_page_returns_to_free_list_after_last_reference():
    pool = PagePool(4)
    [page] = pool.allocate(1)
    pool.share([page])
    assert pool.ref_count(page) == 2
    pool.free([page])
    assert pool.ref_count(page) == 1 and pool.num_free_pages == 2
    pool.free([page])
    assert pool.ref_count(page) == 0 and pool.num_free_pages == 3


def test_least_recently_freed_page_is_reused_first():
    pool = PagePool(4)
    a, b, c = pool.allocate(3)
    pool.free([b])
    pool.free([a])
    assert pool.allocate(2) == [b, a]


def test_double_free_is_caught():
    pool = PagePool(3)
    pages = pool.allocate(1)
    pool.free(pages)
    with pytest.raises(AssertionError, match="double free"):
        pool.free(pages)


def test_overallocation_is_caught():
    pool = PagePool(3)
    with pytest.raises(AssertionError):
        pool.allocate(3)


@settings(max_examples=200, deadline=None)
@given(
    num_pages=st.integers(2, 12),
    ops=st.lists(st.tuples(st.sampled_from("asf"), st.integers(0, 20)), max_size=60),
)
def test_random_operations_keep_counts_equal_to_references(num_pages, ops):
    pool = PagePool(num_pages)
    tables: list[list[int]] = []  # each a page table holding one reference per page
    for op, arg in ops:
        if op == "a":
            n = arg % (num_pages + 1)
            if pool.can_allocate(n):
                tables.append(pool.allocate(n))
            else:
                assert n > pool.num_free_pages
        elif op == "s" and tables:
            source = tables[arg % len(tables)]
            pool.share(source)
            tables.append(list(source))
        elif op == "f" and tables:
            pool.free(tables.pop(arg % len(tables)))
        pool.check_invariants(tables)
        assert pool.num_used_pages + pool.num_free_pages == num_pages - 1
    for table in tables:
        pool.free(table)
    pool.check_invariants([])
    assert pool.num_free_pages == num_pages - 1


def test_allocation_evicts_the_cached_pages_no_queued_request_wants_first():
    pool = PagePool(5, enable_prefix_caching=True)
    keys = page_hashes(list(range(8)), 2)
    pages = pool.allocate(4)
    for page, key in zip(pages, keys, strict=True):
        pool.cache(page, key)
    pool.free(pages)  # LRU order: pages[0] is evicted first
    pool.wanted = collections.Counter([keys[0].digest, keys[2].digest])
    assert pool.allocate(2) == [pages[1], pages[3]]  # plain LRU would take pages[0] and pages[1]
    assert pool.num_cached_leading(keys) == 1 and pool.evicted == []  # (evictions are kept only for tiers)
    assert pool.allocate(2) == [pages[0], pages[2]]  # only wanted ones are left: oldest first
