"""`LLM`: generate for a list of prompts or conversations in one call, batched by the engine.

Calls may interleave (a `generate` while a `generate_stream` is half consumed, or from several threads): the
engine's outputs are sorted into one mailbox per request, so each call sees only its own requests' outputs,
whichever call's step produced them.
"""

import collections
import concurrent.futures
import dataclasses
import itertools
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from jaxpage import distributed
from jaxpage.config import EngineConfig
from jaxpage.conversation import Conversation
from jaxpage.engine import LLMEngine, RequestOutput
from jaxpage.kv_shift import KVShift
from jaxpage.sampling_params import SamplingParams
from models.config import ModelConfig

Prompt = str | list[int] | list[dict]  # text, token ids, or one conversation of {role, content} messages


_EXPECTED = (
    "prompts must be one prompt or a non-empty list of them, where a prompt is a str, a list of token ids "
    "(ints) or a conversation (a list of {role, content} dicts)"
)


def _as_prompt_list(prompts) -> list[Prompt]:
    # A bare string, token list (or 1-D integer array) or conversation is one prompt; a list of them is many.
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        return [prompts]
    if not isinstance(prompts, list | tuple) or not prompts:
        raise ValueError(f"{_EXPECTED}; got {type(prompts).__name__} {prompts!r:.200}")
    # bool counts as an int here so that the engine names the bool it refuses as a token id.
    if all(isinstance(p, int | np.integer) for p in prompts) or all(isinstance(p, dict) for p in prompts):
        return [prompts]
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str | list | tuple | np.ndarray):
            raise ValueError(f"{_EXPECTED}; prompt {index} is {type(prompt).__name__} {prompt!r:.200}")
    return list(prompts)


def _params_list(sampling_params, num_prompts: int) -> list:
    """One entry per prompt: `sampling_params` repeated, or the list given (checked for its length)."""
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params] * num_prompts
    if isinstance(sampling_params, list | tuple):
        if len(sampling_params) != num_prompts:
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {num_prompts} prompts")
        return list(sampling_params)
    raise ValueError(
        "sampling_params must be a SamplingParams, a list of them (one per prompt) or None, got "
        f"{type(sampling_params).__name__} {sampling_params!r:.200}"
    )


def _is_conversation(prompt) -> bool:
    return isinstance(prompt, list | tuple) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


class LLM:
    """The engine behind a batch `generate`.

    Build it from an `EngineConfig`, from its fields as keywords (`LLM(num_pages=256)`), or from gin files
    with `LLM.from_gin`. `random_model` gives random weights of that shape instead of loading `config.model`
    (see `LLMEngine`).

    With `data_parallel_size` > 1 it runs that many engines (in a multi-process run, this process's share of
    them; see jaxpage.distributed), each on its own `tensor_parallel_size` devices: `generate` splits its
    prompts into contiguous shares, one per engine, run side by side, and returns the outputs in the prompts'
    order. Streams and conversations run on the first engine (`engine`). In a multi-process run each process
    generates the prompts it is given on its own engines: give each its `distributed.process_share`.
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        random_model: ModelConfig | None = None,
        random_weight_scale: float = 1.0,
        **kwargs,
    ):
        if config is not None and kwargs:
            raise ValueError(f"give either config or its fields as keywords, not both: {sorted(kwargs)}")
        config = config if config is not None else EngineConfig(**kwargs)
        numbers = itertools.count()  # one count of request ids for all replicas
        engines = [
            LLMEngine(
                config, random_model=random_model, random_weight_scale=random_weight_scale, devices=group,
                request_numbers=numbers,
            )
            for group in distributed.replica_devices(config)
        ]  # fmt: skip
        self._serve(engines[0])
        # The data-parallel engines, each behind an LLM (the first is this one, so streams and `generate`
        # share its mailboxes); none when there is one.
        self.replicas = [self, *map(LLM._around, engines[1:])] if len(engines) > 1 else []

    @classmethod
    def _around(cls, engine: LLMEngine) -> "LLM":
        llm = cls.__new__(cls)
        llm._serve(engine)
        llm.replicas = []
        return llm

    def _serve(self, engine: LLMEngine) -> None:
        self.engine = engine
        # Outputs not yet taken by the call that added their request, by request id.
        self._mailboxes: dict[str, collections.deque[RequestOutput]] = {}
        self._lock = threading.Lock()  # guards the mailboxes; the engine has its own lock
        # A step and the delivery of its outputs happen as one, so no call finds its mailbox empty while
        # another call holds its outputs between the two.
        self._step_lock = threading.Lock()

    @classmethod
    def from_gin(cls, gin_files: Sequence[str], gin_bindings: Sequence[str] = ()) -> "LLM":
        """Builds the engine from gin files and bindings (see `jaxpage.gin_config`)."""
        from jaxpage import gin_config  # gin is only needed on this path

        setup = gin_config.parse(list(gin_files), list(gin_bindings))
        return cls(
            setup.engine, random_model=setup.random_model, random_weight_scale=setup.random_weight_scale
        )

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        cache_salt: str | None = None,
        kv_shift: KVShift | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt at once and returns the finished outputs in the prompts' order.

        Args:
          prompts: a text, a list of token ids, a conversation (list of {role, content}), or a list of those.
          sampling_params: one for all prompts, or one per prompt; default `SamplingParams()`.
          cache_salt, kv_shift: for every prompt; see `LLMEngine.add_request`.
        Raises:
          ValueError naming the prompt's index and the field, before anything runs, if a prompt is unusable.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _params_list(sampling_params, len(prompt_list))
        if self.replicas:
            return self._generate_data_parallel(
                prompt_list, params_list, cache_salt=cache_salt, kv_shift=kv_shift
            )
        # Only the final outputs are read: the engine then builds no per-step outputs (see output_kind).
        request_ids = self._add(
            prompt_list, params_list, output_kind="final_only", cache_salt=cache_salt, kv_shift=kv_shift
        )
        return self._finals(request_ids)

    def _finals(self, request_ids: list[str], stop: threading.Event | None = None) -> list[RequestOutput]:
        """Steps until the requests finish; their final outputs, in order. `stop`, once set, ends the wait
        after the current step and aborts what is unfinished (KeyboardInterrupt in another thread)."""
        finals, outputs = {}, self._run(request_ids, stop)
        try:
            for output in outputs:
                if output.finished:
                    finals[output.request_id] = output
        finally:
            outputs.close()  # aborts the unfinished ones
        return [finals[request_id] for request_id in request_ids]

    def _generate_data_parallel(self, prompts: list, params: list, **options) -> list[RequestOutput]:
        """`generate` over the replicas: contiguous shares of the prompts, queued on every replica first (a
        bad prompt fails the call before anything runs), then run side by side, one thread per replica."""
        queued = []
        try:
            for index, replica in enumerate(self.replicas):
                share = distributed.share(len(prompts), index, len(self.replicas))
                if share:
                    request_ids = replica._add(
                        prompts[share.start : share.stop], params[share.start : share.stop],
                        output_kind="final_only", first_index=share.start, **options,
                    )  # fmt: skip
                    queued.append((replica, request_ids))
        except BaseException:
            for replica, request_ids in queued:
                replica._drop(request_ids)
            raise
        stop = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(len(queued)) as pool:
            futures = [pool.submit(replica._finals, ids, stop) for replica, ids in queued]
            try:
                # The first failure, wherever it happens, stops the others at once (not after the earlier
                # shares have finished).
                concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
                for future in futures:
                    if future.done() and future.exception() is not None:
                        raise future.exception()
                return [output for future in futures for output in future.result()]
            except BaseException:
                stop.set()  # the other replicas stop after their current step
                raise

    def conversation(
        self, system: str | None = None, *, drop_oldest_turns: bool = False, shift_kv: bool = False
    ) -> Conversation:
        """A multi-turn chat (`Conversation.send`) whose turns reuse the K/V of the earlier ones wherever the
        prefix cache or the tiers under it still hold them. drop_oldest_turns: a turn that would outgrow
        max_model_len drops the oldest user/assistant pairs instead of failing; shift_kv: the K/V of the
        history they keep is moved to its new positions rather than recomputed (approximate)."""
        return Conversation(self, system, drop_oldest_turns=drop_oldest_turns, shift_kv=shift_kv)

    def generate_stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        cache_salt: str | None = None,
        kv_shift: KVShift | None = None,
    ) -> Iterator[RequestOutput]:
        """Like `generate`, but returns an iterator over every step's outputs (with `new_text` deltas).
        The prompts are checked, and queued, before this returns; closing the iterator (or dropping it, even
        unstarted) aborts the requests it has not finished."""
        return _OutputStream(
            self, self._add(prompts, sampling_params, cache_salt=cache_salt, kv_shift=kv_shift)
        )

    def _run(self, request_ids: list[str], stop: threading.Event | None = None) -> Iterator[RequestOutput]:
        """Every output of the requests until they finish. `stop`, once set, ends it before the next step
        with KeyboardInterrupt (and the unfinished requests are dropped)."""
        pending = set(request_ids)
        try:
            while pending:
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                for output in self._next_outputs(pending):
                    if output.finished:
                        pending.discard(output.request_id)
                    yield output
        finally:
            self._drop(list(pending))  # the caller stopped early: give the pages back
            with self._lock:
                for request_id in request_ids:
                    self._mailboxes.pop(request_id, None)

    def _next_outputs(self, pending: set[str]) -> list[RequestOutput]:
        """Outputs of `pending` requests: those another call's steps left in their mailboxes, else those of
        one more step."""
        with self._step_lock:
            mine = self._take(pending)
            if mine:
                return mine
            outputs = self.engine.step()
            with self._lock:
                for output in outputs:
                    mailbox = self._mailboxes.get(output.request_id)
                    if mailbox is not None:  # None: a request added to the engine directly, not through LLM
                        mailbox.append(output)
            mine = self._take(pending)
            if not (mine or outputs or self.engine.has_unfinished_requests()):
                # Nothing runs and nothing came: the requests are gone (aborted through the engine without an
                # output reaching us). Looping would spin forever.
                raise RuntimeError(f"requests {sorted(pending)} are no longer in the engine")
            return mine

    def _drop(self, request_ids: list[str]) -> None:
        """Aborts, unreported, the requests of a call that is gone, and forgets their mailboxes."""
        with self._lock:
            for request_id in request_ids:
                self._mailboxes.pop(request_id, None)
        for request_id in request_ids:
            self.engine.abort(request_id, report=False)

    def _take(self, request_ids: set[str]) -> list[RequestOutput]:
        with self._lock:
            taken = []
            for request_id in request_ids:
                mailbox = self._mailboxes[request_id]
                taken.extend(mailbox)
                mailbox.clear()
            return taken

    def _add(
        self, prompts, sampling_params, output_kind: str | None = None, first_index: int = 0, **options
    ) -> list[str]:
        """Queues the prompts; output_kind, when given, replaces that of every prompt's parameters; options
        go to every `add_request`. Errors name a prompt by its index plus `first_index`."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _params_list(sampling_params, len(prompt_list))
        if output_kind is not None:
            params_list = [
                dataclasses.replace(p or SamplingParams(), output_kind=output_kind)
                if p is None or isinstance(p, SamplingParams)
                else p  # refused below, naming the prompt
                for p in params_list
            ]
        request_ids = []
        try:
            for index, (prompt, params) in enumerate(zip(prompt_list, params_list, strict=True)):
                try:
                    if _is_conversation(prompt):
                        request_id = self.engine.add_request(
                            messages=list(prompt), sampling_params=params, **options
                        )
                    else:
                        request_id = self.engine.add_request(prompt, params, **options)
                except ValueError as error:
                    raise ValueError(f"prompt {first_index + index}: {error}") from error
                with self._lock:
                    self._mailboxes[request_id] = collections.deque()
                request_ids.append(request_id)
        except BaseException:  # a refused prompt, or an interrupt: none of this call's requests stays queued
            self._drop(request_ids)
            raise
        return request_ids


class _OutputStream:
    """The iterator `generate_stream` returns. A generator never started never runs its `finally`, so this
    wrapper gives the requests back also when the stream is closed or dropped before its first item."""

    def __init__(self, llm: LLM, request_ids: list[str]):
        self._llm = llm
        self._request_ids = request_ids
        self._outputs = llm._run(request_ids)
        self._started = False

    def __iter__(self) -> "_OutputStream":
        return self

    def __next__(self) -> RequestOutput:
        self._started = True
        return next(self._outputs)

    def close(self) -> None:
        if self._started:
            self._outputs.close()  # its `finally` aborts what is unfinished
        else:
            self._started = True
            self._llm._drop(self._request_ids)

    def __del__(self) -> None:
        self.close()
