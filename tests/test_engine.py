"""The engine and `LLM.generate` on the tiny random model (configs/tiny_test.gin), and on SmolLM2 where words
matter. Every test ends with the page pool as full as it started."""

import pytest

from jaxpage import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0)
PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog. " * 6, "1 2 3 4 5 6 7", "Paging is"]


@pytest.fixture(scope="module")
def llm():
    return LLM.from_gin(["configs/tiny_test.gin"])


def token_ids(outputs):
    return [output.outputs[0].token_ids for output in outputs]


def test_batched_greedy_equals_each_prompt_alone(llm):
    batched = token_ids(llm.generate(PROMPTS, GREEDY))
    assert batched == [token_ids(llm.generate(prompt, GREEDY))[0] for prompt in PROMPTS]
    assert all(len(ids) == 12 for ids in batched) and len({tuple(ids) for ids in batched}) == len(PROMPTS)


def test_seeded_sample_does_not_depend_on_its_batch_neighbours(llm):
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    alone = token_ids(llm.generate("Paging is", seeded))[0]
    others = [SamplingParams(max_tokens=4, temperature=0.7, seed=s) for s in range(3)]
    batched = token_ids(llm.generate(["Hello", "Paging is", "1 2 3", "x"], [others[0], seeded, *others[1:]]))
    assert batched[1] == alone
    assert (
        token_ids(llm.generate("Paging is", SamplingParams(max_tokens=10, temperature=1.0, seed=99)))[0]
        != alone
    )


def test_stop_string_cuts_the_text_and_ends_the_request(llm):
    free_run = llm.generate("Hello", SamplingParams(max_tokens=30, temperature=0))[0].outputs[0]
    words = free_run.text.split()
    stop = words[len(words) // 2]
    cut = free_run.text.index(stop)
    stopped = llm.generate("Hello", SamplingParams(max_tokens=30, temperature=0, stop=[stop, "never seen"]))
    completion = stopped[0].outputs[0]
    assert completion.finish_reason == "stop"
    assert completion.text == free_run.text[:cut]
    assert completion.token_ids == free_run.token_ids[: len(completion.token_ids)]
    assert len(completion.token_ids) < len(free_run.token_ids)


def test_stream_deltas_add_up_to_the_final_output(llm):
    params = [
        SamplingParams(max_tokens=20, temperature=0, stop="ing"),
        SamplingParams(max_tokens=15, temperature=0),
    ]
    texts, ids, finals = {}, {}, {}
    for output in llm.generate_stream(["Paging is", "Hello"], params):
        completion = output.outputs[0]
        texts[output.request_id] = texts.get(output.request_id, "") + completion.new_text
        ids[output.request_id] = ids.get(output.request_id, []) + completion.new_token_ids
        assert completion.text == texts[output.request_id]
        if output.finished:
            finals[output.request_id] = completion
    assert len(finals) == 2
    for request_id, completion in finals.items():
        assert (texts[request_id], ids[request_id]) == (completion.text, completion.token_ids)


def test_stop_token_is_kept_in_token_ids(llm):
    free_run = token_ids(llm.generate("Hello", GREEDY))[0]
    stopped = llm.generate(
        "Hello", SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[free_run[3]])
    )
    completion = stopped[0].outputs[0]
    assert completion.token_ids == free_run[: free_run.index(free_run[3]) + 1]
    assert completion.finish_reason == "stop"


def test_logprobs_come_one_per_token_when_asked(llm):
    with_logprobs, without = llm.generate(
        ["Hello", "Hello"], [SamplingParams(max_tokens=5, temperature=0, logprobs=True), GREEDY]
    )
    logprobs = with_logprobs.outputs[0].logprobs
    assert len(logprobs) == 5 and all(lp <= 0 for lp in logprobs) and without.outputs[0].logprobs is None


def test_abort_frees_a_running_request_at_once(llm):
    engine = llm.engine
    kept = engine.add_request("Hello", SamplingParams(max_tokens=6, temperature=0))
    dropped = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    engine.step()
    engine.abort(dropped)
    finished = [o for o in engine.stream() if o.finished]
    assert [o.request_id for o in finished] == [kept]


def test_early_exit_from_a_stream_gives_the_pages_back(llm):
    stream = llm.generate_stream(PROMPTS, GREEDY)
    next(stream)
    stream.close()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": ""}, "prompt must be a non-empty string"),
        ({"prompt": "word " * 300}, "max_model_len"),
        ({"prompt": [1, 2, 10**6]}, "prompt token ids"),
        (
            {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
            "exactly one of prompt and messages",
        ),
        ({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\].role"),
        ({"prompt": "hi", "sampling_params": SamplingParams(top_k=100_000)}, "top_k"),
        (
            {"prompt": "hi", "sampling_params": SamplingParams(logprobs=21)},
            r"logprobs must be <= max_logprobs",
        ),
        (
            {"prompt": "hi", "sampling_params": SamplingParams(prompt_logprobs=99)},
            "prompt_logprobs must be <=",
        ),
        ({"prompt": "word " * 300, "sampling_params": SamplingParams(n=3)}, "max_model_len"),
    ],
)
def test_bad_request_is_refused_alone(llm, kwargs, message):
    engine = llm.engine
    good = engine.add_request("Hello", GREEDY)
    with pytest.raises(ValueError, match=message):
        engine.add_request(**kwargs)
    assert [o.request_id for o in engine.stream() if o.finished] == [good]


@pytest.mark.parametrize(
    "field, value, served_by",
    [
        ("min_p", 0.1, "min_p"),
        ("repetition_penalty", 1.2, "repetition_penalty"),
        ("presence_penalty", 0.5, "presence_penalty"),
        ("frequency_penalty", -0.5, "frequency_penalty"),
        ("prompt_logprobs", 2, "prompt_logprobs"),
        ("logprobs", 3, "top_logprobs"),
    ],
)
def test_parameters_the_sampler_lacks_are_refused_not_ignored(llm, field, value, served_by):
    from jaxpage.batch import StepInputs
    from jaxpage.sampling import SampledTokens

    params = SamplingParams(max_tokens=2, **{field: value})
    if served_by in StepInputs._fields or served_by in SampledTokens._fields:
        assert llm.generate("Hello", params)[0].finished
    else:
        with pytest.raises(ValueError, match=f"^{field}={value!r} is not supported yet"):
            llm.engine.add_request("Hello", params)
    assert not llm.engine.has_unfinished_requests()


def test_generate_names_the_bad_prompt_and_queues_nothing(llm):
    with pytest.raises(ValueError, match="prompt 2: prompt must be a non-empty string"):
        llm.generate(["Hello", "Hi", ""], GREEDY)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.slow
def test_smollm2_chat_answer_ends_with_its_eos_token():
    # One bucket per shape: the 30-layer model compiles once.
    llm = LLM(
        max_model_len=512,
        num_pages=64,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        token_buckets=(64,),
        seq_buckets=(4,),
        page_buckets=(32,),
    )
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    [output] = llm.generate([chat], SamplingParams(max_tokens=64, temperature=0))
    completion = output.outputs[0]
    assert completion.finish_reason == "stop"
    assert completion.token_ids[-1] in llm.tokenizer.eos_token_ids
    assert "Paris" in completion.text and "<|im_end|>" not in completion.text
    assert llm.engine.pool.num_free_pages == llm.engine.pool.num_usable_pages
