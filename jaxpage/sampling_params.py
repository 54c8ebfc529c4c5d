"""How one request is sampled and when it stops."""

import dataclasses
import zlib

import numpy as np

_SEED_LIMIT = 2**32  # seeds travel to the device as u32
# What each step's RequestOutput holds (vLLM's RequestOutputKind): everything so far, only what the step
# added, or nothing until the request finishes (batch work: no per-step outputs, text detokenized once).
OUTPUT_KINDS = ("cumulative", "delta", "final_only")
# The device samples in float32: a value is accepted only if it keeps its meaning there. Below the smallest
# normal float32, XLA flushes to 0 (top_p 1e-40 would become 0); above the largest, it becomes inf.
_F32_TINY = float(np.finfo(np.float32).tiny)
_F32_MAX = float(np.finfo(np.float32).max)
# The sampler divides the logits by repetition_penalty (at least MIN_REPETITION_PENALTY) and the temperature
# (at least MIN_TEMPERATURE): any logit below 1e30 stays finite in float32. Smaller values would overflow to
# inf and turn the distribution into NaN, or (below float32's smallest normal) round to 0.
MIN_TEMPERATURE = 1e-6
MIN_REPETITION_PENALTY = 0.01
# More samples of one prompt than any use needs; a typo like n=10**9 would otherwise queue that many requests.
MAX_SAMPLES = 1024
# Hypothesis scores divide by length ** length_penalty; this bound keeps that finite up to 10**6 tokens.
MAX_LENGTH_PENALTY = 50


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request with `n` (or `best_of`) > 1 and seed `seed`: sample 0 uses
    the seed itself, sample i > 0 a CRC32 of "seed/i"; each sample equals a request run alone with that
    seed."""
    return seed if index == 0 else zlib.crc32(f"{seed}/{index}".encode())


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters; requests with different parameters share one batch.

    temperature 0 is greedy. top_k 0, top_p 1, min_p 0 and penalties of 1 (repetition) or 0 (presence,
    frequency) switch those off. A request's tokens depend only on its own seed and positions, never on which
    other requests share the batch. A request without a seed uses one derived from its request id, so a run is
    reproducible as a whole. `n` samples of one prompt share its pages; `best_of` >= n samples are generated
    and the n with the highest cumulative logprob returned. Beam search keeps `best_of` (default n) beams.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # drop tokens below min_p times the most likely token's probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output (divides their logit)
    presence_penalty: float = 0.0  # in [-2, 2], subtracted once from the logit of every output token
    frequency_penalty: float = 0.0  # in [-2, 2], subtracted per occurrence in the output
    seed: int | None = None
    stop: tuple[str, ...] = ()  # a str or a list of str is accepted and stored as a tuple
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # until this many tokens: EOS and stop token ids are never drawn, stop strings wait
    logprobs: int | None = None  # None: none; k: the sampled token's log-probability and the k most likely
    prompt_logprobs: int | None = None  # None: none; k: every prompt token's log-probability and top k
    n: int = 1  # completions returned
    best_of: int | None = None  # completions generated (None: n); the n best by cumulative logprob return
    use_beam_search: bool = False
    length_penalty: float = 1.0  # beam score: cumulative logprob / length ** length_penalty
    early_stopping: bool | str = False  # True, False or "never": see jaxpage/beam_search.py
    output_kind: str = "cumulative"  # one of OUTPUT_KINDS

    def __post_init__(self):
        # Normalise the convenient spellings first so the stored value has one type.
        for name in ("stop", "stop_token_ids"):
            if getattr(self, name) is None:  # JSON null, like a null seed, means "none"
                object.__setattr__(self, name, ())
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("logprobs", "prompt_logprobs"):
            if isinstance(getattr(self, name), bool):
                object.__setattr__(self, name, 0 if getattr(self, name) else None)

        if not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        t = self.temperature
        if not (_is_number(t) and (t == 0 or MIN_TEMPERATURE <= t <= _F32_MAX)):
            raise ValueError(
                f"temperature must be 0 (greedy) or a number in [{MIN_TEMPERATURE}, {_F32_MAX:.4g}] "
                f"(float32), got {t!r}"
            )
        if not (_is_number(self.top_p) and _F32_TINY <= self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] and >= {_F32_TINY:.4g} (float32), got {self.top_p!r}")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (_is_number(self.min_p) and (self.min_p == 0 or _F32_TINY <= self.min_p <= 1)):
            raise ValueError(f"min_p must be 0 or in [{_F32_TINY:.4g}, 1] (float32), got {self.min_p!r}")
        rp = self.repetition_penalty
        if not (_is_number(rp) and MIN_REPETITION_PENALTY <= rp <= _F32_MAX):
            raise ValueError(
                f"repetition_penalty must be a number in [{MIN_REPETITION_PENALTY}, {_F32_MAX:.4g}] "
                f"(float32), got {rp!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (_is_number(value) and -2 <= value <= 2):
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < _SEED_LIMIT):
            raise ValueError(f"seed must be an int in [0, 2**32) or None, got {self.seed!r}")
        if not (isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop)):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if not (
            isinstance(self.stop_token_ids, tuple) and all(_is_int(t) and t >= 0 for t in self.stop_token_ids)
        ):
            raise ValueError(f"stop_token_ids must be a list of ints >= 0, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if not (_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens):
            raise ValueError(f"min_tokens must be an int in [0, max_tokens], got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value >= 0):
                raise ValueError(f"{name} must be None, a bool or an int >= 0, got {value!r}")
        if not (_is_int(self.n) and 1 <= self.n <= MAX_SAMPLES):
            raise ValueError(f"n must be an int in [1, {MAX_SAMPLES}], got {self.n!r}")
        if self.best_of is not None and not (_is_int(self.best_of) and self.n <= self.best_of <= MAX_SAMPLES):
            raise ValueError(
                f"best_of must be None or an int in [n ({self.n}), {MAX_SAMPLES}], got {self.best_of!r}"
            )
        if not isinstance(self.use_beam_search, bool):
            raise ValueError(f"use_beam_search must be a bool, got {self.use_beam_search!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        lp = self.length_penalty
        # length ** length_penalty is computed in Python floats, which raise OverflowError past ~1e308.
        if not (_is_number(lp) and -MAX_LENGTH_PENALTY <= lp <= MAX_LENGTH_PENALTY):
            raise ValueError(
                f"length_penalty must be a number in [-{MAX_LENGTH_PENALTY}, {MAX_LENGTH_PENALTY}], "
                f"got {lp!r}"
            )
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        if self.use_beam_search:
            self._check_beam_search()

    def _check_beam_search(self) -> None:
        # Beam search is deterministic, and its scores are logprobs of the unmodified logits: every parameter
        # that samples or changes the logits contradicts it.
        contradicting = {
            "temperature": (self.temperature, 0),
            "top_p": (self.top_p, 1.0),
            "top_k": (self.top_k, 0),
            "min_p": (self.min_p, 0.0),
            "repetition_penalty": (self.repetition_penalty, 1.0),
            "presence_penalty": (self.presence_penalty, 0.0),
            "frequency_penalty": (self.frequency_penalty, 0.0),
            "min_tokens": (self.min_tokens, 0),
        }
        for name, (value, off) in contradicting.items():
            if value != off:
                raise ValueError(f"{name} must be {off} with use_beam_search, got {value!r}")
        if self.stop:
            raise ValueError(f"stop strings are not supported with use_beam_search, got {self.stop!r}")
        if self.logprobs:
            # A hypothesis keeps its tokens' logprobs, not the alternatives its beams were offered.
            raise ValueError(f"logprobs must be None or 0 with use_beam_search, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def num_samples(self) -> int:
        """Completions generated: best_of, else n."""
        return self.best_of if self.best_of is not None else self.n
