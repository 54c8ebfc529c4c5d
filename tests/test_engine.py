"""The engine and `LLM.generate` on the tiny random model (configs/tiny_test.gin), and on SmolLM2 where words
matter. Every test ends with the page pool as full as it started."""

import dataclasses

import numpy as np
import pytest
from dense_reference import assert_top_logprobs, dense_log_softmax, dense_logits

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


def _completions_of_each_kind(llm, prompts, params, kind):
    """Every output of generate_stream for the prompts, with params of this output_kind."""
    kind_params = [dataclasses.replace(p, output_kind=kind) for p in params]
    return list(llm.generate_stream(prompts, kind_params))


def test_output_kinds_deliver_the_same_completions(llm):
    prompts = ["Paging is", "Hello", "1 2 3"]
    params = [
        SamplingParams(max_tokens=14, temperature=0, stop="ing", logprobs=2),
        SamplingParams(max_tokens=9, temperature=0.8, seed=3, n=2, prompt_logprobs=1),
        # No stop strings: final-only text is decoded at the end.
        SamplingParams(max_tokens=11, temperature=0),
    ]
    cumulative = _completions_of_each_kind(llm, prompts, params, "cumulative")
    finals = {o.request_id: o for o in cumulative if o.finished}
    by_prompt = lambda outputs: sorted(outputs, key=lambda o: o.prompt_token_ids)  # noqa: E731

    final_only = _completions_of_each_kind(llm, prompts, params, "final_only")
    assert all(o.finished for o in final_only) and len(final_only) == len(prompts)
    # new_text and new_token_ids are what each output added: a final-only output's are the whole completion.
    whole = lambda c: (c.text, c.token_ids, c.logprobs, c.finish_reason, c.cumulative_logprob)  # noqa: E731
    for got, want in zip(by_prompt(final_only), by_prompt(finals.values()), strict=True):
        assert [whole(c) for c in got.outputs] == [whole(c) for c in want.outputs]
        assert got.prompt_logprobs == want.prompt_logprobs
        assert all((c.new_text, c.new_token_ids) == (c.text, c.token_ids) for c in got.outputs)

    delta = _completions_of_each_kind(llm, prompts, params, "delta")
    for want in finals.values():
        mine = [o for o in delta if o.prompt_token_ids == want.prompt_token_ids]
        assert mine[-1].finished and not any(o.finished for o in mine[:-1])
        assert [o.prompt_logprobs is not None for o in mine] == [want.prompt_logprobs is not None] + [
            False
        ] * (len(mine) - 1)
        for index, completion in enumerate(want.outputs):
            parts = [o.outputs[index] for o in mine]
            assert "".join(p.text for p in parts) == completion.text
            assert sum((p.token_ids for p in parts), []) == completion.token_ids
            assert all(p.text == p.new_text and p.token_ids == p.new_token_ids for p in parts)
            if completion.logprobs is not None:
                assert sum((p.logprobs for p in parts), []) == completion.logprobs
            assert parts[-1].finish_reason == completion.finish_reason


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
    completion = with_logprobs.outputs[0]
    assert [list(d) for d in completion.logprobs] == [[t] for t in completion.token_ids]
    assert all(lp <= 0 for d in completion.logprobs for lp in d.values())
    assert without.outputs[0].logprobs is None and without.prompt_logprobs is None


def _dense(llm, token_ids):
    engine = llm.engine
    return dense_log_softmax(engine.model_config, engine.runner.params, token_ids)


def test_prompt_and_output_logprobs_equal_a_dense_pass_despite_chunks_and_the_cache(llm):
    # 100+ tokens against a 64-token budget: the prompt runs in chunks. The first request fills the prefix
    # cache, which the one asking prompt logprobs must not take (a hit skips the cached tokens' logits).
    prompt = "Paging splits the cache into pages. " * 12
    llm.generate(prompt, GREEDY)
    asked = SamplingParams(max_tokens=6, temperature=0.8, seed=3, logprobs=2, prompt_logprobs=3, n=2)
    [output] = llm.generate(prompt, asked)
    [again] = llm.generate(prompt, GREEDY)
    assert output.metrics.num_cached_tokens == 0 and again.metrics.num_cached_tokens > 0

    ids = output.prompt_token_ids
    assert len(ids) > 64 and len(output.prompt_logprobs) == len(ids) and output.prompt_logprobs[0] is None
    dense = _dense(llm, ids)
    for position in range(1, len(ids)):
        assert_top_logprobs(output.prompt_logprobs[position], ids[position], dense[position - 1], k=3)
    for completion in output.outputs:  # each sample has its own tokens and logprobs
        dense = _dense(llm, ids + completion.token_ids[:-1])
        assert len(completion.logprobs) == len(completion.token_ids)
        for i, token in enumerate(completion.token_ids):
            assert_top_logprobs(completion.logprobs[i], token, dense[len(ids) - 1 + i], k=2)
        assert completion.cumulative_logprob == pytest.approx(
            sum(d[t] for d, t in zip(completion.logprobs, completion.token_ids, strict=True)), rel=1e-5
        )


def _penalised(logits, prompt, output, params):
    out = logits.astype(np.float64).copy()
    for token in set(prompt) | set(output):
        r = params.repetition_penalty
        out[token] = out[token] / r if out[token] > 0 else out[token] * r
    for token in set(output):
        out[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    return out


def test_greedy_penalties_follow_a_dense_reference(llm):
    # Penalties below 1 favour seen tokens: the first makes the model take a prompt token, the second repeat
    # its own output, so both the prompt and the output history must reach the sampler.
    prompt = "1 2 3 1 2 3 1 2 3"
    params = [
        SamplingParams(
            max_tokens=8, temperature=0, repetition_penalty=0.3, presence_penalty=-0.5, frequency_penalty=0.5
        ),
        SamplingParams(
            max_tokens=8, temperature=0, repetition_penalty=0.7, presence_penalty=0.5, frequency_penalty=0.3
        ),
    ]
    outputs = llm.generate([prompt, prompt], params)
    plain = token_ids(llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0)))[0]
    engine = llm.engine
    for output, sp in zip(outputs, params, strict=True):
        ids, got = output.prompt_token_ids, output.outputs[0].token_ids
        assert got != plain
        # One dense pass over the whole text gives the logits every step saw, if its tokens were right.
        logits = dense_logits(engine.model_config, engine.runner.params, ids + got[:-1])[len(ids) - 1 :]
        expected = [int(np.argmax(_penalised(logits[i], ids, got[:i], sp))) for i in range(len(got))]
        assert got == expected


def test_abort_frees_a_running_request_at_once(llm):
    engine = llm.engine
    kept = engine.add_request("Hello", SamplingParams(max_tokens=6, temperature=0))
    dropped = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=50, temperature=0))
    reported = {}  # request id -> tokens reported so far
    for _ in range(3):
        reported |= {o.request_id: o.outputs[0].token_ids for o in engine.step()}
    used = engine.pool.num_used_pages
    assert engine.abort(dropped)
    assert engine.pool.num_used_pages < used
    finished = {o.request_id: o for o in engine.stream() if o.finished}
    assert sorted(finished) == sorted([kept, dropped])
    assert finished[kept].outputs[0].finish_reason == "length"
    # The aborted request's final output comes with the next step, with the tokens reported before (a token
    # still on the device when the abort came is dropped).
    aborted = finished[dropped].outputs[0]
    assert aborted.finish_reason == "abort" and aborted.token_ids == reported[dropped] and reported[dropped]
    assert not engine.abort(dropped)  # no longer in flight


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
        (
            {"prompt": "hi", "sampling_params": SamplingParams(stop_token_ids=[3, 10**6])},
            r"stop_token_ids must be < the vocabulary size \d+, got 1000000",
        ),
        (
            {
                "prompt": "hi",
                "sampling_params": SamplingParams(min_tokens=2, stop_token_ids=list(range(100, 116))),
            },
            r"stop_token_ids: with min_tokens > 0, at most 16 EOS and stop token ids .*got 17",
        ),
        (
            {"prompt": "hi", "sampling_params": SamplingParams(use_beam_search=True, temperature=0, n=11)},
            r"beam width \(best_of, else n\) must be <= max_logprobs / 2",
        ),
        (
            {
                "prompt": "word " * 300,
                "sampling_params": SamplingParams(use_beam_search=True, temperature=0, n=2),
            },
            "max_model_len",
        ),
    ],
)
def test_bad_request_is_refused_alone(llm, kwargs, message):
    engine = llm.engine
    good = engine.add_request("Hello", GREEDY)
    with pytest.raises(ValueError, match=message):
        engine.add_request(**kwargs)
    assert [o.request_id for o in engine.stream() if o.finished] == [good]


def test_seeded_penalised_sample_does_not_depend_on_its_batch_neighbours(llm):
    seeded = SamplingParams(
        max_tokens=10, temperature=1.0, min_p=0.02, repetition_penalty=1.3, frequency_penalty=0.5, seed=7
    )
    alone = token_ids(llm.generate("Paging is", seeded))[0]
    others = [
        SamplingParams(max_tokens=6, temperature=0.0, presence_penalty=-1.5),
        SamplingParams(max_tokens=4, temperature=0.7, seed=1),
        SamplingParams(max_tokens=12, temperature=1.0, repetition_penalty=0.8, seed=2),
    ]
    batched = token_ids(
        llm.generate([PROMPTS[1], "Paging is", "1 2 3", "x"], [others[0], seeded, *others[1:]])
    )
    assert batched[1] == alone


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
