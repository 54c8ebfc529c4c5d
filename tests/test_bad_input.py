"""Bad input at the Python API: each case is refused with a ValueError naming the field, and leaves the
engine serving the rest with every page back (issue "nothing a user sends can crash the engine")."""

import numpy as np
import pytest

from jaxpage import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def llm():
    return LLM.from_gin(["configs/tiny_test.gin"])


def finished_ids(engine) -> list[str]:
    return [output.request_id for output in engine.stream() if output.finished]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("bad \ud800", r"prompt is not valid Unicode: lone surrogate '\\ud800' at index 4"),
        ([True, False, 5], "prompt token ids must be .* got bool True at index 0"),
        ([1, 2.0], "prompt token ids must be .* got float 2.0 at index 1"),
        ([49152], r"prompt token ids must be a non-empty list of ints in \[0, 49152\), got 49152"),
        (np.zeros((2, 2), np.int32), "got an array of shape"),
        (b"bytes", "prompt must be a str or a list of token ids, got bytes"),
    ],
)
def test_a_bad_prompt_is_refused_and_the_engine_serves_the_rest(llm, prompt, message):
    engine = llm.engine
    good = engine.add_request("Hello", GREEDY)
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, GREEDY)
    assert finished_ids(engine) == [good]


def test_a_lone_surrogate_in_a_chat_message_names_the_message(llm):
    with pytest.raises(ValueError, match=r"messages\[1\]\.content is not valid Unicode"):
        llm.engine.add_request(
            messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x\udfff"}]
        )
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "prompts, params, message",
    [
        (["ok", "bad \ud800"], GREEDY, "prompt 1: prompt is not valid Unicode"),
        (["ok", "fine"], [GREEDY, {"max_tokens": 3}], "prompt 1: sampling_params must be a SamplingParams"),
        (["ok"], {"max_tokens": 3}, "sampling_params must be a SamplingParams, a list of them"),
        (b"bytes", GREEDY, "prompts must be one prompt or a non-empty list of them.*got bytes"),
        ([], GREEDY, "prompts must be one prompt or a non-empty list of them"),
        (["ok", 3.5], GREEDY, "prompt 1 is float 3.5"),
    ],
)
def test_generate_refuses_a_bad_batch_whole_and_leaves_nothing_queued(llm, prompts, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, params)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate("ok", GREEDY)[0].outputs[0].finish_reason == "length"


def test_token_prompts_may_be_tuples_numpy_ints_or_arrays(llm):
    ids = [5, 6, 7, 8]
    expected = llm.generate([ids], GREEDY)[0].outputs[0].token_ids
    for prompt in (tuple(ids), [np.int64(t) for t in ids], np.array(ids, np.int32)):
        outputs = llm.generate(prompt, GREEDY)
        assert len(outputs) == 1 and outputs[0].outputs[0].token_ids == expected
    assert [len(o.outputs) for o in llm.generate((ids, "text"), GREEDY)] == [1, 1]  # a tuple of prompts


@pytest.mark.parametrize(
    "fields, message",
    [
        # Each value is a float64 the old checks passed that float32 sampling would turn into 0 or inf.
        (dict(top_p=1e-40), "top_p must be in"),
        (dict(temperature=1e300), "temperature must be 0 .greedy. or a number in"),
        (dict(temperature=1e-7), "temperature must be 0 .greedy. or a number in \\[1e-06"),
        (dict(min_p=1e-40), "min_p must be 0 or in"),
        # 1.2e-38 is a float32, but a logit divided by it overflows to inf.
        (dict(repetition_penalty=1.2e-38), "repetition_penalty must be a number in \\[0.01"),
        (dict(repetition_penalty=1e300), "repetition_penalty must be a number in \\[0.01"),
        (dict(length_penalty=1e300), "length_penalty must be a number in \\[-50, 50\\]"),
        (dict(n=10**9), "n must be an int in \\[1, 1024\\]"),
        (dict(stop=[""]), "stop must be a non-empty string"),
    ],
)
def test_sampling_values_that_float32_would_change_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_null_stop_and_stop_token_ids_mean_none_like_a_null_seed():
    params = SamplingParams(stop=None, stop_token_ids=None, seed=None)
    assert params.stop == () and params.stop_token_ids == ()


def test_min_tokens_that_max_model_len_cannot_reach_is_refused_at_admission(llm):
    prompt = [5] * 250  # max_model_len is 256: room for 6 output tokens
    with pytest.raises(ValueError, match=r"min_tokens \(10\) cannot be met: .* room for 6 output tokens"):
        llm.engine.add_request(prompt, SamplingParams(max_tokens=20, min_tokens=10))
    output = llm.generate([prompt], SamplingParams(max_tokens=20, min_tokens=6, temperature=0))[0]
    assert output.outputs[0].finish_reason == "length" and len(output.outputs[0].token_ids) == 6


def test_user_ids_cannot_collide_with_the_ids_of_samples_or_beams(llm):
    engine = llm.engine
    bystander = engine.add_request("Hello", GREEDY, request_id="job#1")
    with pytest.raises(ValueError, match="leaves no room"):
        engine.add_request("word " * 300, SamplingParams(n=2), request_id="job")
    plain = engine.add_request("Hello", GREEDY, request_id="x#beam1")
    beams = engine.add_request(
        "Hello", SamplingParams(max_tokens=3, temperature=0, use_beam_search=True, n=2), request_id="x"
    )
    sampled = engine.add_request("Hello", SamplingParams(max_tokens=3, n=2), request_id="x#0")
    finals = {output.request_id: output for output in engine.stream() if output.finished}
    assert sorted(finals) == sorted([bystander, plain, beams, sampled])
    assert finals[bystander].outputs[0].finish_reason == "length"
    assert len(finals[beams].outputs) == 2 and len(finals[sampled].outputs) == 2


def test_request_ids_must_be_text_and_default_ids_skip_taken_ones(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="request_id must be a str, got 7"):
        engine.add_request("Hello", GREEDY, request_id=7)
    taken = f"request-{int(engine.add_request('Hello', GREEDY).split('-')[1]) + 1}"
    engine.add_request("Hello", GREEDY, request_id=taken)
    assert engine.add_request("Hello", GREEDY) != taken
    assert len(finished_ids(engine)) == 3


def test_one_sample_of_a_request_can_be_aborted(llm):
    engine = llm.engine
    request_id = engine.add_request("Hello", SamplingParams(max_tokens=12, n=3, temperature=1.0, seed=3))
    reported = None  # sample 1's tokens as last reported (overlapped steps report them one step late)
    while reported is None:
        for output in engine.step():
            reported = output.outputs[1].token_ids
    assert engine.abort(request_id, index=1)
    assert not engine.abort(request_id, index=1)  # already over
    with pytest.raises(ValueError, match=r"index must be None or an int in \[0, 3\)"):
        engine.abort(request_id, index=3)
    (final,) = [output for output in engine.stream() if output.finished]
    assert [c.finish_reason for c in final.outputs] == ["length", "abort", "length"]
    assert [len(c.token_ids) for c in final.outputs] == [12, len(reported), 12]
    assert final.outputs[1].token_ids == reported and reported


def test_aborting_a_beam_search_reports_its_live_beams(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=20, temperature=0, use_beam_search=True, n=2)
    request_id = engine.add_request("Hello", params)
    for _ in range(4):
        engine.step()
    assert engine.abort(request_id)
    (final,) = [output for output in engine.stream() if output.finished]
    assert final.request_id == request_id and final.outputs
    assert all(c.finish_reason == "abort" and 0 < len(c.token_ids) < 20 for c in final.outputs)


def test_a_silent_abort_after_a_reported_sample_abort_leaves_the_engine_stepping(llm):
    engine = llm.engine
    request_id = engine.add_request("Hello", SamplingParams(n=2, max_tokens=8, temperature=1.0))
    other = engine.add_request("Paging is", GREEDY)
    engine.step()
    assert engine.abort(request_id, index=0)  # its output is due next step...
    assert engine.abort(request_id, report=False)  # ...but the caller is gone
    assert finished_ids(engine) == [other]


def test_abort_refuses_what_is_not_a_request_id_or_an_index(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="request_id must be a str"):
        engine.abort(["x"])
    request_id = engine.add_request(
        "Hello", SamplingParams(max_tokens=4, temperature=0, use_beam_search=True, n=2)
    )
    with pytest.raises(ValueError, match="index must be None for beam search request"):
        engine.abort(request_id, index=0)
    assert finished_ids(engine) == [request_id]


def test_a_stream_dropped_before_its_first_item_gives_its_requests_back(llm):
    stream = llm.generate_stream(["a", "b"], GREEDY)
    assert llm.engine.has_unfinished_requests()
    del stream
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate("c", GREEDY)[0].outputs[0].finish_reason == "length"
