"""The reserved-allocation baseline (EngineConfig.kv_allocation = "reserved"): a request holds the pages of
its whole prompt + max_tokens from admission on, as FasterTransformer and Orca allocate. It must produce the
same tokens as paging and admit fewer requests at once from the same pool: the PagedAttention paper's
comparison."""

import pytest

from jaxpage import LLM, SamplingParams

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog. " * 2, "1 2 3 4 5", "Paging is"]


def tiny(allocation: str) -> LLM:
    # 23 usable pages of 8 tokens for 8 rows: paging must preempt, reservation must wait.
    bindings = [f"EngineConfig.kv_allocation = {allocation!r}", "EngineConfig.num_pages = 24"]
    return LLM.from_gin(["configs/tiny_test.gin"], bindings)


@pytest.fixture(scope="module")
def engines():
    return {allocation: tiny(allocation) for allocation in ("paged", "reserved")}


def peak_running(llm, prompts, params) -> tuple[list, int]:
    engine = llm.engine
    for prompt in prompts:
        engine.add_request(prompt, params)
    finals, peak = {}, 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
        peak = max(peak, len(engine.scheduler.running))
    assert engine.pool.num_free_pages == engine.pool.num_usable_pages
    return [finals[k].outputs[0].token_ids for k in sorted(finals, key=lambda k: int(k.split("-")[1]))], peak


def test_reserved_allocation_changes_no_token_and_admits_fewer_requests(engines):
    # Each request ends with 4-6 pages: paging admits all 8 on their prompts' 1-3 pages and preempts as they
    # grow; reservation admits only as many as fit whole.
    params = SamplingParams(max_tokens=30, temperature=0)
    prompts = [f"{p} {i}" for i in range(2) for p in PROMPTS]
    paged, paged_peak = peak_running(engines["paged"], prompts, params)
    reserved, reserved_peak = peak_running(engines["reserved"], prompts, params)
    assert reserved == paged
    assert paged_peak == 8 and reserved_peak <= 5
    assert (
        engines["reserved"].engine.metrics().num_preemptions
        == 0
        < engines["paged"].engine.metrics().num_preemptions
    )


def test_samples_and_beams_are_exact_under_reservation(engines):
    for params in (
        SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=5),
        SamplingParams(n=2, max_tokens=8, temperature=0, use_beam_search=True),
    ):
        expected = engines["paged"].generate(PROMPTS[1], params)[0]
        got = engines["reserved"].generate(PROMPTS[1], params)[0]
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in expected.outputs]
    engine = engines["reserved"].engine
    assert engine.pool.num_free_pages == engine.pool.num_usable_pages
