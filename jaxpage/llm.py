"""`LLM`: generate for a list of prompts or conversations in one call, batched by the engine."""

from collections.abc import Iterator, Sequence

from jaxpage.config import EngineConfig
from jaxpage.engine import LLMEngine, RequestOutput
from jaxpage.sampling_params import SamplingParams
from models.config import ModelConfig

Prompt = str | list[int] | list[dict]  # text, token ids, or one conversation of {role, content} messages


def _as_prompt_list(prompts) -> list[Prompt]:
    # A bare string, token list or conversation is one prompt; a list of them is many.
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], dict | int):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts:
        return list(prompts)
    raise ValueError(f"prompts must be a prompt or a non-empty list of them, got {prompts!r}")


class LLM:
    """The engine behind a batch `generate`.

    Build it from an `EngineConfig`, from its fields as keywords (`LLM(num_pages=256)`), or from gin files
    with `LLM.from_gin`. `random_model` gives random weights of that shape instead of loading `config.model`
    (see `LLMEngine`).
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
        self.engine = LLMEngine(
            config if config is not None else EngineConfig(**kwargs),
            random_model=random_model,
            random_weight_scale=random_weight_scale,
        )

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
    ) -> list[RequestOutput]:
        """Generates for every prompt at once and returns the finished outputs in the prompts' order.

        Args:
          prompts: a text, a list of token ids, a conversation (list of {role, content}), or a list of those.
          sampling_params: one for all prompts, or one per prompt; default `SamplingParams()`.
        Raises:
          ValueError naming the prompt's index and the field, before anything runs, if a prompt is unusable.
        """
        request_ids = self._add(prompts, sampling_params)
        finals = {output.request_id: output for output in self._run(request_ids) if output.finished}
        return [finals[request_id] for request_id in request_ids]

    def generate_stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Like `generate`, but returns an iterator over every step's outputs (with `new_text` deltas).
        The prompts are checked, and queued, before this returns."""
        return self._run(self._add(prompts, sampling_params))

    def _run(self, request_ids: list[str]) -> Iterator[RequestOutput]:
        pending = set(request_ids)
        try:
            while pending:
                for output in self.engine.step():
                    if output.finished:
                        pending.discard(output.request_id)
                    yield output
        finally:
            for request_id in pending:  # the caller stopped early: give the pages back
                self.engine.abort(request_id)

    def _add(self, prompts, sampling_params) -> list[str]:
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries for {len(prompt_list)} prompts"
                )
        request_ids = []
        try:
            for index, (prompt, params) in enumerate(zip(prompt_list, params_list, strict=True)):
                try:
                    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
                        request_ids.append(self.engine.add_request(messages=prompt, sampling_params=params))
                    else:
                        request_ids.append(self.engine.add_request(prompt, params))
                except ValueError as error:
                    raise ValueError(f"prompt {index}: {error}") from error
        except ValueError:
            for request_id in request_ids:
                self.engine.abort(request_id)
            raise
        return request_ids
