"""A request's pages: what the scheduler asks for when it has decided who runs.

The scheduler owns the policy (admission order, token budgets, which request to preempt); this owns the page
pool and every request-level page operation under it: naming a prompt's pages for the prefix cache, taking a
new request's cached (or sibling-shared) prefix, allocating pages for the next tokens with copy-on-write of a
shared page, topping a reservation up, offering newly full pages to the prefix cache, freeing, and the
accounting of swap space; and, with a `KVStore` below the pool, which pages the tiers must save (when they
fill, or when the pool evicts them) and which of a new request's pages the tiers can fill; and, for a request
whose prompt drops tokens from the middle of an earlier one (`Request.kv_shift`), which cached tokens to move
to their new positions. Page contents never pass through here: the device work (copies, swaps, saves, loads,
shifts) is returned as page ids (with the tiers' K/V, for loads) for the engine to run.
"""

import collections

import numpy as np

from jaxpage.kv_shift import token_moves
from jaxpage.kv_tiers import KVStore
from jaxpage.page_pool import PageKey, PagePool, page_hashes
from jaxpage.request import Request, RequestStatus


class KVCacheManager:
    def __init__(
        self,
        pool: PagePool,
        *,
        page_size: int,
        num_swap_pages: int = 0,
        store: KVStore | None = None,
        write_through: bool = False,
    ):
        """write_through: save a page to the tiers when it fills and joins the prefix cache, not when the
        pool evicts it (the save then never lands on the step of the request whose pages evict it)."""
        assert page_size > 0 and num_swap_pages >= 0
        assert store is None or pool.enable_prefix_caching, "tiers below the pool need the prefix cache"
        self.pool = pool
        self.store = store
        pool.keep_evicted = store is not None
        if store is not None and store.lookahead:
            pool.wanted = store.wanted
        self.write_through = write_through and store is not None
        self._filled: list[tuple[int, PageKey]] = []  # pages cached since the last saves (write-through)
        self.page_size = page_size
        self.num_swap_pages = num_swap_pages
        self.num_used_swap_pages = 0
        # Counters for the metrics.
        self.num_prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache at first admission
        self.num_prefix_hit_tokens = 0  # of those, found (cached or shared by a sibling sample)
        self.num_copies = 0
        self.tier_hit_tokens = {"host": 0, "disk": 0}  # of the prefix hits, those loaded from each tier
        self.num_shifted_tokens = 0  # of the prefix hits, those moved from a truncated conversation's K/V
        self.num_prefetched_pages = 0  # pages loaded from host memory for queued requests (look-ahead)
        # Source pages of the last schedule's shifts: held until the engine has dispatched the shifts that
        # read them (the step is launched), so that no page of that step's moves is written before it is read.
        self._shift_sources: list[int] = []

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def name_prompt_pages(self, request: Request) -> None:
        """Names the prompt's full pages by their hash chain, so admission can look them up."""
        if self.pool.enable_prefix_caching:
            request.page_keys = page_hashes(request.prompt_token_ids, self.page_size, request.extra_key)
            if self.store is not None and self.store.lookahead:  # what this request will look up
                request.wanted_keys = request.page_keys[: (request.num_tokens - 1) // self.page_size]
                self.store.want(request.wanted_keys)

    def unwant(self, request: Request) -> None:
        """The request no longer waits for its first admission: the tiers need not keep its pages."""
        if request.wanted_keys:
            self.store.unwant(request.wanted_keys)
            request.wanted_keys = []

    # ---- admission -----------------------------------------------------------------------------------------

    def take_prefix(self, request: Request, keep_free: int = 0, shift: bool = True) -> bool:
        """Gives a request without pages the leading pages it need not compute: a running sibling sample's
        (the samples of one prompt share it) or the prefix cache's. At least the last token is left to
        compute, for its logits. Pages found in the tiers below the pool leave `keep_free` pages free (for the
        tokens the request computes now). With `shift`, a request's `kv_shift` source fills what follows.
        False, taking nothing, when the sibling has not computed the prompt yet."""
        assert not request.page_ids and request.num_computed_tokens == 0, request
        reusable = request.num_tokens - 1
        source = request.fork_source
        if source is not None and source.status == RequestStatus.RUNNING and not request.output_token_ids:
            if source.num_computed_tokens < reusable:
                return False
            request.page_ids = source.page_ids[: self.pages_for(reusable)]
            self.pool.share(request.page_ids)
            request.num_computed_tokens = reusable
        else:
            keys = request.page_keys[: reusable // self.page_size]
            request.page_ids = self.pool.lookup(keys)
            if self.store is not None and len(request.page_ids) < len(keys):
                rest = keys[len(request.page_ids) :]
                found = self.store.lookup(rest, limit=max(0, self.pool.num_free_pages - keep_free))
                pages = self.pool.allocate(len(found))
                request.loads = [
                    (page, key, tier, kv) for page, key, (tier, kv) in zip(pages, rest, found, strict=False)
                ]
                request.page_ids += pages
            request.num_computed_tokens = len(request.page_ids) * self.page_size
            if request.kv_shift is not None and shift and request.page_keys:
                self._take_shifted(request, reusable, keep_free)
        return True

    def _take_shifted(self, request: Request, reusable: int, keep_free: int) -> None:
        """Extends the request's leading pages with fresh ones that its `kv_shift` source fills: the source's
        cached pages (from the pool, or loaded from the tiers) are held, and the moves from them recorded."""
        shift, size = request.kv_shift, self.page_size
        first = len(request.page_ids)
        if first * size >= reusable:
            return
        if request.source_keys is None:
            source = list(shift.source_token_ids)
            request.source_keys = page_hashes(source, size, shift.source_salt)
        last_source = int(shift.source_position(np.array([reusable - 1]))[0])
        keys = request.source_keys[: last_source // size + 1]
        sources = self.pool.lookup(keys)
        if self.store is not None and len(sources) < len(keys):
            rest = keys[len(sources) :]
            # Half the free pages at most for the source's own loads: the rest receives the moved tokens.
            found = self.store.lookup(rest, limit=max(0, self.pool.num_free_pages - keep_free) // 2)
            pages = self.pool.allocate(len(found))
            request.loads += [
                (page, key, tier, kv) for page, key, (tier, kv) in zip(pages, rest, found, strict=False)
            ]
            sources += pages
        end = min(shift.num_reusable(len(sources) * size), reusable) // size
        end = min(end, len(request.page_keys))  # the moved pages are cached under these
        end = min(end, first + max(0, self.pool.num_free_pages - keep_free))
        if end <= first:  # nothing to move: the source pages go back at once
            self.pool.free(sources)
            request.loads = [load for load in request.loads if load[0] not in sources]
            return
        request.shift_sources = sources
        request.page_ids += self.pool.allocate(end - first)
        request.shift_moves = token_moves(shift, first * size, end * size, request.page_ids, sources, size)
        request.num_computed_tokens = end * size

    def prefetch(self, requests: list[Request], keep_free: int) -> list[tuple[int, object]]:
        """The look-ahead from host memory to the device, for queued `requests` in order, while more than
        `keep_free` pages are free: the pages each will look up that the host tier holds are loaded into
        fresh pages and join the prefix cache there, unreferenced, so admission finds them in the pool. They
        stay allocatable; allocation evicts them after the pages no queued request wants, and a request whose
        loaded pages were evicted before its admission gets no second load (the pool is too tight to hold them
        ahead, and loading them every step would only repeat the copy). Returns the loads
        as (page, K/V), for the engine to run before the step."""
        loads = []
        # Counted once: the pages loaded stay free, so the free count does not fall as they are taken, and
        # a later request of the window would take (and overwrite) the pages just loaded for an earlier one.
        spare = self.pool.num_free_pages - keep_free
        for request in requests:
            if spare <= 0:
                break
            keys = request.wanted_keys
            start = self.pool.num_cached_leading(keys)
            if start < request.num_prefetched_keys:
                continue  # pages loaded ahead for it were evicted again: the pool is too tight to keep them
            found = self.store.lookup(keys[start:], limit=spare, disk=False) if start < len(keys) else []
            pages = self.pool.allocate(len(found))
            for page, key, (_, kv) in zip(pages, keys[start:], found, strict=False):  # keys may be more
                self.pool.cache(page, key)
                loads.append((page, kv))
            self.pool.free(pages[::-1])  # the prefix's head is evicted last
            spare -= len(pages)
            if pages:
                request.num_prefetched_keys = start + len(pages)
            self.num_prefetched_pages += len(pages)
        return loads

    def commit_loads(self, request: Request) -> list[tuple[int, object]]:
        """For an admitted request: its pages found in the tiers, as (page, K/V) for the engine to load before
        the step. They join the prefix cache now: every later step runs after the load."""
        loads, request.loads = request.loads, []
        for page, key, _, _ in loads:
            self.pool.cache(page, key)
        return [(page, kv) for page, _, _, kv in loads]

    def commit_shift(self, request: Request) -> np.ndarray | None:
        """For an admitted request: the token moves of its `kv_shift` (see `kv_shift.token_moves`), for the
        engine to run after the loads, or None. The moved pages join the prefix cache under the request's
        own keys (its cache_salt) now: every later step runs after the moves."""
        moves, request.shift_moves = request.shift_moves, None
        self._shift_sources += request.shift_sources
        request.shift_sources = []
        if moves is None:
            return None
        end = request.num_computed_tokens // self.page_size  # the moves fill the pages just before
        for index in range(end - moves.shape[1] // self.page_size, end):
            self.pool.cache(request.page_ids[index], request.page_keys[index])
        return moves

    @property
    def held_shift_sources(self) -> list[int]:
        """Pages held, outside any page table, until the shifts that read them are dispatched."""
        return self._shift_sources

    def release_shift_sources(self) -> None:
        """Called once the step is launched: its shifts were dispatched; their sources may go."""
        self.pool.free(self._shift_sources)
        self._shift_sources = []

    def take_saves(self) -> list[tuple[int, PageKey]]:
        """The pages evicted from the prefix cache (and, writing through, cached) since the last call whose
        K/V the tiers do not hold yet, as (page, key): the engine copies them down before the step writes
        into them."""
        saves = {}
        if self.store is None:
            return []
        for page, key in self.pool.evicted + self._filled:
            if key.digest in self.store:
                self.store.touch(key)
            else:
                saves.setdefault(key.digest, (page, key))
        self.pool.evicted.clear()
        self._filled.clear()
        return list(saves.values())

    def count_prefix_hit(self, request: Request) -> None:
        """For an admitted request: its computed pages count as offered to the prefix cache, and its prefix
        hit is recorded, once per request (not again after a preemption)."""
        request.num_registered_pages = request.num_computed_tokens // self.page_size
        self.unwant(request)
        if request.first_scheduled_time is None:
            self.num_prefix_query_tokens += request.num_prompt_tokens
            self.num_prefix_hit_tokens += request.num_computed_tokens
            request.num_cached_tokens = request.num_computed_tokens
            moves = request.shift_moves
            request.num_shifted_tokens = 0 if moves is None else moves.shape[1]
            self.num_shifted_tokens += request.num_shifted_tokens
            # The request's own pages found in the tiers (not a kv_shift source's, held only to be read).
            sources = set(request.shift_sources)
            tiers = collections.Counter(tier for page, _, tier, _ in request.loads if page not in sources)
            for tier in request.tier_hit_tokens:
                request.tier_hit_tokens[tier] = tiers[tier] * self.page_size
                self.tier_hit_tokens[tier] += tiers[tier] * self.page_size

    def share_all(self, parent: Request, child: Request) -> None:
        """The child takes every page of the parent (a forked beam); both hold them."""
        self.pool.share(parent.page_ids)
        child.page_ids = list(parent.page_ids)

    # ---- pages for the next tokens -------------------------------------------------------------------------

    def allocate(self, request: Request, num_new: int, copies: list[tuple[int, int]]) -> bool:
        """Gives the request pages for its next `num_new` tokens, first copying a shared page it is about to
        write into (appended to `copies` as (source, destination)); False, changing nothing, if too few pages
        are free."""
        first = request.num_computed_tokens
        index = first // self.page_size  # the page the first new token goes to
        cow = index < len(request.page_ids) and self.pool.ref_count(request.page_ids[index]) > 1
        # A cached page is full and computed: only a sibling that forked off before its last token writes
        # into one again (the same token), and then into a private copy.
        assert cow or index >= len(request.page_ids) or not self.pool.is_cached(request.page_ids[index])
        # Reserved pages may already cover the new tokens, but not a shared page's copy.
        needed = max(0, self.pages_for(first + num_new) - len(request.page_ids)) + cow
        if needed == 0:
            return True
        if not self.pool.can_allocate(needed):
            return False
        if cow:
            shared = request.page_ids[index]
            (private,) = self.pool.allocate(1)
            # A sibling sample admitted this step may share a page that is itself a copy made this step; it
            # holds its content only once the copies run, and they all read the pool as it was before them.
            origin = next((src for src, dst in copies if dst == shared), shared)
            copies.append((origin, private))
            self.pool.free([shared])
            request.page_ids[index] = private
            self.num_copies += 1
            needed -= 1
        request.page_ids.extend(self.pool.allocate(needed))
        return True

    def top_up(self, request: Request, num_pages: int) -> bool:
        """Tops the request's pages up to `num_pages` (a reservation); False, taking none, if too few are
        free."""
        missing = num_pages - len(request.page_ids)
        if missing <= 0:
            return True
        if not self.pool.can_allocate(missing):
            return False
        request.page_ids.extend(self.pool.allocate(missing))
        return True

    def cache_full_pages(self, request: Request) -> None:
        """Offers the request's newly full, computed pages to the prefix cache."""
        if not self.pool.enable_prefix_caching or request.status != RequestStatus.RUNNING:
            return
        # Computed tokens are known once the pending ones before them arrived; a page whose K/V a step in
        # flight still writes is read only by later steps, which the device runs after it.
        num_known = request.num_prompt_tokens + request.num_output_tokens
        num_full = min(request.num_computed_tokens, num_known) // self.page_size
        if num_full <= request.num_registered_pages:
            return
        if len(request.page_keys) < num_full:
            tokens = request.all_token_ids[: num_full * self.page_size]
            request.page_keys = page_hashes(tokens, self.page_size, request.extra_key, request.page_keys)
        for index in range(request.num_registered_pages, num_full):
            self.pool.cache(request.page_ids[index], request.page_keys[index])
            if self.write_through:
                self._filled.append((request.page_ids[index], request.page_keys[index]))
        request.num_registered_pages = num_full

    # ---- giving pages back ---------------------------------------------------------------------------------

    def free(self, request: Request) -> None:
        """Gives all of the request's pages back (last first, so the pool hands out the newest last)."""
        self.pool.free(request.page_ids[::-1])
        request.page_ids = []
        request.loads = []  # found in the tiers for an admission that failed: never loaded
        self.pool.free(request.shift_sources)  # held for an admission that failed: never read
        request.shift_sources, request.shift_moves = [], None

    def uncache(self, request: Request) -> None:
        """Takes the request's pages out of the prefix cache and its page names out of the tiers (their K/V
        must not be reused; a page may have been saved down while a step still wrote it)."""
        self.pool.uncache(request.page_ids)
        if self.store is not None:
            self.store.discard(request.page_keys)
        # Nor saved later: a page written through in the step that failed waits here for the next saves.
        names = {key.digest for key in request.page_keys}
        self._filled = [(page, key) for page, key in self._filled if key.digest not in names]

    # ---- swap space ----------------------------------------------------------------------------------------

    def can_swap_out(self, request: Request) -> bool:
        return (
            self.num_used_swap_pages + len(request.page_ids) <= self.num_swap_pages
            and request.num_computed_tokens > 0
        )

    def swap_out(self, request: Request) -> list[int]:
        """Books swap space for all of the request's pages; returns them (to copy to the host before they are
        freed)."""
        pages = list(request.page_ids)
        request.num_swapped_pages = len(pages)
        self.num_used_swap_pages += len(pages)
        return pages

    def swap_in(self, request: Request, num_pages: int) -> list[int] | None:
        """`num_pages` fresh pages for a swapped request; returns the first ones, which receive its swapped
        pages. None, taking nothing, if too few are free."""
        if not self.pool.can_allocate(num_pages):
            return None
        request.page_ids = self.pool.allocate(num_pages)
        swapped = request.page_ids[: request.num_swapped_pages]
        self.release_swap(request)
        return swapped

    def release_swap(self, request: Request) -> None:
        self.num_used_swap_pages -= request.num_swapped_pages
        request.num_swapped_pages = 0
