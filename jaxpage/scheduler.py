"""Iteration-level continuous batching: which tokens of which requests run in the next step.

Every request only has `num_computed_tokens`; each step the scheduler hands out token counts under a budget.
A decoding request asks for 1 token, a new one for its whole prompt, and a prompt longer than what is left of
the budget gets a chunk now and the rest later (chunked prefill), so prefill and decode share one step. A
prefill chunk never takes the token that a decoding request behind it needs, so decoding never stalls.

Pages come from a `KVCacheManager` over the page pool: a new request first takes the leading full pages of its
prompt from the prefix cache (or, for the samples of one prompt, from the sample admitted first); a page
shared by several requests is copied before one of them writes into it (copy-on-write). When the pool runs
dry, the most recently admitted request is preempted: its pages are freed and it recomputes later, or
(preemption_mode "swap") they are copied to host memory and back. With tiers below the pool (a `KVStore`),
cached pages are saved to them (when they fill, or when the pool evicts them), and a prefix lookup that misses
the pool continues there; the pages it finds are loaded into fresh pages. The device work is listed in
`SchedulerOutput`; the engine runs it before the step, in the order saves, swap out, swap in, loads, shifts,
copies.

Beam search needs three more operations between steps: `fork_request` (a new request sharing all of a
request's pages and tokens), `replace_last_token` (the last token, sampled but not yet computed, becomes
another candidate) and `hold`/`release` (a beam that has its candidates waits, unscheduled, until its
siblings have theirs). A held request is never scheduled, but it can be preempted; when nothing else can run,
held requests give their pages and rows up, newest first, so a group of beams never waits on itself.
"""

import collections
import dataclasses
import itertools
import time

import numpy as np

from jaxpage.kv_cache_manager import KVCacheManager
from jaxpage.kv_tiers import KVStore
from jaxpage.page_pool import PageKey, PagePool
from jaxpage.request import Request, RequestStatus

PREEMPTION_MODES = ("recompute", "swap")


@dataclasses.dataclass
class ScheduledRequest:
    """Row of a step: the request's tokens `first : first + num_new_tokens` run now.

    `first` is `request.num_computed_tokens` when scheduled. Pages for those tokens are already in
    `request.page_ids`.
    """

    request: Request
    num_new_tokens: int
    first: int = dataclasses.field(init=False)
    # Whether the step reaches the end of the request's tokens, so that its sampled token is kept.
    samples_token: bool = dataclasses.field(init=False)
    # Tokens the row samples in a multi-step decode call (`SchedulerOutput.decode_steps`): it computes its
    # one new token and then each sampled one but the last. 1 in every other step.
    num_steps: int = dataclasses.field(init=False, default=1)

    def __post_init__(self):
        self.first = self.request.num_computed_tokens
        self.samples_token = self.first + self.num_new_tokens == self.request.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # row b of the step's batch, in running order
    preempted: list[Request]  # pages taken back this step (recomputed or swapped when readmitted)
    # Device work to do before the step, in this order (see the module docstring):
    # (page, key): cached pages (evicted, or filled) whose K/V goes down to the tiers, read before anything
    # writes them.
    saves: list[tuple[int, PageKey]] = dataclasses.field(default_factory=list)
    swap_out: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # request id -> pages to host
    swap_in: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # request id -> pages from host
    loads: list[tuple[int, object]] = dataclasses.field(default_factory=list)  # (page, K/V from a tier)
    # Token moves of requests whose prompt drops tokens from an earlier one (kv_shift.token_moves), after the
    # loads (a source may be a page just loaded).
    shifts: list = dataclasses.field(default_factory=list)
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (src, dst) copy-on-write
    # > 1: every row decodes, and the device runs this many forward passes and samples in one call, row b
    # taking part in the first `scheduled[b].num_steps` of them (see `Scheduler._extend_decode_steps`).
    decode_steps: int = 1

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """FCFS continuous batching over a `PagePool`, with prefix sharing and preemption.

    Running requests are served first, in admission order. When one of them needs a page and none is free,
    the most recently admitted request gives its pages back and returns to the head of the queue, so it is the
    first to be readmitted and never starves. Waiting requests are admitted in arrival order while a row, the
    token budget and pages allow; the head of the queue blocks the ones behind it, so none is overtaken.
    """

    # Queued requests whose history the look-ahead loads from host memory into free device pages each step.
    PREFETCH_WINDOW = 16

    def __init__(
        self,
        pool: PagePool,
        *,
        page_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        preemption_mode: str = "recompute",
        num_swap_pages: int = 0,
        reserve_max_tokens: bool = False,
        store: KVStore | None = None,
        write_through: bool = False,
        decode_steps: int = 1,
    ):
        """reserve_max_tokens: admit a request only with the pages of its whole prompt + max_tokens (within
        max_model_len), the contiguous-allocation baseline that paging is measured against.
        decode_steps: `EngineConfig.decode_steps`."""
        assert page_size > 0 and max_num_seqs > 0 and max_num_batched_tokens > 0 and max_model_len >= 2
        assert preemption_mode in PREEMPTION_MODES and num_swap_pages >= 0
        self.pool = pool  # read here for its size; every change goes through the manager
        self.kv_cache = KVCacheManager(
            pool, page_size=page_size, num_swap_pages=num_swap_pages, store=store, write_through=write_through
        )
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.preemption_mode = preemption_mode
        self.reserve_max_tokens = reserve_max_tokens
        self.decode_steps = decode_steps
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # admission order; preemption takes from the end
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.held: set[str] = set()  # ids of requests not to be scheduled until released (see `hold`)
        # Counters for the metrics.
        self.num_preemptions = 0
        self.num_swap_outs = 0
        self.num_swap_ins = 0

    # ---- requests in and out -------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queues a request. Raises ValueError, holding nothing, if it could never run."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        num_prompt = request.num_prompt_tokens
        if num_prompt >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_prompt} tokens, which leaves no room to generate within max_model_len "
                f"({self.max_model_len})"
            )
        room = self.max_model_len - num_prompt
        if request.sampling_params.min_tokens > room:
            raise ValueError(
                f"min_tokens ({request.sampling_params.min_tokens}) cannot be met: the prompt has "
                f"{num_prompt} tokens, which leaves room for {room} output tokens within max_model_len "
                f"({self.max_model_len})"
            )
        # A request that cannot fit the whole pool on its own would preempt itself forever. (Alone it shares
        # no page it writes into, so it needs no copy-on-write page either.)
        needed = self._max_pages(request)
        if needed > self.pool.num_usable_pages:
            raise ValueError(
                f"prompt ({num_prompt} tokens) + max_tokens ({request.sampling_params.max_tokens}) needs "
                f"{needed} KV pages of {self.page_size} tokens, but the pool has {self.pool.num_usable_pages}"
            )
        assert (
            request.status == RequestStatus.WAITING
            and not request.page_ids
            and request.num_computed_tokens == 0
        )
        self.kv_cache.name_prompt_pages(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Ends a request early (abort, or a stop string found by the detokenizer); frees its pages (and its
        swap space) at once. Unknown or already finished ids are ignored (None), since a caller may race a
        natural finish."""
        assert status.is_finished
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, status)
        return request

    def fail_request(self, request_id: str) -> Request | None:
        """Ends a request whose step produced garbage (non-finite logits). Pages are named in the prefix cache
        only after a step whose logits were finite, so none of its garbage should be named; its pages still
        leave the cache before they are freed, so that no later request could take K/V it wrote. Unknown
        ids are ignored (None)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.kv_cache.uncache(request)
        self._finish(request, RequestStatus.FINISHED_ERROR)
        return request

    # ---- beams: fork, replace, hold ------------------------------------------------------------------------

    def fork_request(self, parent_id: str, request_id: str) -> Request:
        """A new request with the tokens of `parent_id` (an unfinished request), between steps.

        A running parent shares all its pages with the child (their reference counts go up), and the child
        runs right behind it; the partly filled last page is copied by whichever of the two writes into it
        first. A parent that holds no pages (queued, preempted, swapped), or a full set of rows, makes the
        child wait at the parent's place in the queue and compute its tokens when admitted.
        """
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        parent = self.requests[parent_id]
        assert parent.num_pending_tokens == 0, parent  # beams run synchronous steps
        child = Request(
            request_id,
            parent.prompt_token_ids,
            parent.sampling_params,
            parent.eos_token_ids,
            extra_key=parent.extra_key,
        )
        child.output_token_ids = list(parent.output_token_ids)
        child.output_logprobs = list(parent.output_logprobs)
        child.output_top_logprobs = list(parent.output_top_logprobs)
        child.prompt_logprobs = list(parent.prompt_logprobs)
        child.cumulative_logprob = parent.cumulative_logprob
        child.page_keys = list(parent.page_keys)  # names of pages of tokens the two have in common
        child.num_cached_tokens = parent.num_cached_tokens
        child.arrival_time = parent.arrival_time
        child.first_scheduled_time = parent.first_scheduled_time
        child.first_token_time = parent.first_token_time
        self.requests[request_id] = child
        if parent.status == RequestStatus.RUNNING and len(self.running) < self.max_num_seqs:
            self.kv_cache.share_all(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_registered_pages = parent.num_registered_pages
            child.status = RequestStatus.RUNNING
            self.running.insert(self.running.index(parent) + 1, child)
        elif parent.status == RequestStatus.RUNNING:
            self.waiting.appendleft(child)  # as old as its parent, so ahead of every waiting request
        else:
            self.waiting.insert(self.waiting.index(parent) + 1, child)
        return child

    def replace_last_token(self, request_id: str, token_id: int, logprob: float, cumulative_logprob: float):
        """Makes `token_id` the request's last output token in place of the one sampled for it, which is not
        computed yet (its K/V is written when the request next runs). No stop is applied to it here."""
        request = self.requests[request_id]
        assert request.output_token_ids and request.num_pending_tokens == 0, request
        assert request.num_computed_tokens < request.num_tokens, request
        request.output_token_ids[-1] = token_id
        k = request.sampling_params.logprobs
        if k is not None:
            request.output_logprobs[-1] = logprob
        if k is not None and request.output_top_logprobs:
            # {chosen: logprob, then the k most likely}: the alternatives stay, the chosen token changes.
            top = sorted(request.output_top_logprobs[-1].items(), key=lambda item: -item[1])[:k]
            request.output_top_logprobs[-1] = {token_id: logprob, **dict(top)}
        request.cumulative_logprob = cumulative_logprob

    def hold(self, request_id: str) -> None:
        """Keeps an unfinished request from being scheduled (or admitted) until `release`; it keeps its pages
        unless it is preempted. A beam that has its candidates waits so for the rest of its group."""
        assert request_id in self.requests, request_id
        self.held.add(request_id)

    def release(self, request_id: str) -> None:
        self.held.discard(request_id)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_stored_tokens(self) -> int:
        """Tokens whose K/V sits in pages; with `pool.num_used_pages * page_size` it gives the KV waste."""
        return sum(request.num_computed_tokens for request in self.running)

    # ---- one step ------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        out = SchedulerOutput(scheduled=[], preempted=[])
        self.kv_cache.release_shift_sources()  # held for a step whose launch failed

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.request_id in self.held or self._reaches_length_limit(request):
                i += 1
                continue
            remaining = request.num_tokens - request.num_computed_tokens
            assert remaining > 0, f"{request} is running with nothing to compute"
            # Keep one token of the budget for every decoding request behind this one.
            reserve = 0 if remaining == 1 else sum(self._is_decoding(r) for r in self.running[i + 1 :])
            num_new = min(remaining, budget - reserve)
            if num_new <= 0:
                i += 1
                continue
            # Victims come from the end of `running`, behind `request`, so none was scheduled this step yet.
            while not self.kv_cache.allocate(request, num_new, out.copies):
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is request:
                    break
            if request.status == RequestStatus.RUNNING:
                out.scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
                i += 1

        # Admitting right after a preemption would only hand the freed pages to a newer request.
        if not out.preempted:
            budget = self._admit_waiting(budget, out)
        # Nothing could run: the running requests are all held (beams waiting for their siblings) and the
        # queue's head, perhaps such a sibling, cannot get in. The held ones give way, newest first; their
        # candidates are known already, so only their K/V is recomputed (or swapped back) later.
        held = [r for r in self.running if r.request_id in self.held]
        while not out.scheduled and held and self._first_waiting() is not None:
            victim = held.pop()
            self.running.remove(victim)
            self._preempt(victim, out)
            budget = self._admit_waiting(budget, out)
        if out.scheduled and self.kv_cache.store is not None and self.kv_cache.store.lookahead:
            # Only the head of the queue: a long queue's later requests wait long enough to be evicted again.
            queued = [r for r in itertools.islice(self.waiting, self.PREFETCH_WINDOW) if r.wanted_keys]
            # What the next step may allocate stays free of them.
            keep_free = self.kv_cache.pages_for(self.max_num_batched_tokens) + self.max_num_seqs
            out.loads += self.kv_cache.prefetch(queued, keep_free)
        if self.decode_steps > 1 and not self.waiting and not out.preempted:
            self._extend_decode_steps(out)
        out.saves = self.kv_cache.take_saves()  # after every allocation: it may have evicted cached pages
        return out

    def _extend_decode_steps(self, out: SchedulerOutput) -> None:
        """Makes a step whose rows all decode a multi-step call: each row samples up to `decode_steps` tokens,
        as many as max_tokens and max_model_len leave it, and gets the pages they need. Left a step of one
        when some row needs the host between tokens, when no row may take all `decode_steps` tokens, or when
        the pool cannot give every row its pages."""
        steps = []
        for item in out.scheduled:
            request, params = item.request, item.request.sampling_params
            if (
                item.num_new_tokens != 1
                or not item.samples_token
                or params.stop  # a stop string cuts the text at the token that completes it
                or params.logprobs is not None
                or params.prompt_logprobs is not None
                or params.use_beam_search
                or params.repetition_penalty != 1
                or params.presence_penalty != 0
                or params.frequency_penalty != 0
            ):
                return
            left = min(
                params.max_tokens - request.num_sampled_tokens, self.max_model_len - request.num_tokens
            )
            steps.append(min(self.decode_steps, left))
        if max(steps, default=1) < self.decode_steps:  # the call would run passes no row takes part in
            return
        # All the pages or none: pages taken ahead for some rows would only crowd the next steps.
        pages_for = self.kv_cache.pages_for
        needed = sum(
            max(0, pages_for(item.first + n) - len(item.request.page_ids))
            for item, n in zip(out.scheduled, steps, strict=True)
        )
        if not self.pool.can_allocate(needed):
            return
        for item, num_steps in zip(out.scheduled, steps, strict=True):
            # No copy-on-write: the step's own allocation has made the page written first private.
            allocated = self.kv_cache.allocate(item.request, num_steps, out.copies)
            assert allocated, item
            item.num_steps = num_steps
        out.decode_steps = self.decode_steps

    def _first_waiting(self) -> Request | None:
        return next((r for r in self.waiting if r.request_id not in self.held), None)

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> int:
        """Admits waiting requests in order (held ones are passed over) while rows, budget and pages allow;
        returns the budget left."""
        while budget > 0 and len(self.running) < self.max_num_seqs:
            request = self._first_waiting()
            if request is None or not self._admit(request, budget, out):
                break
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            budget -= out.scheduled[-1].num_new_tokens
        return budget

    def advance(self, output: SchedulerOutput) -> None:
        """Marks the step's tokens computed once it is launched: each row that samples gets one pending token
        (a multi-step call's row `num_steps`, of which it computes all but the last), whose values
        `update_from_output` supplies. The next step may be scheduled in between (overlapped steps): its
        rows compute their last pending token from the device's copy."""
        self.kv_cache.release_shift_sources()  # the step's moves were dispatched before it
        for item in output.scheduled:
            request = item.request
            assert request.num_computed_tokens == item.first, (request, item.first)
            request.num_computed_tokens += item.num_new_tokens + item.num_steps - 1
            if item.samples_token:
                request.num_pending_tokens += item.num_steps

    def update_from_output(self, output: SchedulerOutput, sampled) -> list[Request]:
        """Gives the rows of a finished step (advanced by `advance`) their sampled tokens, offers newly full
        pages to the prefix cache and applies token stops (EOS, stop_token_ids, max_tokens, max_model_len,
        none before min_tokens); a finished request's pages are free when this returns, and its later
        pending tokens are dropped.

        Args:
          output: what `schedule` returned for the step.
          sampled: the step's samples: `token_ids` i32[rows] and `logprobs` f32[rows], row b for
            `output.scheduled[b]` (extra padding rows are ignored); of a multi-step call, [steps, rows],
            row b's tokens in order in the first `output.scheduled[b].num_steps` entries of column b.
        Returns:
          The requests that got a new token this step, finished or not, in row order.
        """
        updated = []
        now = time.monotonic()
        # Python ints and floats, converted once for all rows: per row, its tokens in order.
        token_ids = np.asarray(sampled.token_ids).reshape(output.decode_steps, -1).T.tolist()
        logprobs = np.asarray(sampled.logprobs).reshape(output.decode_steps, -1).T.tolist()
        for row, item in enumerate(output.scheduled):
            request = item.request
            if request.is_finished:  # aborted or stopped after the step was launched; its pages are free
                continue
            if not item.samples_token:  # a prompt chunk short of the end: its sample predicts a known token
                self.kv_cache.cache_full_pages(request)
                continue
            # A request preempted after its step was launched still gets its tokens: they were sampled from
            # the whole context. (Its K/V for this step is recomputed or swapped back with the rest.)
            assert request.num_pending_tokens >= item.num_steps, request
            wants_logprobs = request.sampling_params.logprobs is not None
            status = None
            for token, logprob in zip(token_ids[row][: item.num_steps], logprobs[row], strict=False):
                request.num_pending_tokens -= 1
                request.output_token_ids.append(token)
                request.cumulative_logprob += logprob
                if wants_logprobs:
                    request.output_logprobs.append(logprob)
                status = self._stop_status(request)
                if status is not None:  # the row's later tokens come after its end
                    break
            self.kv_cache.cache_full_pages(request)
            if request.first_token_time is None:
                request.first_token_time = now
            if status is not None:
                self._finish(request, status)
            updated.append(request)
        return updated

    # ---- internals -----------------------------------------------------------------------------------------

    def _is_decoding(self, request: Request) -> bool:
        pending = request.num_tokens - request.num_computed_tokens
        held = request.request_id in self.held
        return pending == 1 and not held and not self._reaches_length_limit(request)

    def _reaches_length_limit(self, request: Request) -> bool:
        """Whether the request's tokens, pending ones included, already reach max_tokens or max_model_len:
        it runs no more, and finishes when its last pending token arrives."""
        return request.num_pending_tokens > 0 and (
            request.num_sampled_tokens >= request.sampling_params.max_tokens
            or request.num_tokens >= self.max_model_len
        )

    def _admit(self, request: Request, budget: int, out: SchedulerOutput) -> bool:
        """Gives the head of the queue its pages and schedules it; False (holding nothing) if it must wait."""
        # A request preempted while its step was in flight got that step's token before this schedule.
        assert request.num_pending_tokens == 0, request
        kv = self.kv_cache
        if request.status == RequestStatus.SWAPPED:
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            needed = max(kv.pages_for(request.num_computed_tokens + num_new), request.num_swapped_pages)
            swapped = kv.swap_in(request, max(needed, self._reserved_pages(request)))
            if swapped is None:
                return False
            out.swap_in[request.request_id] = swapped
            self.num_swap_ins += 1
            out.scheduled.append(ScheduledRequest(request, num_new))
            return True

        # Pages for the tokens computed now stay free of tier loads, so a long history cannot crowd them out.
        # Moving a truncated conversation's K/V holds its source pages too; if that leaves too few pages, the
        # request is admitted without the move rather than waiting for pages it holds itself.
        for shift in (True, False) if request.kv_shift is not None else (True,):
            if not kv.take_prefix(request, keep_free=kv.pages_for(budget) + 1, shift=shift):
                return False  # wait for the sibling sample to compute the shared prompt
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            reserved = self._reserved_pages(request)
            if kv.allocate(request, num_new, out.copies) and kv.top_up(request, reserved):
                break
            kv.free(request)
            request.num_computed_tokens = 0
        else:
            return False
        kv.count_prefix_hit(request)
        out.loads += kv.commit_loads(request)
        moves = kv.commit_shift(request)
        if moves is not None:
            out.shifts.append(moves)
        out.scheduled.append(ScheduledRequest(request, num_new))
        return True

    def _max_pages(self, request: Request) -> int:
        """Pages the request holds once it has every token it may get (its last token's K/V is never
        written)."""
        max_total = min(request.num_prompt_tokens + request.sampling_params.max_tokens, self.max_model_len)
        return self.kv_cache.pages_for(max_total - 1)

    def _reserved_pages(self, request: Request) -> int:
        """Pages a request holds from admission on when reserving: those of every token it may still get
        (its last token's K/V is never written). 0 when paging."""
        return self._max_pages(request) if self.reserve_max_tokens else 0

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        if self.preemption_mode == "swap" and self.kv_cache.can_swap_out(request):
            # All of its pages go to host memory, or none (recompute).
            out.swap_out[request.request_id] = self.kv_cache.swap_out(request)
            self.num_swap_outs += 1
            request.status = RequestStatus.SWAPPED
        else:
            request.num_computed_tokens = 0
            request.num_registered_pages = 0
            request.status = RequestStatus.PREEMPTED
        self.kv_cache.free(request)
        request.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(request)
        self.waiting.appendleft(request)  # victims are taken newest first, so the oldest ends up at the head

    def _stop_status(self, request: Request) -> RequestStatus | None:
        """Applied to the last known token (pending tokens after it do not count)."""
        token = request.output_token_ids[-1]
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens and (
            (not params.ignore_eos and token in request.eos_token_ids) or token in params.stop_token_ids
        ):
            return RequestStatus.FINISHED_STOPPED
        num_known = request.num_prompt_tokens + request.num_output_tokens
        if request.num_output_tokens >= params.max_tokens or num_known >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        if request.status == RequestStatus.SWAPPED:
            self.kv_cache.release_swap(request)
        self.kv_cache.unwant(request)
        self.kv_cache.free(request)
        request.num_pending_tokens = 0  # sampled after its end: never reported
        request.status = status
        request.finished_time = time.monotonic()
        del self.requests[request.request_id]
        self.held.discard(request.request_id)
