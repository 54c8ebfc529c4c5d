"""Automatic prefix caching: page keys, hits, revival of freed pages, LRU eviction, collisions, and that
caching changes no output."""

import pytest

from jaxpage import LLM, SamplingParams
from jaxpage.page_pool import PageKey, PagePool, page_hashes

TOKENS = list(range(100, 120))


def test_keys_chain_over_the_whole_prefix():
    keys = page_hashes(TOKENS, 4)
    assert len(keys) == 5 and keys[1].token_ids == (104, 105, 106, 107)
    # The same page after a different prefix has another key; an extra key changes every key.
    other = page_hashes([1, 2, 3, 4] + TOKENS[4:], 4)
    assert other[1].token_ids == keys[1].token_ids and other[1].digest != keys[1].digest
    assert all(
        a.digest != b.digest for a, b in zip(keys, page_hashes(TOKENS, 4, extra_key="adapter"), strict=True)
    )
    assert page_hashes(TOKENS[:11], 4) == keys[:2]  # partial pages have no key
    assert page_hashes(TOKENS, 4, known=keys[:2]) == keys


def hold_cached(pool: PagePool, keys: list[PageKey]) -> list[int]:
    pages = pool.allocate(len(keys))
    for page, key in zip(pages, keys, strict=True):
        pool.cache(page, key)
    return pages


def test_freed_pages_are_revived_by_a_hit_and_shared_while_held():
    pool = PagePool(10, enable_prefix_caching=True)
    keys = page_hashes(TOKENS, 4)
    pages = hold_cached(pool, keys[:3])
    assert pool.lookup(keys) == pages  # the first three hit, the rest miss
    assert [pool.ref_count(p) for p in pages] == [2, 2, 2]
    pool.free(pages[::-1])
    pool.free(pages[::-1])
    assert pool.num_free_pages == 9 and pool.num_cached_pages == 3
    assert pool.lookup(keys[:2]) == pages[:2] and pool.num_free_pages == 7
    pool.free(pages[:2][::-1])
    pool.check_invariants([])


def test_a_miss_in_the_middle_ends_the_hit():
    pool = PagePool(10, enable_prefix_caching=True)
    keys = page_hashes(TOKENS, 4)
    pages = hold_cached(pool, [keys[0], keys[2]])
    assert pool.lookup(keys) == pages[:1]
    pool.free([pages[0]])
    pool.free(pages[::-1])
    pool.check_invariants([])


def test_eviction_takes_the_least_recently_freed_page_first():
    pool = PagePool(4, enable_prefix_caching=True)  # 3 usable pages
    keys = page_hashes(TOKENS, 4)
    a, b, c = (hold_cached(pool, [key])[0] for key in keys[:3])
    pool.free([b])
    pool.free([a])
    pool.free([c])
    assert pool.allocate(1) == [b] and pool.num_evictions == 1
    assert pool.lookup(keys[1:2]) == [] and pool.lookup(keys[:1]) == [a]
    assert pool.allocate(1) == [c]  # a was revived, so c is the next oldest free page
    pool.free([a, b, c])
    pool.check_invariants([])


def test_a_colliding_digest_never_returns_other_tokens():
    pool = PagePool(4, enable_prefix_caching=True)
    key = page_hashes(TOKENS, 4)[0]
    (page,) = hold_cached(pool, [key])
    forged = PageKey(key.digest, (1, 2, 3, 4))
    assert pool.lookup([forged]) == [] and pool.ref_count(page) == 1
    pool.free([page])


def test_caching_off_never_hits():
    pool = PagePool(4)
    key = page_hashes(TOKENS, 4)[0]
    (page,) = hold_cached(pool, [key])
    assert pool.num_cached_pages == 0 and pool.lookup([key]) == []
    pool.free([page])


SYSTEM = "You are a helpful assistant who answers briefly and precisely. " * 3
QUESTIONS = ["What is a page?", "Why cache a prefix?", "Name a color.", "Count to three."]


def generate_all(llm, params):
    # One at a time, so later requests find the earlier ones' pages in the cache.
    return [llm.generate(SYSTEM + q, params)[0].outputs[0].token_ids for q in QUESTIONS]


def test_caching_on_and_off_give_the_same_greedy_tokens():
    params = SamplingParams(max_tokens=12, temperature=0)
    on = LLM.from_gin(["configs/tiny_test.gin"])
    off = LLM.from_gin(["configs/tiny_test.gin"], ["EngineConfig.enable_prefix_caching = False"])
    assert generate_all(on, params) == generate_all(off, params)
    hits, query = on.engine.metrics().prefix_hit_tokens, on.engine.metrics().prefix_query_tokens
    system_pages = len(on.tokenizer.encode(SYSTEM)) // on.engine.config.page_size
    # Every request after the first finds at least the system prompt's full pages.
    assert hits >= 3 * system_pages * on.engine.config.page_size and hits < query
    assert off.engine.metrics().prefix_hit_tokens == 0
    # A batch given at once: the first request computes the prefix, the later ones may share it later.
    batched = [o.outputs[0].token_ids for o in on.generate([SYSTEM + q for q in QUESTIONS], params)]
    assert batched == generate_all(off, params)
    for llm in (on, off):
        assert llm.engine.pool.num_free_pages == llm.engine.pool.num_usable_pages


@pytest.mark.slow
def test_smollm2_caching_on_and_off_give_the_same_greedy_tokens():
    params = SamplingParams(max_tokens=8, temperature=0)
    # Small buckets: the 30-layer model compiles few shapes.
    settings = dict(
        num_pages=64, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256,
        token_buckets=(16, 64), seq_buckets=(4,), page_buckets=(16,),
    )  # fmt: skip
    on, off = LLM(**settings), LLM(**settings, enable_prefix_caching=False)
    assert generate_all(on, params) == generate_all(off, params)
    assert on.engine.metrics().prefix_hit_tokens > 0
