"""A model whose embedding table is larger than its tokenizer's vocabulary (Qwen2.5: 151,936 rows for 151,665
tokens) never samples, reports or accepts the padding ids."""

import pytest

from jaxpage import LLM, SamplingParams

TOKENIZER_SIZE = 49152  # the SmolLM2 tokenizer of configs/tiny_test.gin


@pytest.fixture(scope="module")
def llm():
    # Weights at scale 1 make the padding rows as likely as real ones: without the mask, most of 8 x 150
    # draws at temperature 1.5 land on one of the 10,848 padding ids.
    return LLM.from_gin(
        ["configs/tiny_test.gin"],
        ["ModelConfig.vocab_size = 60000", "engine_setup.random_weight_scale = 1.0"],
    )


def test_sampling_never_draws_or_reports_a_padding_id(llm):
    params = SamplingParams(temperature=1.5, max_tokens=150, logprobs=5, prompt_logprobs=5, seed=0)
    outputs = llm.generate([f"prompt {i}" for i in range(8)], params)
    assert [o.outputs[0].finish_reason for o in outputs] == ["length"] * 8
    for output in outputs:
        completion = output.outputs[0]
        assert max(completion.token_ids) < TOKENIZER_SIZE
        assert all(max(position) < TOKENIZER_SIZE for position in completion.logprobs)
        assert all(max(position) < TOKENIZER_SIZE for position in output.prompt_logprobs[1:])
        # The logprobs are normalised over the real tokens only.
        assert all(lp <= 0 for position in completion.logprobs for lp in position.values())


def test_greedy_and_beam_search_stay_inside_the_tokenizer(llm):
    greedy = llm.generate(["a", "b c"], SamplingParams(temperature=0, max_tokens=40))
    assert all(max(o.outputs[0].token_ids) < TOKENIZER_SIZE for o in greedy)
    beams = llm.generate("a", SamplingParams(temperature=0, max_tokens=8, use_beam_search=True, n=3))
    assert all(max(c.token_ids) < TOKENIZER_SIZE for c in beams[0].outputs)


@pytest.mark.parametrize(
    "params, message",
    [
        (None, r"prompt token ids must be a non-empty list of ints in \[0, 49152\), got 50000 at index 1"),
        (SamplingParams(stop_token_ids=[50000]), "stop_token_ids must be < the vocabulary size 49152"),
    ],
)
def test_padding_ids_are_refused_in_requests(llm, params, message):
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request([1, 50000] if params is None else [1, 2], params)
    assert not llm.engine.has_unfinished_requests()
