"""What the engine reports: per request its completions, released text and logprobs.

Text is detokenized incrementally per sample and held back while it could still turn into a stop string, so
a stream never shows text that the final output will not have.
"""

import dataclasses

from jaxpage.beam_search import BeamGroup
from jaxpage.metrics import RequestMetrics, request_metrics
from jaxpage.request import Request, RequestStatus
from jaxpage.sampling_params import SamplingParams
from jaxpage.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass
class CompletionOutput:
    index: int  # which sample of the request (0 .. best_of - 1)
    # text, token_ids and logprobs hold everything so far, or with output_kind "delta" what this output added.
    text: str  # released text; special tokens left out, a matched stop string cut off
    token_ids: list[int]  # generated tokens, including the EOS or stop token that ended generation
    finish_reason: str | None  # "stop", "length", "abort", "error"; None while generating
    # With logprobs = k: per token of token_ids, {token id: logprob} of that token first, then of the k most
    # likely (the chosen one appears once), from the model's unmodified distribution; else None.
    logprobs: list[dict[int, float]] | None
    new_text: str  # what this step added to text
    new_token_ids: list[int]  # what this step added to token_ids
    cumulative_logprob: float  # sum of the sampled tokens' log-probabilities


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # the n completions (with best_of > n: the n best, once finished)
    finished: bool
    metrics: RequestMetrics  # of sample 0
    # With prompt_logprobs = k: per prompt token the same dicts as CompletionOutput.logprobs, None for the
    # first token (nothing precedes it); else None. With output_kind "delta", only in the first output.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # Why the request failed (its finish reasons are then "error"), e.g. non-finite logits; else None.
    error: str | None = None


class TextState:
    """Detokenizes one request incrementally and watches for its stop strings.

    Text that could still be the start of a stop string is held back, so a stream never shows text that the
    final output will not have.
    """

    def __init__(self, tokenizer: Tokenizer, request: Request):
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, request.prompt_token_ids, skip_special_tokens=True
        )
        self.stop = request.sampling_params.stop
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        # No one reads a final-only request's text before it ends, and without stop strings nothing depends
        # on it: its tokens are detokenized in one go at the end (the same text for byte-level BPE
        # tokenizers, where decoding is concatenation; tests/test_tokenizer.py checks SmolLM2's).
        self.deferred = request.sampling_params.output_kind == "final_only" and not self.stop
        self.text = ""
        self.released = 0  # characters of text already handed out
        self.num_tokens = 0  # output tokens already detokenized

    def update(self, token_ids: list[int], finished: bool, check_stop: bool = True) -> bool:
        """Feeds the request's output tokens (all of them; the new ones are taken); True if a stop string
        now appears in the text (looked for only when `check_stop`), which is then cut where it starts."""
        if self.deferred and not finished:
            return False
        start = max(0, len(self.text) - self.holdback)  # a match must end in the new text
        self.text += self.detokenizer.add(token_ids[self.num_tokens :])
        self.num_tokens = len(token_ids)
        if finished:
            self.text += self.detokenizer.flush()
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0] if check_stop else []
        if found:
            self.text = self.text[: min(found)]
        return bool(found)

    def release(self, finished: bool) -> str:
        """The text not yet handed out, short of what may still turn into a stop string."""
        end = len(self.text) if finished else max(self.released, len(self.text) - self.holdback)
        new = self.text[self.released : end]
        self.released = end
        return new


def top_dict(token_id: int, logprob, top_token_ids, top_logprobs) -> dict[int, float]:
    """{token: logprob} of the chosen token first, then the top alternatives (i32[k], f32[k]) in order."""
    top = {int(t): float(lp) for t, lp in zip(top_token_ids, top_logprobs, strict=True)}
    return {int(token_id): float(logprob), **top}


class SampleGroup:
    """The samples of one request and how their completions are reported."""

    def __init__(self, request_id: str, params: SamplingParams, samples: list[Request]):
        self.request_id = request_id
        self.params = params
        self.samples = samples
        self.reported = [0] * len(samples)  # output tokens of each sample already reported
        self.error: str | None = None  # set when the request failed on the device
        self.num_reports = 0  # outputs returned so far

    def output(self, texts: dict[str, TextState]) -> RequestOutput | None:
        """The request's output now, as its `output_kind` asks; None while it has nothing to report: a
        final-only request, or best_of > n samples (the best are unknown), still generating."""
        finished = all(sample.is_finished for sample in self.samples)
        delta = self.params.output_kind == "delta"
        if not finished and (self.params.output_kind == "final_only" or len(self.samples) > self.params.n):
            return None
        chosen = list(range(len(self.samples)))
        if len(self.samples) > self.params.n:
            # The best completed samples; one cut short (aborted, failed) only where too few completed.
            cut_short = (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)
            short = [self.samples[i].status in cut_short for i in chosen]
            chosen.sort(key=lambda i: (short[i], -self.samples[i].cumulative_logprob))
            chosen = sorted(chosen[: self.params.n])
        completions = []
        for index in chosen:
            sample = self.samples[index]
            text = texts[sample.request_id]
            before = self.reported[index]
            self.reported[index] = sample.num_output_tokens
            new_text = text.release(sample.is_finished)
            new_token_ids = sample.output_token_ids[before:]
            logprobs = None
            if sample.sampling_params.logprobs is not None:
                logprobs = sample.output_top_logprobs[before:] if delta else list(sample.output_top_logprobs)
            completions.append(
                CompletionOutput(
                    index=index,
                    text=new_text if delta else text.text[: text.released],
                    token_ids=new_token_ids if delta else list(sample.output_token_ids),
                    finish_reason=sample.status.finish_reason,
                    logprobs=logprobs,
                    new_text=new_text,
                    new_token_ids=new_token_ids,
                    cumulative_logprob=sample.cumulative_logprob,
                )
            )
        first = self.samples[0]
        prompt_logprobs = None
        if self.params.prompt_logprobs is not None and not (delta and self.num_reports):
            prompt_logprobs = list(first.prompt_logprobs)  # with "delta", in the first output only
        self.num_reports += 1
        return RequestOutput(
            self.request_id,
            first.prompt_token_ids,
            completions,
            finished,
            request_metrics(first),
            prompt_logprobs,
            self.error,
        )


def beam_search_output(beams: BeamGroup, tokenizer: Tokenizer) -> RequestOutput:
    """The n best hypotheses, best first; a beam search reports only once it is over."""
    first = beams.first_request
    completions = []
    for index, hypothesis in enumerate(beams.best()):
        token_ids = list(hypothesis.token_ids)
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        wants_logprobs = first.sampling_params.logprobs is not None
        logprobs = [{t: lp} for t, lp in zip(token_ids, hypothesis.logprobs, strict=True)]
        completions.append(
            CompletionOutput(
                index=index,
                text=text,
                token_ids=token_ids,
                finish_reason=hypothesis.finish_reason,
                logprobs=logprobs if wants_logprobs else None,
                new_text=text,
                new_token_ids=token_ids,
                cumulative_logprob=hypothesis.cumulative_logprob,
            )
        )
    prompt_logprobs = first.prompt_logprobs if first.sampling_params.prompt_logprobs is not None else None
    return RequestOutput(
        beams.request_id,
        first.prompt_token_ids,
        completions,
        True,
        request_metrics(first),
        list(prompt_logprobs) if prompt_logprobs is not None else None,
    )


def aborted_beam_search_output(
    beams: BeamGroup, live: list[Request], tokenizer: Tokenizer, error: str | None = None
) -> RequestOutput:
    """The final output of a beam search ended early: the tokens so far of each live beam (`live`, its
    requests), with finish reason "abort" (or "error", with `error` set, when it failed on the device)."""
    reason = "abort" if error is None else "error"
    first = beams.first_request
    completions = []
    for index, request in enumerate(live):
        token_ids = list(request.output_token_ids)
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        completions.append(
            CompletionOutput(
                index=index,
                text=text,
                token_ids=token_ids,
                finish_reason=reason,
                logprobs=None,
                new_text=text,
                new_token_ids=token_ids,
                cumulative_logprob=request.cumulative_logprob,
            )
        )
    return RequestOutput(
        beams.request_id, first.prompt_token_ids, completions, True, request_metrics(first), error=error
    )
