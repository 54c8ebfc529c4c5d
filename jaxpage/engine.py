"""The engine: requests in, one scheduled step at a time on the device, text and tokens out.

Each `step` schedules (host), packs a padded batch, runs one jit-compiled step with the KV pool donated,
samples on the device, then advances requests, detokenizes incrementally and applies stop strings. A bad
request is refused by `add_request` with a ValueError and leaves nothing behind; it never fails the engine.
A request whose step yields non-finite logits (a numerical fault of the model) finishes alone with
finish reason "error" and its `RequestOutput.error` set; the other requests go on.

Threads: `add_request` and `abort` may be called from any thread while one thread drives `step` (or
`stream`); they wait for a step in progress to end. Steps from several threads run one at a time.
"""

import atexit
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import threading
import weakref
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from jaxpage import compile_watch, page_copy
from jaxpage.batch import (
    MAX_BANNED_TOKENS,
    build_step_inputs,
    min_tokens_bans,
    prompt_logprob_positions,
    step_size,
)
from jaxpage.beam_search import BeamGroup, beam_search_params
from jaxpage.compilation_cache import enable_compilation_cache
from jaxpage.config import EngineConfig
from jaxpage.kv_shift import KVShift
from jaxpage.kv_tiers import DiskTier, KVStore
from jaxpage.metrics import EngineMetrics
from jaxpage.outputs import (
    RequestOutput,
    SampleGroup,
    TextState,
    aborted_beam_search_output,
    beam_search_output,
    top_dict,
)
from jaxpage.page_pool import PagePool
from jaxpage.request import Request, RequestStatus
from jaxpage.runner import LaunchedStep, Runner, StepOutput, kv_bytes_per_page
from jaxpage.sampling import MAX_TOP_K
from jaxpage.sampling_params import SamplingParams, sample_seed
from jaxpage.scheduler import Scheduler, SchedulerOutput
from jaxpage.tokenizer import Tokenizer, check_text
from models import sharding
from models.config import ModelConfig
from models.default_model import default_model_path
from models.layers import rope_inv_freq
from models.llama import init_params
from models.loaders import load_model, read_model_config

logger = logging.getLogger(__name__)


def _random_params(model_config: ModelConfig, seed: int, scale: float, mesh: jax.sharding.Mesh) -> dict:
    if not (isinstance(scale, int | float) and scale > 0):
        raise ValueError(f"random_weight_scale must be a positive number, got {scale!r}")
    params = init_params(model_config, jax.random.key(seed), mesh)
    if scale == 1:
        return params
    # Norm weights (1-D, all ones) keep their value; matrices are scaled in place (donated), so a model as
    # large as its devices' memory is never held twice (a 70B model split over two GPUs would be).
    scaled = jax.jit(lambda x: x * scale, donate_argnums=0)
    return jax.tree.map(lambda x: scaled(x) if x.ndim >= 2 else x, params)


def _read_in_flight_step(engine_ref: "weakref.ref[LLMEngine]") -> None:
    """At interpreter exit: waits for an overlapped step nobody read (its requests were aborted, or the caller
    stopped stepping), since tearing the runtime down under its copies to the host aborts the process."""
    engine = engine_ref()
    if engine is not None and engine._in_flight is not None:
        jax.device_get(engine._in_flight.step)


class LLMEngine:
    """Serves many requests at once; drive it with `step` (or `stream`) and feed it with `add_request`."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        random_model: ModelConfig | None = None,
        random_weight_scale: float = 1.0,
        devices: list[jax.Device] | None = None,
        request_numbers: Iterator[int] | None = None,
    ):
        """Loads `config.model` (the embedded SmolLM2 when None), or builds random weights of `random_model`'s
        shape (tests and speed runs); the tokenizer always comes from `config.model`.

        devices: the `tensor_parallel_size` devices the model is split over (default: this process's first
        ones); data-parallel replicas each get their own. request_numbers: where fresh request ids
        ("request-{n}") take their numbers (default: a count of this engine's own); replicas share one, so no
        two of their requests have the same id.

        random_weight_scale multiplies the random weight matrices (std 0.02 from `init_params`). At 0.02 a
        tiny model mostly echoes its last token; around 0.2 its output depends on the whole context, which is
        what a test of batching and paging needs.
        """
        self.config = config
        model_path = Path(config.model) if config.model is not None else default_model_path()
        if not model_path.exists():
            raise ValueError(f"model {str(model_path)!r} does not exist")
        self.tokenizer = (
            Tokenizer.from_hf_dir(model_path) if model_path.is_dir() else Tokenizer.from_gguf(model_path)
        )
        if config.compilation_cache_dir is not None:
            # Before the weights: random ones are drawn by small programs that would otherwise compile at
            # every start (74 programs, 9 of the 14 s to build the 8B shapes on an H200 from a full cache).
            enable_compilation_cache(config.compilation_cache_dir)
        mesh = sharding.tensor_parallel_mesh(config.tensor_parallel_size, devices)
        if random_model is None:
            # The split is checked before the weights load (minutes for a large model).
            sharding.check_tensor_parallel(
                read_model_config(model_path, config.dtype), config.tensor_parallel_size
            )
            model_config, params = load_model(model_path, config.dtype, cache_dir=config.checkpoint_cache_dir)
        else:
            model_config = dataclasses.replace(random_model, dtype=config.dtype)
            sharding.check_tensor_parallel(model_config, config.tensor_parallel_size)
            params = _random_params(model_config, config.seed, random_weight_scale, mesh)
        if self.tokenizer.vocab_size > model_config.vocab_size:
            # Larger ids would index past the embedding table, which a gather clamps silently.
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens, more than the model's vocab_size "
                f"({model_config.vocab_size})"
            )
        self.model_config = model_config
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        if self.max_model_len > model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) exceeds the model's context "
                f"({model_config.max_position_embeddings})"
            )
        config.check_page_buckets(self.max_model_len)
        bytes_per_page = kv_bytes_per_page(model_config, config.page_size)
        # Host memory holds every device's shard of a page: the whole page once when the heads are split,
        # once per device when the pool is replicated (fewer KV heads than devices).
        tp = config.tensor_parallel_size
        host_bytes_per_page = tp * kv_bytes_per_page(model_config, config.page_size, tp)
        random_id = f"random(seed={config.seed}, scale={random_weight_scale})" if random_model else None
        self.store = _kv_store(
            config, model_config, bytes_per_page, host_bytes_per_page,
            lambda: random_id or _checkpoint_identity(model_path),
        )  # fmt: skip
        self.runner = Runner(model_config, params, config, num_token_ids=self.tokenizer.vocab_size, mesh=mesh)
        if self.store is not None and page_copy.uses_pinned_memory(self.runner.kv_pool):
            self.store.stage = functools.partial(
                jax.device_put, device=page_copy.host_memory(self.runner.kv_pool)
            )
        elif self.store is not None:
            page_copy.retain_freed_host_memory()
        self.pool = PagePool(self.runner.num_pages, enable_prefix_caching=config.enable_prefix_caching)
        num_swap_pages = 0
        if config.preemption_mode == "swap":
            num_swap_pages = int(config.swap_space_gib * 2**30) // host_bytes_per_page
        self.scheduler = Scheduler(
            self.pool,
            page_size=config.page_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            preemption_mode=config.preemption_mode,
            reserve_max_tokens=config.kv_allocation == "reserved",
            num_swap_pages=num_swap_pages,
            store=self.store,
            write_through=config.kv_tier_write_through,
            decode_steps=config.decode_steps,
        )
        # Pages one move to or from the tiers carries at most: a step's saves and loads go in chunks of this
        # many, so warm-up compiles every size they use.
        self._max_move_pages = config.pages_per_seq(self.max_model_len)
        self._inv_freq = rope_inv_freq(model_config)  # rotates K moved to new positions (kv_shift)
        self._text: dict[str, TextState] = {}  # by sample request id
        self._groups: dict[str, SampleGroup] = {}  # by request id
        self._group_of: dict[str, SampleGroup] = {}  # by sample request id
        self._beams: dict[str, BeamGroup] = {}  # beam-search requests, by request id
        self._beam_of: dict[str, BeamGroup] = {}  # by the request id of a live beam
        self._swapped: dict[str, np.ndarray] = {}  # host copies of swapped-out pages, by sample request id
        # Numbers of the user-facing ids of requests added without one.
        self._ids = request_numbers if request_numbers is not None else itertools.count()
        # Scheduler-side names: every request runs as "{serial}" (its samples "{serial}#i", its beams
        # "{serial}#beamk"), so no id a caller chooses can collide with another request's internal ones.
        self._serials = itertools.count()
        self._num_steps = 0
        self._num_compiles_after_warmup = 0
        self._peak_used_pages = 0
        self._in_flight: _Launched | None = None  # the overlapped step whose tokens the host has not read
        # What the next step reports besides its own rows: final outputs of aborted beam searches, and the
        # sample groups with an aborted sample.
        self._ready: list[RequestOutput] = []
        self._pending_groups: dict[str, SampleGroup] = {}
        self._lock = threading.RLock()  # add_request / abort from other threads while one thread steps
        atexit.register(_read_in_flight_step, weakref.ref(self))

    # ---- requests ------------------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int] | None = None,
        sampling_params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
        kv_shift: KVShift | None = None,
    ) -> str:
        """Queues a request given as text, token ids, or chat messages (rendered with the model's template).

        `cache_salt`: the prefix cache reuses K/V only between requests of the same salt (None: the common
        cache). `kv_shift`: the prompt drops tokens from the middle of an earlier request's tokens (a
        conversation truncated to fit; see jaxpage.kv_shift), whose K/V is moved to the new positions where
        the cache still holds it; approximate, so it needs a `cache_salt` of its own.

        Returns:
          The request id (a fresh one unless given).
        Raises:
          ValueError naming the field, when the request cannot be served; the engine is then unchanged.
        """
        if request_id is not None:
            check_text("request_id", request_id)
        if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
            raise ValueError(
                f"sampling_params must be a SamplingParams or None, got {type(sampling_params).__name__} "
                f"{sampling_params!r}; build one with SamplingParams(**fields)"
            )
        prompt_token_ids = self.encode_prompt(prompt, messages)
        params = sampling_params if sampling_params is not None else SamplingParams()
        self._check_supported(params)
        self._check_cache_options(prompt_token_ids, params, cache_salt, kv_shift)
        with self._lock:
            if request_id is None:
                request_id = next(i for i in (f"request-{n}" for n in self._ids) if not self._in_use(i))
            if self._in_use(request_id):
                raise ValueError(f"request_id {request_id!r} is already in use")
            key = str(next(self._serials))
            eos = frozenset(self.tokenizer.eos_token_ids)
            if params.use_beam_search:
                self._add_beam_search(request_id, key, prompt_token_ids, params, eos, cache_salt)
            else:
                self._add_samples(request_id, key, prompt_token_ids, params, eos, cache_salt, kv_shift)
        return request_id

    def _check_cache_options(self, prompt_token_ids, params, cache_salt, kv_shift) -> None:
        if cache_salt is not None and not (isinstance(cache_salt, str) and cache_salt):
            raise ValueError(f"cache_salt must be a non-empty str or None, got {cache_salt!r:.200}")
        if kv_shift is None:
            return
        if not isinstance(kv_shift, KVShift):
            raise ValueError(
                f"kv_shift must be a KVShift or None, got {type(kv_shift).__name__} {kv_shift!r:.200}"
            )
        if not self.config.enable_prefix_caching:
            raise ValueError("kv_shift needs engine config field enable_prefix_caching (it moves cached K/V)")
        if params.use_beam_search:
            raise ValueError("kv_shift is not supported with beam search")
        if params.prompt_logprobs is not None:  # moved tokens would have no logprobs
            raise ValueError("kv_shift is not supported with prompt_logprobs")
        kv_shift.check(prompt_token_ids, cache_salt)

    def _in_use(self, request_id: str) -> bool:
        return request_id in self._groups or request_id in self._beams

    def _add_samples(
        self,
        request_id: str,
        key: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos,
        cache_salt: str | None = None,
        kv_shift: KVShift | None = None,
    ) -> None:
        num_samples = params.num_samples
        samples = []
        for index in range(num_samples):
            # Sample i runs as a request of its own with a seed derived from the request's (see sample_seed);
            # the later ones share the first one's prompt pages.
            sample_params = dataclasses.replace(params, n=1, best_of=None)
            if index > 0:  # the prompt's logprobs are reported once, from sample 0
                sample_params = dataclasses.replace(sample_params, prompt_logprobs=None)
            if params.seed is not None:
                seed = sample_seed(params.seed, index)
            else:  # fixed by the caller's id, not by the admission order, so a run is reproducible
                seed = zlib.crc32((request_id if num_samples == 1 else f"{request_id}#{index}").encode())
            sample_params = dataclasses.replace(sample_params, seed=seed)
            sample_id = key if num_samples == 1 else f"{key}#{index}"
            fork_source = samples[0] if samples else None
            samples.append(
                Request(
                    sample_id,
                    prompt_token_ids,
                    sample_params,
                    eos,
                    fork_source=fork_source,
                    extra_key=cache_salt,
                    kv_shift=kv_shift,
                )
            )
        try:
            for sample in samples:
                self.scheduler.add_request(sample)
        except ValueError:
            for sample in samples:
                self.scheduler.finish_request(sample.request_id, RequestStatus.FINISHED_ABORTED)
            raise
        if params.prompt_logprobs is not None:
            # A prefix-cache hit skips the logits of the cached tokens, so, as vLLM does, a request asking
            # for prompt logprobs takes no hit: with no page keys yet its lookup finds nothing. Its own pages
            # are still named and cached as it computes them, and after a preemption it may hit them again,
            # which covers only tokens whose logprobs it has recorded.
            samples[0].page_keys = []
        for sample in samples:
            self._text[sample.request_id] = TextState(self.tokenizer, sample)
        group = self._groups[request_id] = SampleGroup(request_id, params, samples)
        for sample in samples:
            self._group_of[sample.request_id] = group

    def _add_beam_search(
        self, request_id: str, key: str, prompt_token_ids: list[int], params: SamplingParams, eos, cache_salt
    ) -> None:
        # max(1, ...): a prompt that leaves no room is refused by the scheduler with its own message.
        room = max(1, self.max_model_len - len(prompt_token_ids))
        beam_params = beam_search_params(
            params, eos, max_logprobs=self.config.max_logprobs, max_new_tokens=room
        )
        group = BeamGroup(request_id, prompt_token_ids, params, beam_params, extra_key=cache_salt, key=key)
        self.scheduler.add_request(group.first_request)
        if params.prompt_logprobs is not None:
            group.first_request.page_keys = []  # no prefix-cache hit: see add_request
        self._beams[request_id] = group
        self._beam_of[group.first_request.request_id] = group

    def _check_supported(self, params: SamplingParams) -> None:
        """Refuses what the configuration or the device sampler cannot serve, rather than ignoring it."""
        if params.top_k > MAX_TOP_K:
            raise ValueError(
                f"top_k must be <= {MAX_TOP_K} (the sampler's candidate count), got {params.top_k}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.config.max_logprobs:
                raise ValueError(f"{name} must be <= max_logprobs ({self.config.max_logprobs}), got {value}")
        vocab_size = self.tokenizer.vocab_size
        for token_id in params.stop_token_ids:
            if token_id >= vocab_size:
                raise ValueError(f"stop_token_ids must be < the vocabulary size {vocab_size}, got {token_id}")
        if params.min_tokens > 0:
            banned = min_tokens_bans(self.tokenizer.eos_token_ids, params)
            if len(banned) > MAX_BANNED_TOKENS:
                raise ValueError(
                    f"stop_token_ids: with min_tokens > 0, at most {MAX_BANNED_TOKENS} EOS and stop token "
                    f"ids can be held back, got {len(banned)} ({len(self.tokenizer.eos_token_ids)} EOS, "
                    f"{len(params.stop_token_ids)} stop token ids)"
                )

    def encode_prompt(self, prompt: str | list[int] | None, messages: list[dict] | None) -> list[int]:
        """Prompt token ids of a text prompt, token ids (a list, tuple or 1-D integer array), or chat
        messages; ValueError for an unusable one."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if messages is not None:
            token_ids = self.tokenizer.encode_chat(messages)
        elif isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must be a non-empty string, got ''")
            check_text("prompt", prompt)
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list | tuple | np.ndarray):
            token_ids = self._check_token_ids(prompt)
        else:
            raise ValueError(
                f"prompt must be a str or a list of token ids, got {type(prompt).__name__} {prompt!r}"
            )
        if not token_ids:
            raise ValueError(f"prompt encodes to no tokens: {prompt!r}")
        return token_ids

    def _check_token_ids(self, prompt) -> list[int]:
        # Ids the tokenizer does not know would index rows that only pad the embedding table.
        vocab = self.tokenizer.vocab_size
        expected = f"prompt token ids must be a non-empty list of ints in [0, {vocab})"
        is_array = isinstance(prompt, np.ndarray)
        if is_array and not (prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer)):
            raise ValueError(f"{expected}, got an array of shape {prompt.shape} and dtype {prompt.dtype}")
        if len(prompt) == 0:
            raise ValueError(f"{expected}, got an empty list")
        for index, token in enumerate(prompt):
            # bool is an int in Python; True as a token id is a mistake, not token 1.
            if isinstance(token, bool | np.bool_) or not isinstance(token, int | np.integer):
                raise ValueError(f"{expected}, got {type(token).__name__} {token!r} at index {index}")
            if not 0 <= token < vocab:
                raise ValueError(f"{expected}, got {int(token)} at index {index}")
        return [int(token) for token in prompt]

    def abort(self, request_id: str, index: int | None = None, *, report: bool = True) -> bool:
        """Drops a request (all its samples, or only sample `index` of an `n > 1` request), queued, running
        or swapped; its pages and swap space are free on return, and (unless `report` is False, for a caller
        that is gone) the next `step` returns its final output with finish reason "abort". Ids not in flight
        (unknown, or finished already: a caller may race a natural finish) are ignored.

        Returns:
          Whether anything was aborted.
        """
        check_text("request_id", request_id)
        with self._lock:
            beams = self._beams.get(request_id)
            if beams is not None and index is not None:
                raise ValueError(f"index must be None for beam search request {request_id!r}, got {index!r}")
            if beams is not None:
                del self._beams[request_id]
                output = aborted_beam_search_output(beams, self._live_beams(beams), self.tokenizer)
                for beam_id in beams.abort(self.scheduler):
                    self._forget_beam(beam_id)
                if report:
                    self._ready.append(output)
                return True
            group = self._groups.get(request_id)
            if group is None:
                return False
            if index is not None and not (_is_index(index) and 0 <= index < len(group.samples)):
                raise ValueError(
                    f"index must be None or an int in [0, {len(group.samples)}) for request {request_id!r}, "
                    f"got {index!r}"
                )
            samples = group.samples if index is None else [group.samples[index]]
            status = RequestStatus.FINISHED_ABORTED
            aborted = [s for s in samples if self.scheduler.finish_request(s.request_id, status)]
            if not aborted:
                return False
            for sample in aborted:
                self._text[sample.request_id].update(sample.output_token_ids, True, False)
            if report:
                self._pending_groups[group.request_id] = group
            elif all(sample.is_finished for sample in group.samples):
                self._pending_groups.pop(group.request_id, None)  # an earlier abort of one sample reported
                self._forget(group)
            return True

    def _live_beams(self, beams: BeamGroup) -> list[Request]:
        return [self.scheduler.requests[i] for i in beams.request_ids if i in self.scheduler.requests]

    def _forget(self, group: "SampleGroup") -> None:
        del self._groups[group.request_id]
        for sample in group.samples:
            del self._group_of[sample.request_id]
            del self._text[sample.request_id]
            self._swapped.pop(sample.request_id, None)

    def _forget_beam(self, beam_id: str) -> None:
        self._beam_of.pop(beam_id, None)
        self._swapped.pop(beam_id, None)

    def metrics(self) -> EngineMetrics:
        scheduler = self.scheduler
        return EngineMetrics(
            num_steps=self._num_steps,
            kv_usage=self.pool.num_used_pages / self.pool.num_usable_pages,
            peak_kv_usage=self._peak_used_pages / self.pool.num_usable_pages,
            num_cached_pages=self.pool.num_cached_pages,
            prefix_query_tokens=scheduler.kv_cache.num_prefix_query_tokens,
            prefix_hit_tokens=scheduler.kv_cache.num_prefix_hit_tokens,
            num_preemptions=scheduler.num_preemptions,
            num_swap_outs=scheduler.num_swap_outs,
            num_swap_ins=scheduler.num_swap_ins,
            num_copies=scheduler.kv_cache.num_copies,
            num_evictions=self.pool.num_evictions,
            host_hit_tokens=scheduler.kv_cache.tier_hit_tokens["host"],
            disk_hit_tokens=scheduler.kv_cache.tier_hit_tokens["disk"],
            shifted_tokens=scheduler.kv_cache.num_shifted_tokens,
            num_host_pages=self.store.num_host_pages if self.store else 0,
            num_disk_pages=len(self.store.disk) if self.store and self.store.disk else 0,
            disk_prefetched_pages=self.store.num_prefetched if self.store else 0,
            host_prefetched_pages=scheduler.kv_cache.num_prefetched_pages,
            num_compiles_after_warmup=self._num_compiles_after_warmup,
        )

    def warmup(self) -> dict:
        """Compiles every bucket and every page move now, so no step compiles while serving
        (`metrics().num_compiles_after_warmup` counts the exceptions). Returns `Runner.warmup`'s seconds per
        bucket."""
        # A step copies at most one page per row (copy-on-write), swaps one request's pages at a time and
        # moves pages to and from the tiers in chunks of as many.
        swap_pages = self._max_move_pages if self.config.preemption_mode == "swap" else 0
        tier_pages = self._max_move_pages if self.store is not None else 0
        # Moving tokens to new positions (kv_shift) needs the prefix cache.
        inv_freq = self._inv_freq if self.config.enable_prefix_caching else None
        moves = (self.config.max_num_seqs, swap_pages, tier_pages, inv_freq)
        # The page moves compile beside the step programs (alone they took 3.7 s for the 8B shapes on an
        # H200), then run once each.
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            compiled = thread.submit(page_copy.compile_moves, self.runner.kv_pool, *moves)
            seconds = self.runner.warmup()
            compiled.result()
        self.runner.kv_pool = page_copy.warmup(self.runner.kv_pool, *moves)
        if self.store is not None and page_copy.uses_pinned_memory(self.runner.kv_pool):
            page_copy.reserve_host_memory(self.runner.kv_pool, self.store.host_capacity_pages)
        return seconds

    def close(self) -> None:
        """Finishes the disk tier's queued writes and frees its directory for another engine (its files stay
        for a later one). The engine is not usable afterwards."""
        if self.store is not None:
            self.store.close()

    def has_unfinished_requests(self) -> bool:
        """Whether a request is queued or running (an aborted one's final output may still be due)."""
        return self.scheduler.has_unfinished_requests

    # ---- stepping ------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Launches one scheduled step and reads the tokens of the step before it (with `overlap_steps`; else
        of this one); returns an output for every request that got a token, finished or not, and the final
        outputs of requests aborted or failed since the last call."""
        with self._lock, compile_watch.counting() as compiles:
            outputs = self._step()
        if compiles and self.runner.warmed_up:
            self._num_compiles_after_warmup += len(compiles)
            logger.warning(
                "a step compiled %d program(s) after warm-up (%.2f s)", len(compiles), sum(compiles)
            )
        return outputs

    def _step(self) -> list[RequestOutput]:
        ready, self._ready = self._ready, []
        outputs, self._pending_groups = self._pending_groups, {}
        try:
            return self._run_step(ready, outputs)
        except BaseException:
            # The step failed (a device error, an interrupt): the final outputs of aborts stay due.
            self._ready = ready + self._ready
            self._pending_groups = outputs | self._pending_groups
            raise

    def _run_step(self, ready: list[RequestOutput], outputs: dict[str, SampleGroup]) -> list[RequestOutput]:
        # Overlapped steps: step N+1 is scheduled and launched before step N's tokens are read, so the device
        # runs N+1 while the host reads and reports N. A request that stops on step N's token wasted its row
        # in N+1, whose sample is dropped; length limits are known ahead, so such rows are never scheduled.
        if self.store is not None:
            self.store.settle()
        scheduled = self.scheduler.schedule()
        self._peak_used_pages = max(self._peak_used_pages, self.pool.num_used_pages)
        previous, self._in_flight = self._in_flight, None
        launched = None
        if not scheduled.is_empty:
            launched = self._launch(scheduled, previous)
        elif scheduled.saves:  # pages filled by the last step, or evicted for an admission that then failed
            self._save_pages(scheduled.saves)
        if scheduled.is_empty and previous is None:
            assert not self.scheduler.has_unfinished_requests, (
                "requests are waiting but none could be scheduled"
            )
            return ready + self._group_outputs(outputs)
        finished = []
        if previous is not None:
            finished += self._finish_step(previous, outputs)
        if launched is not None:
            if self.config.overlap_steps and not launched.needs_host:
                self._in_flight = launched
            else:
                finished += self._finish_step(launched, outputs)
        if self._in_flight is not None and not self.scheduler.has_unfinished_requests:
            # Its requests all stopped on the step before (EOS, a stop string): no step follows to read it,
            # and a caller that stops stepping now and exits would tear the runtime down under a copy still
            # in flight, which aborts the process.
            finished += self._finish_step(self._in_flight, outputs)
            self._in_flight = None
        return ready + self._group_outputs(outputs) + finished

    def _launch(self, scheduled: SchedulerOutput, previous: "_Launched | None") -> "_Launched":
        bucket = self.runner.bucket_for(*step_size(scheduled))
        in_flight_rows = {}
        if previous is not None:
            items = previous.scheduled.scheduled
            in_flight_rows = {item.request.request_id: row for row, item in enumerate(items)}
        inputs = build_step_inputs(scheduled, bucket, self.config.page_size, in_flight_rows)
        # A missing program fails here (compile_after_warmup "error"), before any page moves; the pages that
        # were to be loaded from the tiers then hold nothing, and must not stay in the prefix cache.
        try:
            programs = self.runner.programs(inputs)
        except BaseException:
            shifted = [int(page) for moves in scheduled.shifts for page in np.unique(moves[2])]
            self.pool.uncache([page for page, _ in scheduled.loads] + shifted)
            raise
        self._move_pages(scheduled)
        step = self.runner.launch(inputs, programs)
        self.scheduler.advance(scheduled)
        self._num_steps += 1
        # has_penalties: some sampling row has penalties. Only beams need a look at the rows.
        needs_host = (
            inputs.wants_prompt_logprobs
            or inputs.has_penalties
            or bool(self._beam_of)
            and any(
                item.samples_token and item.request.request_id in self._beam_of
                for item in scheduled.scheduled
            )
        )
        return _Launched(scheduled, inputs.cu_q_lens, step, needs_host)

    def _finish_step(self, launched: "_Launched", outputs: dict[str, SampleGroup]) -> list[RequestOutput]:
        """Reads a launched step's tokens and applies them; returns the final outputs of beam searches that
        ended (sample groups with news are added to `outputs`)."""
        scheduled = launched.scheduled
        result = self.runner.fetch(launched.step)
        finished, failing = self._fail_broken_rows(scheduled, result.sampled, outputs)
        if result.prompt_logprobs is not None:
            record_prompt_logprobs(scheduled, launched.cu_q_lens, result)
        rows = {item.request.request_id: row for row, item in enumerate(scheduled.scheduled)}
        for sample in self.scheduler.update_from_output(scheduled, result.sampled):
            row = rows[sample.request_id]
            beams = self._beam_of.get(sample.request_id)
            if beams is not None:
                if self._advance_beams(beams, sample, result.sampled, row):
                    finished.append(beam_search_output(beams, self.tokenizer))
                continue
            k = sample.sampling_params.logprobs
            if k is not None:
                sampled = result.sampled
                sample.output_top_logprobs.append(
                    top_dict(
                        sample.output_token_ids[-1],
                        sampled.logprobs[row],
                        sampled.top_token_ids[row, :k],
                        sampled.top_logprobs[row, :k],
                    )
                )
            group = self._group_of[sample.request_id]
            self._update_text(sample)
            outputs[group.request_id] = group
        for request, error in failing:  # multi-step rows whose fault came after good tokens
            if not request.is_finished:
                finished += self._fail(request, error, outputs)
        return finished

    def _group_outputs(self, groups: dict[str, SampleGroup]) -> list[RequestOutput]:
        results = []
        for group in groups.values():
            output = group.output(self._text)
            if output is None:
                continue
            if output.finished:
                self._forget(group)
            results.append(output)
        return results

    def _fail_broken_rows(
        self, scheduled, sampled, outputs: dict[str, SampleGroup]
    ) -> tuple[list[RequestOutput], list[tuple[Request, str]]]:
        """Ends, with finish reason "error", every request whose row got non-finite logits (its sampled
        logprob is NaN or inf) or an id outside the tokenizer's vocabulary: a numerical fault of the model
        fails that request, never the engine. All samples (or beams) of such a request end with it.

        A row of a multi-step call whose first bad token is not its first keeps the tokens before it: its
        `num_steps` is cut there, and it fails after `update_from_output` unless those tokens ended it.

        Returns:
          The final outputs of failed beam searches (failed sample groups are added to `outputs`), and the
          (request, error) of the rows that fail after `update_from_output`.
        """
        num_rows = len(scheduled.scheduled)
        # [steps, rows]: one step, or the calls of a multi-step decode (row b's first num_steps count).
        token_ids = np.asarray(sampled.token_ids).reshape(scheduled.decode_steps, -1)[:, :num_rows]
        logprobs = np.asarray(sampled.logprobs).reshape(scheduled.decode_steps, -1)[:, :num_rows]
        bad = ~np.isfinite(logprobs) | (token_ids < 0) | (token_ids >= self.tokenizer.vocab_size)
        if scheduled.decode_steps > 1:  # a row's passes after its num_steps sampled for nobody
            num_steps = np.fromiter((item.num_steps for item in scheduled.scheduled), np.int64, num_rows)
            bad &= np.arange(scheduled.decode_steps)[:, None] < num_steps
        failed_beams, fail_after_update = [], []
        for row in np.flatnonzero(bad.any(axis=0)):
            item = scheduled.scheduled[row]
            request = item.request
            if request.is_finished:
                continue
            call = int(np.argmax(bad[:, row]))  # the row's first bad token
            position = item.first + item.num_new_tokens - 1 + call
            if np.isfinite(logprobs[call, row]):
                error = f"the model sampled token id {int(token_ids[call, row])}, outside the vocabulary"
            else:
                error = "the model produced non-finite logits (NaN or inf)"
            error += f" at position {position}"
            if call > 0:
                item.num_steps = call
                fail_after_update.append((request, error))
                continue
            failed_beams += self._fail(request, error, outputs)
        return failed_beams, fail_after_update

    def _fail(self, request: Request, error: str, outputs: dict[str, SampleGroup]) -> list[RequestOutput]:
        """Ends a request (all its samples, or its whole beam search) with finish reason "error"; returns
        the beam search's final output, if it was one (a failed sample group is added to `outputs`)."""
        beams = self._beam_of.get(request.request_id)
        if beams is not None:
            del self._beams[beams.request_id]
            output = aborted_beam_search_output(beams, self._live_beams(beams), self.tokenizer, error)
            for beam_id in beams.request_ids:
                self.scheduler.fail_request(beam_id)
            for beam_id in beams.abort(self.scheduler):
                self._forget_beam(beam_id)
            return [output]
        group = self._group_of[request.request_id]
        for sample in group.samples:
            if self.scheduler.fail_request(sample.request_id) is not None:
                self._text[sample.request_id].update(sample.output_token_ids, True, False)
        group.error = error
        outputs[group.request_id] = group
        return []

    def _advance_beams(self, beams: BeamGroup, request: Request, sampled, row: int) -> bool:
        """Gives a beam's candidates to its group; True once the group's search is over."""
        for beam_id in beams.update(
            self.scheduler, request, sampled.top_token_ids[row], sampled.top_logprobs[row]
        ):
            self._forget_beam(beam_id)
        for beam_id in beams.request_ids:
            self._beam_of[beam_id] = beams
        if beams.finished:
            del self._beams[beams.request_id]
        return beams.finished

    def _move_pages(self, scheduled) -> None:
        # Before the step: save pages to the tiers before anything can overwrite them, restore swapped-in
        # requests, then give writers their private copies of shared pages.
        self._save_pages(scheduled.saves)
        pool = self.runner.kv_pool
        for request_id, page_ids in scheduled.swap_out.items():
            self._swapped[request_id] = page_copy.gather_pages(pool, page_ids)
        for request_id, page_ids in scheduled.swap_in.items():
            pool = page_copy.scatter_pages(pool, page_ids, self._swapped.pop(request_id))
        if scheduled.loads:
            pool = page_copy.scatter_pages_from_host(
                pool,
                [page for page, _ in scheduled.loads],
                [kv for _, kv in scheduled.loads],
                self._max_move_pages,
            )
        if scheduled.loads and self.config.kv_tier_sync_transfers:
            pool = jax.block_until_ready(pool)
        if scheduled.shifts:
            pool = page_copy.shift_tokens(pool, np.concatenate(scheduled.shifts, axis=1), self._inv_freq)
        pool = page_copy.copy_pages(pool, scheduled.copies)
        self.runner.kv_pool = pool

    def _save_pages(self, saves) -> None:
        """Gives pages' K/V (filled, or evicted) to the host tier: each page is copied by the device into an
        array of its own in pinned host memory, after the work queued before and before anything later
        writes the page; the host does not wait for the copies (unless kv_tier_sync_transfers). On the CPU
        the pages become numpy arrays, and the host waits for the steps queued before (see
        page_copy.uses_pinned_memory)."""
        if not saves:
            return
        page_ids = [page for page, _ in saves]
        pages = page_copy.gather_pages_to_host(self.runner.kv_pool, page_ids, self._max_move_pages)
        if self.config.kv_tier_sync_transfers:
            jax.block_until_ready(pages)
        for (_, key), data in zip(saves, pages, strict=True):
            self.store.save(key, data)

    def stream(self) -> Iterator[RequestOutput]:
        """Steps until no request is left, yielding outputs as they come; requests may be added or aborted
        between items, and the loop picks them up."""
        while self.has_unfinished_requests() or self._ready or self._pending_groups:
            yield from self.step()

    def _update_text(self, request: Request) -> None:
        text = self._text[request.request_id]
        check_stop = request.num_output_tokens >= request.sampling_params.min_tokens
        if text.update(request.output_token_ids, request.is_finished, check_stop):
            if request.is_finished:  # the same token also hit max_tokens: the stop string is the reason
                request.status = RequestStatus.FINISHED_STOPPED
            else:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)


def _checkpoint_identity(path: Path) -> str:
    """Names a checkpoint for the disk tier's manifest: its path, and the sizes and modification times of its
    files, so K/V saved for weights since overwritten in place is refused rather than reused."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamps = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return f"{path.resolve()} {zlib.crc32(repr(stamps).encode()):08x}"


def _kv_store(
    config: EngineConfig,
    model_config: ModelConfig,
    bytes_per_page: int,
    host_bytes_per_page: int,
    model_identity,
) -> KVStore | None:
    """The tiers under the prefix cache that `config` asks for; a ValueError naming the field for a size
    below one page or an unusable directory. A page takes `host_bytes_per_page` in host memory (all its
    devices' shards) and `bytes_per_page` on disk. `model_identity()` names the model for the disk tier
    (called only with one: it reads every checkpoint file's metadata)."""
    if config.kv_host_cache_gib is None:
        return None

    def pages(field: str) -> int:
        gib = getattr(config, field)
        page_bytes = host_bytes_per_page if field == "kv_host_cache_gib" else bytes_per_page
        num_pages = int(gib * 2**30) // page_bytes
        if num_pages < 1:
            raise ValueError(f"engine config field {field} ({gib}) is below one KV page ({page_bytes} bytes)")
        return num_pages

    host_pages = pages("kv_host_cache_gib")
    disk = None
    if config.kv_disk_cache_dir is not None:
        # What must match for a file's K/V to be valid here: the model, its shapes, the page layout.
        fingerprint = {
            "model": model_identity(),
            "model_config": dataclasses.asdict(model_config),
            "page_size": config.page_size,
            "dtype": config.dtype,
        }
        disk = DiskTier(config.kv_disk_cache_dir, pages("kv_disk_cache_gib"), fingerprint)
    return KVStore(host_pages, disk, lookahead=config.kv_tier_lookahead)


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Launched(NamedTuple):
    """A step on the device whose tokens the host has not read yet."""

    scheduled: SchedulerOutput
    cu_q_lens: np.ndarray  # i32[B + 1] of its inputs
    step: LaunchedStep
    # Whether the next step's scheduling needs this step's tokens: beams (their group picks the next
    # tokens), penalties (the next step's history) and prompt logprobs (which positions are recorded).
    needs_host: bool


def record_prompt_logprobs(scheduled, cu_q_lens: np.ndarray, result: StepOutput) -> None:
    """Appends to each row's `prompt_logprobs` the positions this step computed for the first time.

    cu_q_lens: i32[B + 1] of the step.
    """
    prompt = result.prompt_logprobs
    for row, item in enumerate(scheduled.scheduled):
        request = item.request
        if request.is_finished:
            continue
        first = item.first
        k = request.sampling_params.prompt_logprobs
        for q in prompt_logprob_positions(request, first, first + item.num_new_tokens):
            t = cu_q_lens[row] + q - first  # the flat token at position q, whose logits predict q + 1
            request.prompt_logprobs.append(
                top_dict(
                    request.prompt_token_ids[q + 1],
                    prompt.logprobs[t],
                    prompt.top_token_ids[t, :k],
                    prompt.top_logprobs[t, :k],
                )
            )
