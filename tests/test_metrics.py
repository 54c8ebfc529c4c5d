"""Per-request latency metrics and the engine's counters, read from Python."""

import pytest

from jaxpage import LLM, SamplingParams
from jaxpage.metrics import EngineMetrics


@pytest.fixture(scope="module")
def llm():
    return LLM.from_gin(["configs/tiny_test.gin"])


def test_request_metrics_are_ordered_and_complete(llm):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outputs = llm.generate(["Hello", "A longer prompt than the first one"], params)
    for output in outputs:
        m = output.metrics
        assert 0 <= m.queue_time <= m.ttft <= m.e2e_latency
        assert m.tpot > 0 and m.ttft + 5 * m.tpot == pytest.approx(m.e2e_latency)
        assert m.num_output_tokens == 6 and m.num_prompt_tokens == len(output.prompt_token_ids)


def test_streamed_outputs_carry_metrics_before_the_end(llm):
    stream = llm.generate_stream("Hello", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    first = next(stream)
    assert first.metrics.ttft is not None and first.metrics.tpot is None and first.metrics.e2e_latency is None
    assert [o.finished for o in stream] == [False, True]


def test_engine_metrics_count_steps_hits_and_usage(llm):
    engine = llm.engine
    before = engine.metrics()
    prompt = "The same long prompt, sent twice so that the second finds it cached. " * 2
    llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0))
    running = llm.generate_stream(prompt, SamplingParams(max_tokens=4, temperature=0))
    next(running)
    during = engine.metrics()
    assert during.kv_usage > 0 and during.num_cached_pages > 0
    list(running)
    after = engine.metrics()
    assert after.kv_usage == 0 and after.num_steps > before.num_steps
    hit = after.prefix_hit_tokens - before.prefix_hit_tokens
    num_prompt = len(llm.tokenizer.encode(prompt))
    page_size = engine.config.page_size
    assert hit == (num_prompt - 1) // page_size * page_size
    assert after.prefix_query_tokens - before.prefix_query_tokens == 2 * num_prompt


def test_summary_names_every_counter():
    metrics = EngineMetrics(
        num_steps=10,
        kv_usage=0.25,
        peak_kv_usage=0.75,
        num_cached_pages=3,
        prefix_query_tokens=200,
        prefix_hit_tokens=50,
        num_preemptions=2,
        num_swap_outs=1,
        num_swap_ins=1,
        num_copies=4,
        num_evictions=5,
        host_hit_tokens=16,
        disk_hit_tokens=32,
        shifted_tokens=24,
        num_host_pages=7,
        num_disk_pages=9,
        disk_prefetched_pages=6,
        host_prefetched_pages=8,
        num_compiles_after_warmup=1,
    )
    assert metrics.prefix_cache_hit_rate == 0.25
    assert metrics.summary() == (
        "steps 10, peak KV usage 75.0% (now 25.0%), prefix-cache hit rate 25.0% (50/200 tokens), "
        "preemptions 2, swaps out/in 1/1, copy-on-write copies 4, evictions 5, "
        "tier hits host/disk 16/32 tokens, shifted 24 tokens, prefetched from disk/host 6/8 pages, "
        "compilations after warm-up 1"
    )
    assert (
        EngineMetrics(0, 0.0, 0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0).prefix_cache_hit_rate
        == 0.0
    )
