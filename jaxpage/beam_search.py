"""Beam search as a group of requests that share pages: which beams go on with which token, and which
hypotheses are finished. Host only.

The rules are HF transformers' (`generate` with `num_beams`, transformers 5.x), on the log-probabilities of
the unmodified logits:
- Each round every live beam offers its best tokens; of all (beam, token) pairs the 2 * width with the highest
  cumulative logprob are ranked.
- A pair whose token is a stop token, or whose hypothesis reaches `max_tokens`, ends a hypothesis: if its rank
  is below `width` it joins the finished ones with score `cumulative_logprob / num_tokens ** length_penalty`,
  `num_tokens` counting every generated token including the final stop token; the best `width` finished are
  kept. The best `width` other pairs are the next round's live beams.
- The search ends when no pair goes on; with `early_stopping` True, once `width` hypotheses are finished;
  otherwise once `width` are finished and the best live beam's `cumulative_logprob / L ** length_penalty` is
  no better than the worst finished score, L being the beams' current length, or `max_tokens` when
  `early_stopping` is "never" and `length_penalty` > 0 (HF's heuristic; "never" with penalty 0 is the exact
  classic stopping rule).

Two deliberate differences: HF ranks (1 + number of EOS ids) * width pairs when there are several EOS ids, we
rank 2 * width as vLLM does, so that `2 * width <= max_logprobs` candidates per beam always suffice (with
several stop tokens a round may then go on with fewer than `width` beams); and HF pads the first round's (and
any short round's) beams with copies scored -1e9, whereas here such a round just has fewer live beams, so a
vocabulary smaller than the width yields no placeholder hypotheses.
"""

import dataclasses
import math

from jaxpage.request import Request, RequestStatus
from jaxpage.sampling_params import SamplingParams
from jaxpage.scheduler import Scheduler


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    width: int  # live beams at most, and finished hypotheses kept
    n: int  # hypotheses returned, best first
    max_tokens: int  # generated tokens at most, a final stop token included
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never" (see the module docstring)
    stop_token_ids: frozenset[int] = frozenset()  # tokens that end a hypothesis

    def __post_init__(self):
        if not (isinstance(self.width, int) and self.width >= 1):
            raise ValueError(f"beam width must be an int >= 1, got {self.width!r}")
        if not (isinstance(self.n, int) and 1 <= self.n <= self.width):
            raise ValueError(f"n must be an int in [1, beam width ({self.width})], got {self.n!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.length_penalty, int | float) and math.isfinite(self.length_penalty)):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


def beam_search_params(
    params: SamplingParams, eos_token_ids: frozenset[int], *, max_logprobs: int, max_new_tokens: int
) -> BeamSearchParams:
    """The beam search a request with `use_beam_search` asks for, or a ValueError naming the field that beam
    search cannot honour. `SamplingParams` itself refuses the parameters that contradict beam search.

    Args:
      eos_token_ids: the model's; they end a hypothesis unless `ignore_eos`.
      max_logprobs: candidates the sampler returns per row; each beam needs 2 * width of them.
      max_new_tokens: what max_model_len leaves after the prompt; caps max_tokens.
    """
    assert params.use_beam_search
    width = params.num_samples
    if 2 * width > max_logprobs:
        raise ValueError(
            f"the beam width (best_of, else n) must be <= max_logprobs / 2 ({max_logprobs // 2}): every beam "
            f"offers its 2 * width best tokens, got {width}"
        )
    stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)
    return BeamSearchParams(
        width=width,
        n=params.n,
        max_tokens=min(params.max_tokens, max_new_tokens),
        length_penalty=params.length_penalty,
        early_stopping=params.early_stopping,
        stop_token_ids=stop,
    )


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    token_ids: tuple[int, ...]  # generated tokens, the final stop token included
    logprobs: tuple[float, ...]  # of each token
    cumulative_logprob: float
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens)


@dataclasses.dataclass(frozen=True)
class Continuation:
    beam: int  # the live beam that carries the token: `parent` itself for its best continuation, else new
    parent: int
    token_id: int
    logprob: float
    cumulative_logprob: float


@dataclasses.dataclass(frozen=True)
class BeamStep:
    continuations: list[Continuation]  # the next round's live beams, best first (empty once done)
    dropped: list[int]  # beams of the round that go on no further (all of them once done)
    done: bool


@dataclasses.dataclass(frozen=True)
class _Beam:
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    cumulative_logprob: float


class BeamSearch:
    """The state of one beam search: live beams in rank order, the finished hypotheses, and the candidates
    gathered in the current round. Beam 0 is the prompt; beams advance in lock-step, one token a round."""

    def __init__(self, params: BeamSearchParams):
        self.params = params
        self._beams: dict[int, _Beam] = {0: _Beam((), (), 0.0)}  # insertion order = rank
        self._candidates: dict[int, list[tuple[int, float]]] = {}
        self.finished: list[Hypothesis] = []  # best first, at most width
        self.num_generated = 0  # tokens of every live beam
        self.done = False
        self._next_beam = 1

    @property
    def live_beams(self) -> list[int]:
        return list(self._beams)

    def token_ids(self, beam: int) -> tuple[int, ...]:
        return self._beams[beam].token_ids

    def add_candidates(self, beam: int, token_ids, logprobs) -> None:
        """The next-token candidates of a live beam: token_ids i32[K], logprobs f32[K]. K >= 2 * width makes
        the round exact (the best 2 * width pairs can all come from one beam); non-finite entries are
        ignored."""
        assert not self.done and beam in self._beams and beam not in self._candidates, beam
        self._candidates[beam] = [
            (int(t), float(lp)) for t, lp in zip(token_ids, logprobs, strict=True) if math.isfinite(lp)
        ]

    @property
    def ready(self) -> bool:
        """Whether every live beam has its candidates, so the round can be decided."""
        return not self.done and len(self._candidates) == len(self._beams)

    def advance(self) -> BeamStep:
        """Decides the round (see the module docstring)."""
        assert self.ready
        p = self.params
        pairs = [
            (beam.cumulative_logprob + logprob, parent, token, logprob)
            for parent, beam in self._beams.items()
            for token, logprob in self._candidates[parent]
        ]
        pairs.sort(key=lambda pair: -pair[0])  # stable: ties keep beam rank, then candidate order
        length = self.num_generated + 1
        going_on = []
        for rank, (total, parent, token, logprob) in enumerate(pairs[: 2 * p.width]):
            stops = token in p.stop_token_ids
            if stops or length >= p.max_tokens:
                if rank < p.width:
                    self._finish(parent, token, logprob, total, "stop" if stops else "length")
            elif len(going_on) < p.width:
                going_on.append((total, parent, token, logprob))
        self.num_generated = length
        self._candidates = {}
        full = len(self.finished) == p.width
        self.done = not going_on or (full and (p.early_stopping is True or not self._can_improve(going_on)))
        old, self._beams = self._beams, {}
        continuations = []
        for total, parent, token, logprob in [] if self.done else going_on:
            beam = parent
            if parent in self._beams:  # the parent already goes on with a better token: fork
                beam, self._next_beam = self._next_beam, self._next_beam + 1
            before = old[parent]
            self._beams[beam] = _Beam(before.token_ids + (token,), before.logprobs + (logprob,), total)
            continuations.append(Continuation(beam, parent, token, logprob, total))
        return BeamStep(continuations, [b for b in old if b not in self._beams], self.done)

    def best(self) -> list[Hypothesis]:
        """The n best finished hypotheses, best first."""
        return self.finished[: self.params.n]

    def _finish(self, parent: int, token: int, logprob: float, total: float, reason: str) -> None:
        before = self._beams[parent]
        tokens = before.token_ids + (token,)
        score = total / len(tokens) ** self.params.length_penalty
        self.finished.append(Hypothesis(tokens, before.logprobs + (logprob,), total, score, reason))
        self.finished.sort(key=lambda h: -h.score)  # stable: an earlier hypothesis wins a tie
        del self.finished[self.params.width :]

    def _can_improve(self, going_on: list[tuple]) -> bool:
        p = self.params
        # A positive penalty favours longer hypotheses: "never" bounds the best one by the longest possible.
        never = p.early_stopping == "never" and p.length_penalty > 0
        length = p.max_tokens if never else self.num_generated
        return going_on[0][0] / length**p.length_penalty > self.finished[-1].score


class BeamGroup:
    """One beam-search request served by a `Scheduler`: live beam k runs as request `"{key}#beam{k}"`, where
    `key` (default: the request id) is the engine's internal name of the request.

    After each step, `update` takes a beam's candidates; the beam is held until the rest of the group has
    theirs, then the round is applied: every beam that goes on replaces its uncomputed last token with its
    chosen one, a beam with several continuations forks (sharing its pages), and the others are finished.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        beam_params: BeamSearchParams,
        *,
        extra_key=None,
        key: str | None = None,
    ):
        self.request_id = request_id
        self.key = request_id if key is None else key
        self.search = BeamSearch(beam_params)
        # The group, not the scheduler, ends hypotheses: a beam whose likeliest token is EOS may still go on
        # with another token. The scheduler's max_tokens stop agrees with the group's last round.
        request_params = dataclasses.replace(
            params, n=1, best_of=None, max_tokens=beam_params.max_tokens, ignore_eos=True, stop_token_ids=()
        )
        self.first_request = Request(
            self._request_id(0), prompt_token_ids, request_params, extra_key=extra_key
        )
        self._request_of: dict[int, str] = {0: self.first_request.request_id}  # live beam -> request id
        self._beam_of: dict[str, int] = {self.first_request.request_id: 0}

    @property
    def request_ids(self) -> list[str]:
        """The requests of the live beams."""
        return list(self._request_of.values())

    @property
    def finished(self) -> bool:
        return self.search.done

    def best(self) -> list[Hypothesis]:
        return self.search.best()

    def update(self, scheduler: Scheduler, request: Request, top_token_ids, top_logprobs) -> list[str]:
        """Takes the candidates (i32[K], f32[K]) sampled for `request`, one of the group's, in the step that
        computed its last token; call it after `scheduler.update_from_output`.

        Returns:
          The ids of the requests it ended (a swapped one's host copy can go).
        """
        self.search.add_candidates(self._beam_of[request.request_id], top_token_ids, top_logprobs)
        if not self.search.ready:
            if not request.is_finished:  # finished: the scheduler's max_tokens stop, the group's last round
                scheduler.hold(request.request_id)
            return []
        step = self.search.advance()
        ended = []
        for beam in step.dropped:
            ended.append(self._request_of.pop(beam))
            del self._beam_of[ended[-1]]
            scheduler.finish_request(ended[-1], RequestStatus.FINISHED_ABORTED)
        for c in step.continuations:
            if c.beam != c.parent:
                self._request_of[c.beam] = self._request_id(c.beam)
                self._beam_of[self._request_of[c.beam]] = c.beam
                scheduler.fork_request(self._request_of[c.parent], self._request_of[c.beam])
        for c in step.continuations:  # after the forks, which copy the parent's tokens
            request_id = self._request_of[c.beam]
            scheduler.replace_last_token(request_id, c.token_id, c.logprob, c.cumulative_logprob)
            scheduler.release(request_id)
        return ended

    def abort(self, scheduler: Scheduler) -> list[str]:
        """Ends every live beam; returns their request ids."""
        ended = list(self._request_of.values())
        for request_id in ended:
            scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        self._request_of.clear()
        self._beam_of.clear()
        return ended

    def _request_id(self, beam: int) -> str:
        return f"{self.key}#beam{beam}"
