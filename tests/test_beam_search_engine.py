"""Beam search through `LLM.generate` on the tiny model: the engine's beams, on shared and forked pages,
equal a plain reference beam search that recomputes every hypothesis with the model alone, also when a small
pool preempts beams, and next to ordinary requests in the same batch."""

import pytest
from beam_reference import model_logprobs, reference_beam_search

from jaxpage import LLM, SamplingParams

PROMPTS = [[5, 17, 301], [9000, 42], [123, 4567, 89, 10, 11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def llm():
    return LLM.from_gin(["configs/tiny_test.gin"])


@pytest.fixture(scope="module")
def small_pool_llm():
    # 7 usable pages of 8 tokens: three searches of 3 beams (up to 3 pages a beam, the first ones shared) and
    # a plain request must take turns.
    return LLM.from_gin(["configs/tiny_test.gin"], ["EngineConfig.num_pages = 8"])


def beam_params(**kwargs) -> SamplingParams:
    fields = dict(use_beam_search=True, temperature=0, n=2, best_of=3, max_tokens=8) | kwargs
    return SamplingParams(**fields)


def reference(llm, prompt, params):
    engine = llm.engine
    logprobs_of = model_logprobs(engine.runner.params, engine.model_config, max_len=32)
    return reference_beam_search(
        logprobs_of,
        prompt,
        width=params.best_of,
        max_tokens=params.max_tokens,
        length_penalty=params.length_penalty,
        early_stopping=params.early_stopping,
        stop_token_ids=frozenset(engine.tokenizer.eos_token_ids),
        n=params.n,
    )


def assert_equal_to_reference(llm, prompt, params, output):
    expected = reference(llm, prompt, params)
    assert [tuple(c.token_ids) for c in output.outputs] == [tokens for tokens, _ in expected]
    for completion, (tokens, score) in zip(output.outputs, expected, strict=True):
        length = len(tokens) ** params.length_penalty
        assert completion.cumulative_logprob / length == pytest.approx(score, abs=1e-4)
        assert completion.finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(length_penalty=0.0, early_stopping=True), dict(length_penalty=2.0, early_stopping="never")],
)
def test_beam_search_equals_a_reference_that_recomputes_every_hypothesis(llm, kwargs):
    params = beam_params(**kwargs)
    outputs = llm.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.finished and len(output.outputs) == params.n
        assert_equal_to_reference(llm, prompt, params, output)


def test_beams_share_pages_and_survive_preemption_next_to_plain_requests(small_pool_llm):
    llm = small_pool_llm
    params = beam_params()
    greedy = SamplingParams(temperature=0, max_tokens=12)
    plain_alone = llm.generate(PROMPTS[2], greedy)[0].outputs[0].token_ids
    before = llm.engine.metrics()
    outputs = llm.generate(PROMPTS + [PROMPTS[2]], [params] * len(PROMPTS) + [greedy])
    after = llm.engine.metrics()
    assert after.num_preemptions > before.num_preemptions, "the pool was meant to be too small"
    assert after.num_copies > before.num_copies, "forked beams copy their shared last page on write"
    for prompt, output in zip(PROMPTS, outputs[:-1], strict=True):
        assert_equal_to_reference(llm, prompt, params, output)
    assert outputs[-1].outputs[0].token_ids == plain_alone
    assert llm.engine.pool.num_free_pages == llm.engine.pool.num_usable_pages


def test_beam_search_reports_prompt_logprobs_and_its_tokens_logprobs(llm):
    params = beam_params(logprobs=0, prompt_logprobs=1)
    output = llm.generate(PROMPTS[0], params)[0]
    assert len(output.prompt_logprobs) == len(PROMPTS[0]) and output.prompt_logprobs[0] is None
    for completion in output.outputs:
        assert [next(iter(d)) for d in completion.logprobs] == completion.token_ids
        total = sum(next(iter(d.values())) for d in completion.logprobs)
        assert total == pytest.approx(completion.cumulative_logprob, abs=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(best_of=11), "must be <= max_logprobs / 2"),
        (dict(temperature=0.7), "temperature must be 0 with use_beam_search, got 0.7"),
        (dict(stop=["a"]), "stop strings are not supported with use_beam_search"),
    ],
)
def test_a_contradicting_beam_request_is_refused_alone(llm, change, message):
    fields = dict(use_beam_search=True, temperature=0, n=2, best_of=3, max_tokens=4) | change
    with pytest.raises(ValueError, match=message):
        llm.generate(PROMPTS[0], SamplingParams(**fields))
    assert llm.generate(PROMPTS[1], beam_params())[0].finished


def test_aborting_a_beam_search_mid_way_frees_its_pages(llm):
    engine = llm.engine
    request_id = engine.add_request(PROMPTS[2], beam_params(max_tokens=20))
    for _ in range(4):
        engine.step()
    assert engine.pool.num_free_pages < engine.pool.num_usable_pages
    engine.abort(request_id)
    assert not engine.has_unfinished_requests()
