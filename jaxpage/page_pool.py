"""Host-side bookkeeping of the device KV pool: free pages, reference counts, and the prefix cache.

The prefix cache follows vLLM v1: a full page is named by a hash chain over the tokens up to its end (see
`page_hashes`), a new request looks its leading pages up by those names, and a freed page keeps its name on
the free list, so it can be revived by a later hit until allocation takes it for something else.
"""

import collections
import hashlib
import pickle
from typing import NamedTuple


class PageKey(NamedTuple):
    """The name of one full page. `digest` is a SHA-256 of the whole chain (parent digest, this page's tokens,
    extra key), so two different prefixes never share a digest in practice; `token_ids` is compared on every
    hit anyway, so even a collision could not hand out another prefix's K/V."""

    digest: bytes
    token_ids: tuple[int, ...]


def page_hashes(
    token_ids: list[int], page_size: int, extra_key=None, known: list[PageKey] | None = None
) -> list[PageKey]:
    """The keys of every full page of `token_ids`, extending `known` (the keys of a shorter prefix).

    `extra_key` is anything else that changes the K/V (an adapter name, image hashes); it must be picklable.
    """
    keys = list(known or [])
    parent = keys[-1].digest if keys else b""
    for start in range(len(keys) * page_size, len(token_ids) - page_size + 1, page_size):
        page = tuple(token_ids[start : start + page_size])
        parent = hashlib.sha256(parent + pickle.dumps((page, extra_key))).digest()
        keys.append(PageKey(parent, page))
    return keys


# How far into an LRU order eviction looks for a page no queued request wants, before taking the oldest.
EVICTION_SCAN = 64


def eviction_victim(lru_order, is_wanted):
    """The least recently used item of `lru_order` (oldest first) that `is_wanted` rejects, among the oldest
    `EVICTION_SCAN`; else the oldest. The AttentionStore paper's scheduler-aware eviction: the pages that
    queued requests will look up stay."""
    oldest = None
    for index, item in enumerate(lru_order):
        if index == EVICTION_SCAN:
            break
        if index == 0:
            oldest = item
        if not is_wanted(item):
            return item
    return oldest


class PagePool:
    """A free list and reference counts over pages 1..num_pages-1, with an optional prefix cache.

    Page 0 is the null page: page tables and slot mappings are padded with it and padding tokens write into
    it, so it is never handed out. A page is free exactly when its reference count is 0. Counts above 1 mean
    the page is shared by several page tables (a common prefix, or samples of one prompt), which is why `free`
    decrements rather than releases.
    """

    def __init__(self, num_pages: int, enable_prefix_caching: bool = False):
        assert num_pages >= 2, f"a pool needs the null page and at least one more, got {num_pages}"
        self.num_pages = num_pages
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_pages
        # Freed pages go to the back and allocation takes from the front, so the page freed longest ago is
        # reused (and its cached prefix evicted) first: LRU. An OrderedDict pops the front and removes a
        # revived page from the middle, both in O(1).
        self._free = collections.OrderedDict.fromkeys(range(1, num_pages))
        self._key_of: dict[int, PageKey] = {}  # page -> its key, while it holds a cached full page
        self._page_of: dict[bytes, int] = {}  # digest -> page
        self.num_evictions = 0
        # With a tier below (set by its KVCacheManager): every evicted (page, key), kept until taken, so the
        # page's K/V is saved before the page is written again.
        self.keep_evicted = False
        self.evicted: list[tuple[int, PageKey]] = []
        # Digests that queued requests will look up (set by a KVCacheManager with look-ahead): allocation
        # evicts other cached pages first.
        self.wanted: collections.Counter[bytes] | None = None

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_usable_pages - len(self._free)

    @property
    def num_cached_pages(self) -> int:
        return len(self._key_of)

    def ref_count(self, page_id: int) -> int:
        return self._ref_counts[page_id]

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int]:
        """Takes `num_pages` free pages, each with ref count 1, evicting their cached prefixes. The caller
        checks `can_allocate` first."""
        assert 0 <= num_pages <= len(self._free), f"asked for {num_pages} pages, {len(self._free)} free"
        pages = []
        for _ in range(num_pages):
            page = self._take_free()
            assert self._ref_counts[page] == 0, f"page {page} was on the free list while referenced"
            self._ref_counts[page] = 1
            key = self._key_of.pop(page, None)
            if key is not None:
                del self._page_of[key.digest]
                self.num_evictions += 1
                if self.keep_evicted:
                    self.evicted.append((page, key))
            pages.append(page)
        return pages

    def _take_free(self) -> int:
        if not self.wanted:
            return self._free.popitem(last=False)[0]
        page = eviction_victim(self._free, self._is_wanted)
        del self._free[page]
        return page

    def _is_wanted(self, page: int) -> bool:
        key = self._key_of.get(page)
        return key is not None and key.digest in self.wanted

    def share(self, page_ids: list[int]) -> None:
        """Adds one reference to each page, for another page table that points at it."""
        for page in page_ids:
            assert page != 0 and self._ref_counts[page] > 0, f"cannot share page {page}: it is not allocated"
            self._ref_counts[page] += 1

    def free(self, page_ids: list[int]) -> None:
        """Drops one reference to each page; a page whose last reference goes returns to the free list,
        keeping its cached prefix. Pass a request's pages last-first, so its tail is evicted before its
        head."""
        for page in page_ids:
            assert page != 0 and self._ref_counts[page] > 0, f"double free of page {page}"
            self._ref_counts[page] -= 1
            if self._ref_counts[page] == 0:
                self._free[page] = None

    # ---- prefix cache --------------------------------------------------------------------------------------

    def lookup(self, keys: list[PageKey]) -> list[int]:
        """Takes a reference to the cached pages of the longest run of leading `keys` that all hit, reviving
        free ones, and returns them in order. Empty when caching is off."""
        hits = []
        if not self.enable_prefix_caching:
            return hits
        for key in keys:
            page = self._page_of.get(key.digest)
            if page is None or self._key_of[page].token_ids != key.token_ids:
                break
            hits.append(page)
        for page in hits:
            if self._ref_counts[page] == 0:
                del self._free[page]
            self._ref_counts[page] += 1
        return hits

    def num_cached_leading(self, keys: list[PageKey]) -> int:
        """How many leading `keys` the cache holds, taking no reference."""
        for count, key in enumerate(keys):
            page = self._page_of.get(key.digest)
            if page is None or self._key_of[page].token_ids != key.token_ids:
                return count
        return len(keys)

    def cache(self, page_id: int, key: PageKey) -> None:
        """Records that `page_id` (held, full, its K/V computed) holds the page named `key`. A page already
        cached, or a key already held by another page (two requests computed one prefix), is left as is."""
        assert page_id != 0 and self._ref_counts[page_id] > 0, f"caching page {page_id}, which is not held"
        if not self.enable_prefix_caching or page_id in self._key_of or key.digest in self._page_of:
            return
        self._key_of[page_id] = key
        self._page_of[key.digest] = page_id

    def uncache(self, page_ids: list[int]) -> None:
        """Forgets the prefix-cache names of these pages, so no later request is handed their K/V (a request
        whose computation failed may have written garbage into them)."""
        for page in page_ids:
            key = self._key_of.pop(page, None)
            if key is not None:
                del self._page_of[key.digest]

    def is_cached(self, page_id: int) -> bool:
        return page_id in self._key_of

    def check_invariants(self, page_tables: list[list[int]]) -> None:
        """Asserts that the counts equal the references held by `page_tables` (every live table), that the
        free list holds exactly the unreferenced pages, once each, and that the cache maps are each other's
        inverse. Costs O(num_pages); meant for tests."""
        expected = collections.Counter(page for table in page_tables for page in table)
        assert 0 not in expected, "the null page is in a page table"
        for page in range(1, self.num_pages):
            assert self._ref_counts[page] == expected.get(page, 0), (
                f"page {page}: ref count {self._ref_counts[page]}, held by {expected.get(page, 0)} tables"
            )
        assert set(self._free) == {p for p in range(1, self.num_pages) if self._ref_counts[p] == 0}
        assert 0 not in self._free and 0 not in self._key_of
        assert {k.digest: p for p, k in self._key_of.items()} == self._page_of
