"""Multi-step decode (EngineConfig.decode_steps): a step whose rows all decode runs several forward passes and
samples in one device call. Outputs must equal single steps' token for token, whatever stops, length limits,
min_tokens bans, preemption and sampling happen; rows that need the host between tokens keep steps of one."""

import jax
import numpy as np
import pytest

from jaxpage import LLM, SamplingParams
from jaxpage.page_pool import PagePool
from jaxpage.request import Request
from jaxpage.scheduler import Scheduler

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog. " * 6, "1 2 3 4 5 6 7", "Paging is", "x"]


def _llm(decode_steps: int, *bindings: str) -> LLM:
    return LLM.from_gin(["configs/tiny_test.gin"], [f"EngineConfig.decode_steps = {decode_steps}", *bindings])


def _summary(outputs):
    return [[(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in o.outputs] for o in outputs]


def _calls(llm: LLM) -> list[int]:
    """Records `decode_steps` of every launched step."""
    runner, calls = llm.engine.runner, []
    launch = runner.launch
    runner.launch = lambda inputs, *args: (calls.append(inputs.decode_steps), launch(inputs, *args))[1]
    return calls


def _mixed_params(llm: LLM) -> list[SamplingParams]:
    free = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    return [
        # Stops on a sampled token in the middle of a call; its later tokens are dropped.
        SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[free.token_ids[5]]),
        SamplingParams(max_tokens=14, temperature=0.8, top_p=0.9, seed=5, n=2),
        SamplingParams(max_tokens=23, temperature=0),  # a length limit that no call size divides
        # The stop token is banned until min_tokens outputs, across the calls, then it stops the request.
        SamplingParams(max_tokens=30, temperature=0, min_tokens=7, stop_token_ids=[free.token_ids[2]]),
        SamplingParams(max_tokens=40, temperature=0.5, seed=1, min_tokens=3),
    ]


@pytest.mark.parametrize(
    "bindings",
    [
        (),
        ("EngineConfig.num_pages = 14",),  # preempts
        ("EngineConfig.num_pages = 14", 'EngineConfig.preemption_mode = "swap"'),
        ("EngineConfig.overlap_steps = False",),
        ('EngineConfig.attention_backend = "pallas_interpret"',),  # the decode kernel, row-sized buckets
    ],
)
def test_multi_step_decode_changes_no_output(bindings):
    single, multi = _llm(1, *bindings), _llm(4, *bindings)
    params = _mixed_params(single)
    calls = _calls(multi)
    assert _summary(multi.generate(PROMPTS, params)) == _summary(single.generate(PROMPTS, params))
    assert 4 in calls, calls
    if bindings and "num_pages" in bindings[0]:
        assert multi.engine.scheduler.num_preemptions > 0, "make the pool smaller"
        assert (multi.engine.scheduler.num_swap_outs > 0) == ("swap" in bindings[-1])
    for llm in (single, multi):
        assert llm.engine.pool.num_free_pages == llm.engine.pool.num_usable_pages


def test_min_tokens_bans_hold_inside_a_call():
    llm = _llm(8)
    free = llm.generate(PROMPTS[2], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].token_ids
    # A token first drawn at output 2 or later: past the first token of a call (output 0 is the prompt
    # step's), where only the call's own count of banned steps keeps the ban.
    i = next(i for i in range(2, 12) if free[i] not in free[:i])
    params = SamplingParams(max_tokens=20, temperature=0, min_tokens=i + 2, stop_token_ids=[free[i]])
    calls = _calls(llm)
    tokens = llm.generate(PROMPTS[2], params)[0].outputs[0].token_ids
    assert 8 in calls
    assert tokens[:i] == free[:i] and free[i] not in tokens[: i + 2] and len(tokens) >= i + 2
    assert tokens == _llm(1).generate(PROMPTS[2], params)[0].outputs[0].token_ids


def test_rows_that_need_the_host_between_tokens_keep_steps_of_one():
    llm = _llm(4)
    calls = _calls(llm)
    free = llm.generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
    assert 4 in calls
    for params in (
        SamplingParams(max_tokens=10, temperature=0, stop=[free.text[-2:]]),
        SamplingParams(max_tokens=10, temperature=0, logprobs=1),
        SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.2),
        SamplingParams(max_tokens=10, temperature=0, presence_penalty=0.5),
        SamplingParams(max_tokens=10, temperature=0, prompt_logprobs=1),
        SamplingParams(max_tokens=10, temperature=0, use_beam_search=True, n=2),
    ):
        calls.clear()
        # One such row beside one that could take multi-step calls keeps the whole step at one.
        llm.generate(PROMPTS[:2], [params, SamplingParams(max_tokens=10, temperature=0)])
        assert set(calls) == {1}, params


def _scheduler(decode_steps: int, num_pages: int = 64) -> Scheduler:
    pool = PagePool(num_pages)
    return Scheduler(
        pool,
        page_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        max_model_len=40,
        decode_steps=decode_steps,
    )


def _decoding(sched: Scheduler, *requests: Request) -> None:
    """Admits the requests and runs their prompt step with a known token, so that their next step decodes."""
    for request in requests:
        sched.add_request(request)
    out = sched.schedule()
    assert len(out.scheduled) == len(requests)
    sched.advance(out)
    sched.update_from_output(out, _samples([7] * len(requests)))


def _samples(token_ids):
    token_ids = np.asarray(token_ids, np.int32)
    return type("Sampled", (), {"token_ids": token_ids, "logprobs": np.zeros(token_ids.shape, np.float32)})


def test_each_row_samples_what_its_length_limits_leave_and_gets_the_pages():
    sched = _scheduler(decode_steps=8)
    near_max_tokens = Request("a", list(range(10)), SamplingParams(max_tokens=4))
    near_max_len = Request("b", list(range(33)), SamplingParams(max_tokens=100))  # 40 - 34 = 6 left
    free = Request("c", list(range(5)), SamplingParams(max_tokens=100))
    _decoding(sched, near_max_tokens, near_max_len, free)
    out = sched.schedule()
    assert out.decode_steps == 8
    assert [item.num_steps for item in out.scheduled] == [3, 6, 8]
    for item in out.scheduled:  # pages for every token the row computes in the call
        assert len(item.request.page_ids) * 4 >= item.first + item.num_steps
    sched.advance(out)
    assert [r.num_pending_tokens for r in (near_max_tokens, near_max_len, free)] == [3, 6, 8]
    tokens = np.arange(8 * 4).reshape(8, 4)  # [calls, bucket rows]: row b's tokens in column b
    sched.update_from_output(out, _samples(tokens))
    assert near_max_tokens.is_finished and near_max_tokens.output_token_ids == [7, 0, 4, 8]
    assert near_max_len.is_finished and near_max_len.output_token_ids == [7, *range(1, 24, 4)]
    assert free.output_token_ids == [7, *range(2, 32, 4)] and free.num_pending_tokens == 0
    assert free.num_computed_tokens == 5 + 8 and sched.schedule().scheduled[0].num_steps == 8


def test_a_queued_request_or_a_short_pool_keeps_steps_of_one():
    sched = _scheduler(decode_steps=4)
    _decoding(sched, *[Request(str(i), [1, 2, 3], SamplingParams(max_tokens=20)) for i in range(4)])
    sched.add_request(Request("queued", [1, 2], SamplingParams(max_tokens=20)))  # every row is taken
    out = sched.schedule()
    assert len(out.scheduled) == 4 and out.decode_steps == 1

    short_only = _scheduler(decode_steps=4)  # no row may take 4 tokens: passes would run for nobody
    _decoding(short_only, Request("s", [1, 2, 3], SamplingParams(max_tokens=3)))
    assert short_only.schedule().decode_steps == 1

    tight = _scheduler(decode_steps=8, num_pages=5)  # 4 usable pages of 4 tokens
    long = Request("long", [1, 2, 3, 4], SamplingParams(max_tokens=9))  # 1 page, then 3
    short = Request("short", [1, 2, 3, 4, 5, 6, 7], SamplingParams(max_tokens=2))  # 2 pages
    _decoding(tight, long, short)
    out = tight.schedule()  # "long" takes the last free page for its next token, and 8 need one more
    assert not out.preempted and out.decode_steps == 1
    assert [item.num_steps for item in out.scheduled] == [1, 1]


def test_a_request_preempted_while_its_call_is_in_flight_gets_the_calls_tokens():
    sched = _scheduler(decode_steps=4, num_pages=5)  # 4 usable pages of 4 tokens
    older, newer = (Request(name, [1, 2, 3, 4], SamplingParams(max_tokens=12)) for name in "ab")
    _decoding(sched, older, newer)  # a page each, and token 7
    call = sched.schedule()  # positions 4-7: a second page each, the last two of the pool
    assert call.decode_steps == 4 and sched.pool.num_free_pages == 0
    sched.advance(call)
    assert newer.num_pending_tokens == 4
    # The next step, scheduled before the call's tokens are read: "older" needs a page for position 8.
    step = sched.schedule()
    assert step.preempted == [newer] and step.decode_steps == 1
    sched.advance(step)
    sched.update_from_output(call, _samples(np.arange(16).reshape(4, 4)))
    assert newer.output_token_ids == [7, 1, 5, 9, 13] and newer.num_pending_tokens == 0
    assert newer.num_computed_tokens == 0 and newer.page_ids == []  # recomputes its 9 tokens when readmitted
    assert older.output_token_ids == [7, 0, 4, 8, 12] and older.num_pending_tokens == 1


def test_pages_written_by_calls_serve_later_prompts_from_the_prefix_cache():
    outputs = {}
    for k in (1, 4):
        llm = _llm(k)
        first = llm.generate(PROMPTS[1], SamplingParams(max_tokens=33, temperature=0))[0].outputs[0]
        # The next turn: the last prompt and its reply, and more; its history's pages were written in calls.
        prompt = llm.engine.tokenizer.encode(PROMPTS[1]) + list(first.token_ids) + [5, 6, 7]
        (second,) = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))
        assert second.metrics.num_cached_tokens >= 32
        outputs[k] = (first.token_ids, second.outputs[0].token_ids)
    assert outputs[1] == outputs[4]


def _poisoned(decode_steps: int, token: int | None = None) -> LLM:
    llm = _llm(decode_steps, "ModelConfig.tie_word_embeddings = False")  # the row reaches its requests only
    if token is not None:
        runner = llm.engine.runner
        runner.params["embed"] = runner.params["embed"].at[token].set(np.nan)
    return llm


def test_non_finite_logits_in_a_call_fail_that_request_alone():
    params = SamplingParams(max_tokens=16, temperature=0)
    alone = [o.outputs[0].token_ids for o in _poisoned(4).generate(PROMPTS[:2], params)]
    # Poison a token the first request samples as output i and the second never sees. Output 0 comes from the
    # prompt step; calls of 4 then sample outputs 1-4, 5-8, ..., and output i + 1, the first with NaN
    # logits, is the (i % 4)-th of its call: not the first.
    i = next(i for i in range(5, 16) if i % 4 and alone[0][i] not in alone[1] + alone[0][:i])
    results = {}
    for k in (1, 4):
        llm = _poisoned(k, alone[0][i])
        failed, clean = llm.generate(PROMPTS[:2], params)
        assert clean.outputs[0].token_ids == alone[1] and clean.error is None
        assert failed.outputs[0].finish_reason == "error" and failed.outputs[0].token_ids == alone[0][: i + 1]
        assert llm.engine.pool.num_free_pages == llm.engine.pool.num_usable_pages
        results[k] = failed.error
    assert "non-finite logits" in results[4] and results[4] == results[1]  # the same position


def test_a_page_the_fault_wrote_into_is_never_saved_to_the_host_tier():
    """The call that faults also cached the pages its good tokens filled; with write-through they wait to be
    saved. The one holding the faulty token's K/V must not reach the tier under its valid name."""
    bindings = ["EngineConfig.kv_host_cache_gib = 0.01", "EngineConfig.kv_tier_write_through = True"]
    params = SamplingParams(max_tokens=40, temperature=0)
    prompt = [5, 6, 7, 8, 9]  # 5 tokens: output i sits at position 5 + i
    free = _poisoned(4).generate([prompt], params)[0].outputs[0].token_ids
    # Output i fills its page (page_size 8) and is fed in a call's pass after the first.
    i = next(i for i in range(5, 40) if (5 + i + 1) % 8 == 0 and i % 4 and free[i] not in free[:i] + prompt)
    llm = _llm(4, "ModelConfig.tie_word_embeddings = False", *bindings)
    runner = llm.engine.runner
    runner.params["embed"] = runner.params["embed"].at[free[i]].set(np.nan)
    clean = [3, 4] * 12
    assert (
        free[i]
        not in llm.generate([clean], SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].token_ids
    )
    (failed,) = llm.generate([prompt], params)
    assert failed.outputs[0].finish_reason == "error" and failed.outputs[0].token_ids == free[: i + 1]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0))  # takes the saves due
    saved = llm.engine.store.host_entries()
    assert len(saved) >= 4  # the clean request's pages
    assert not any(np.isnan(np.asarray(kv)).any() for _, kv in saved)


def test_warmup_compiles_the_multi_step_programs():
    llm = _llm(4, "EngineConfig.compile_after_warmup = 'error'")
    llm.engine.warmup()
    calls = _calls(llm)
    llm.generate(PROMPTS, [SamplingParams(max_tokens=12, temperature=t, seed=2) for t in (0, 0, 0.7, 0, 1.0)])
    assert 4 in calls and llm.engine.metrics().num_compiles_after_warmup == 0


def test_multi_step_decode_over_a_tensor_parallel_mesh():
    # tiny_test.gin's 2 KV heads split over 2 devices: the loop carries a pool sharded over heads.
    params = SamplingParams(max_tokens=12, temperature=0)
    outputs = {}
    for k in (1, 4):
        llm = _llm(k, "EngineConfig.tensor_parallel_size = 2")
        assert llm.engine.runner.kv_pool[0][0].sharding.spec == jax.sharding.PartitionSpec("tp")
        calls = _calls(llm)
        outputs[k] = _summary(llm.generate(PROMPTS, params))
        assert max(calls) == k
    assert outputs[4] == outputs[1]
