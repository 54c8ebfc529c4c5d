"""Overlapped steps (EngineConfig.overlap_steps): the next step is launched before the host reads the current
one's tokens. Outputs must equal the synchronous loop's, token for token, whatever stops, aborts, preemption
and sampling happen; the device really runs ahead; steps that need the host's tokens run synchronously."""

import pytest

from jaxpage import LLM, SamplingParams

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog. " * 6, "1 2 3 4 5 6 7", "Paging is", "x"]


def _llm(overlap: bool, *bindings: str) -> LLM:
    return LLM.from_gin(["configs/tiny_test.gin"], [f"EngineConfig.overlap_steps = {overlap}", *bindings])


def _summary(outputs):
    return [
        [
            (c.token_ids, c.text, c.finish_reason, c.logprobs, round(c.cumulative_logprob, 4))
            for c in o.outputs
        ]
        for o in outputs
    ]


def _mixed_params(llm: LLM) -> list[SamplingParams]:
    free = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0))[0].outputs[0]
    return [
        SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[free.token_ids[3]]),  # stops mid-way
        SamplingParams(max_tokens=9, temperature=0, logprobs=2),
        SamplingParams(max_tokens=14, temperature=0.8, top_p=0.9, seed=5, n=2),
        SamplingParams(max_tokens=30, temperature=0, stop=[free.text[-3:]] if free.text else None),
        SamplingParams(max_tokens=7, temperature=0, min_tokens=5, stop_token_ids=[free.token_ids[0]]),
    ]


@pytest.mark.parametrize("bindings", [(), ("EngineConfig.num_pages = 14",), ("EngineConfig.num_pages = 14",
                                      'EngineConfig.preemption_mode = "swap"')])  # fmt: skip
def test_overlap_changes_no_output(bindings):
    on, off = _llm(True, *bindings), _llm(False, *bindings)
    params = _mixed_params(off)
    assert _summary(on.generate(PROMPTS, params)) == _summary(off.generate(PROMPTS, params))
    if bindings:
        assert on.engine.scheduler.num_preemptions > 0, "make the pool smaller"
    for llm in (on, off):
        assert llm.engine.pool.num_free_pages == llm.engine.pool.num_usable_pages


def _launch_log(llm: LLM) -> list[str]:
    """Records the runner's launches and fetches in order."""
    runner, log = llm.engine.runner, []
    launch, fetch = runner.launch, runner.fetch
    runner.launch = lambda *args: (log.append("launch"), launch(*args))[1]
    runner.fetch = lambda step: (log.append("fetch"), fetch(step))[1]
    return log


def test_the_next_step_is_launched_before_the_tokens_are_read():
    llm = _llm(True)
    log = _launch_log(llm)
    engine = llm.engine
    engine.add_request("Hello", SamplingParams(max_tokens=8, temperature=0))
    assert engine.step() == []  # the first token is still on the device
    (first,) = engine.step()
    assert len(first.outputs[0].token_ids) == 1
    list(engine.stream())
    assert log[:4] == ["launch", "launch", "fetch", "launch"]
    assert log.count("launch") == log.count("fetch") == 8


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=6, temperature=0, repetition_penalty=1.3),
        SamplingParams(max_tokens=6, temperature=0, use_beam_search=True, n=2),
        SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=1),
    ],
)
def test_steps_that_need_the_hosts_tokens_run_synchronously(params):
    on, off = _llm(True), _llm(False)
    log = _launch_log(on)
    prompt = ["Paging is a way to"]
    assert _summary(on.generate(prompt, params)) == _summary(off.generate(prompt, params))
    if params.prompt_logprobs is None:
        assert log == ["launch", "fetch"] * (len(log) // 2)
    else:  # only the prompt's step needs the host
        assert log[:2] == ["launch", "fetch"] and "launch" in log[2:3]


# With multi-step decode (tests/test_decode_steps.py) a call's 4 tokens are in flight at once.
@pytest.mark.parametrize("decode_steps, steps, in_flight", [(1, 4, 1), (4, 3, 4)])
def test_an_abort_while_a_token_is_in_flight_drops_it_and_frees_the_pages(decode_steps, steps, in_flight):
    llm = _llm(True, f"EngineConfig.decode_steps = {decode_steps}")
    engine = llm.engine
    kept = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=18, temperature=0))
    dropped = engine.add_request("Hello", SamplingParams(max_tokens=18, temperature=0))
    reported = {}
    for _ in range(steps):
        reported |= {o.request_id: o.outputs[0].token_ids for o in engine.step()}
    assert engine._groups[dropped].samples[0].num_pending_tokens == in_flight  # on the device
    assert engine.abort(dropped)
    finals = {o.request_id: o for o in engine.stream() if o.finished}
    assert finals[dropped].outputs[0].token_ids == reported[dropped]
    assert len(finals[kept].outputs[0].token_ids) == 18
    assert engine.pool.num_free_pages == engine.pool.num_usable_pages


@pytest.mark.slow
def test_smollm2_greedy_tokens_are_the_same_with_and_without_overlap():
    settings = dict(
        num_pages=64, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256,
        token_buckets=(16, 64), seq_buckets=(4,), page_buckets=(16,),
    )  # fmt: skip
    params = SamplingParams(max_tokens=16, temperature=0)
    prompts = ["What is paging?", "Name three colours.", "Hello", "Count to five."]
    on, off = LLM(**settings), LLM(**settings, overlap_steps=False)
    assert _summary(on.generate(prompts, params)) == _summary(off.generate(prompts, params))


def test_no_step_is_left_in_flight_when_the_last_request_stops_on_a_sampled_token():
    """The step launched after the one that sampled a stop token is read at once when nothing else runs:
    a process that exits right after `generate` would otherwise tear the runtime down under its copies
    (which aborted SmolLM2 runs at exit)."""
    llm = _llm(True)
    free = llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    stopped = llm.generate(
        "Hello", SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[free.token_ids[4]])
    )
    assert stopped[0].outputs[0].finish_reason == "stop"
    assert llm.engine._in_flight is None
    # The engine serves on as before.
    assert (
        llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].token_ids
        == free.token_ids
    )
