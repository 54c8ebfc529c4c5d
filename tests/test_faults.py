"""Faults of the model on the device fail one request, never the engine: non-finite logits in one request end
it with finish reason "error" while its batch neighbours finish as they would alone, and its pages go back
to the pool."""

import numpy as np
import pytest

from jaxpage import LLM, SamplingParams

POISON = 1234  # a token id whose embedding row is NaN: any request containing it computes NaN logits
GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def llm():
    # Untied embeddings, so that the poisoned row reaches only the hidden states of requests that contain the
    # token, not every request's logits through the output projection.
    llm = LLM.from_gin(["configs/tiny_test.gin"], ["ModelConfig.tie_word_embeddings = False"])
    runner = llm.engine.runner
    runner.params["embed"] = runner.params["embed"].at[POISON].set(np.nan)
    return llm


def test_non_finite_logits_fail_that_request_alone(llm):
    good = [[5, 6, 7, 8] * 5, [9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    alone = [o.outputs[0].token_ids for o in llm.generate(good, GREEDY)]
    poisoned = [[1, 2, POISON, 3] * 6, [POISON]]
    beam = SamplingParams(max_tokens=4, use_beam_search=True, n=2, temperature=0)
    sampled = SamplingParams(max_tokens=8, n=2, temperature=1.0)
    outputs = llm.generate(
        [good[0], poisoned[0], good[1], poisoned[1], poisoned[0]], [GREEDY, sampled, GREEDY, beam, GREEDY]
    )
    assert [o.outputs[0].token_ids for o in (outputs[0], outputs[2])] == alone
    assert outputs[0].error is None and outputs[2].error is None
    for output in (outputs[1], outputs[3], outputs[4]):
        assert "non-finite logits" in output.error
        assert output.outputs and all(c.finish_reason == "error" for c in output.outputs)
    engine = llm.engine
    assert engine.scheduler.requests == {}
    assert engine.pool.num_free_pages == engine.pool.num_usable_pages
    # The engine goes on serving as before.
    assert [o.outputs[0].token_ids for o in llm.generate(good, GREEDY)] == alone


def test_a_stream_reports_the_failure_as_the_final_output(llm):
    finals = [o for o in llm.generate_stream([[POISON, 5, 6]], GREEDY) if o.finished]
    assert len(finals) == 1 and finals[0].outputs[0].finish_reason == "error"
