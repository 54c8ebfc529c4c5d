"""After `LLMEngine.warmup`, serving compiles nothing: every step program and every page move of a size a step
can ask for is built ahead. With `compile_after_warmup="error"` a step that would compile fails loudly instead
of stalling, and leaves the engine serving."""

import dataclasses
import logging

import jax
import numpy as np
import pytest

from jaxpage import LLM, SamplingParams, compile_watch, page_copy
from jaxpage.batch import padding_inputs
from jaxpage.config import EngineConfig
from jaxpage.runner import Runner
from models.config import ModelConfig
from models.llama import init_params


@pytest.fixture(scope="module")
def llm():
    # A pool of 24 pages of 8 tokens for up to 8 requests: long prompts preempt (and swap) each other.
    bindings = [
        "EngineConfig.preemption_mode = 'swap'",
        "EngineConfig.num_pages = 24",
        "EngineConfig.compile_after_warmup = 'error'",
        # One bucket: warm-up compiles its forward pass and its samplers, not the whole grid of tiny_test.gin.
        "EngineConfig.token_buckets = (64,)",
        "EngineConfig.seq_buckets = (8,)",
        "EngineConfig.page_buckets = (32,)",
    ]
    llm = LLM.from_gin(["configs/tiny_test.gin"], bindings)
    llm.engine.warmup()
    return llm


def test_a_mixed_workload_compiles_nothing_after_warmup(llm):
    prompts = [list(range(5 + i, 45 + i)) for i in range(6)]
    params = [
        SamplingParams(max_tokens=30, temperature=0),
        SamplingParams(max_tokens=20, temperature=0.8, n=3, seed=1),  # shared pages, copy-on-write
        SamplingParams(max_tokens=12, temperature=0, logprobs=2, stop_token_ids=[7], min_tokens=3),
        SamplingParams(max_tokens=16, temperature=0.7, repetition_penalty=1.3, seed=2),
        SamplingParams(max_tokens=10, use_beam_search=True, n=2, temperature=0),
        SamplingParams(max_tokens=25, temperature=0),
    ]
    outputs = llm.generate(prompts, params)
    assert all(output.finished for output in outputs)
    metrics = llm.engine.metrics()
    assert metrics.num_swap_outs > 0 and metrics.num_copies > 0, metrics.summary()
    assert metrics.num_compiles_after_warmup == 0


def test_decode_steps_whose_rows_no_prompt_bucket_has_are_warmed_up_too():
    # With at least 64 / 1 rows per 64-token bucket the only prompt bucket has 16 rows; decode steps of up
    # to 4 rows take the decode kernel's 4-row bucket all the same.
    bindings = [
        "EngineConfig.attention_backend = 'pallas_interpret'",
        "EngineConfig.compile_after_warmup = 'error'",
        "EngineConfig.token_buckets = (64,)",
        "EngineConfig.seq_buckets = (4, 16)",
        "EngineConfig.page_buckets = (32,)",
        "EngineConfig.max_bucket_tokens_per_row = 1",
    ]
    llm = LLM.from_gin(["configs/tiny_test.gin"], bindings)
    assert {b.num_rows for b in llm.engine.runner.buckets} == {16}
    llm.engine.warmup()
    prompts = [list(range(5, 15)), list(range(20, 33))]
    # Each sampler variant in 4-row decode steps: all greedy, sampled, penalised.
    for second in (
        SamplingParams(max_tokens=6, temperature=0),
        SamplingParams(max_tokens=6, temperature=0.8, seed=1),
        SamplingParams(max_tokens=6, temperature=0.8, seed=1, repetition_penalty=1.3),
    ):
        outputs = llm.generate(prompts, [SamplingParams(max_tokens=6, temperature=0), second])
        assert all(output.finished for output in outputs)
    assert llm.engine.metrics().num_compiles_after_warmup == 0


def test_a_step_needing_a_program_warmup_left_out_fails_loudly_and_serving_goes_on(llm):
    engine = llm.engine
    request_id = engine.add_request("Hello there", SamplingParams(max_tokens=4, prompt_logprobs=1))
    with pytest.raises(RuntimeError, match="warm-up did not compile.*warmup_prompt_logprobs"):
        engine.step()
    assert engine.abort(request_id)
    assert llm.generate("Hello there", SamplingParams(max_tokens=4, temperature=0))[0].finished
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_free_pages == engine.pool.num_usable_pages


def test_a_program_compiled_after_warmup_is_logged_and_counted(caplog):
    model = ModelConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_q_heads=2, num_kv_heads=1,
        head_dim=8, max_position_embeddings=32,
    )  # fmt: skip
    config = EngineConfig(
        page_size=4, num_pages=9, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=32,
        token_buckets=(4, 8), seq_buckets=(2,), page_buckets=(8,), attention_backend="reference",
        compilation_cache_dir=None,
    )  # fmt: skip
    runner = Runner(model, init_params(model, jax.random.key(0)), config)
    runner.warmup(runner.buckets[:1])
    left_out = padding_inputs(runner.buckets[1])
    with caplog.at_level(logging.WARNING), compile_watch.counting() as compiles:
        runner.step(left_out)
    assert compiles and "outside warm-up" in caplog.text
    with compile_watch.counting() as compiles:
        runner.step(left_out)  # now compiled
    assert compiles == []
    strict = Runner(
        model,
        init_params(model, jax.random.key(0)),
        dataclasses.replace(config, compile_after_warmup="error"),
    )
    strict.warmup(strict.buckets[:1])
    with pytest.raises(RuntimeError, match=r"Bucket\(num_tokens=8"):
        strict.programs(left_out)
    assert np.all(np.asarray(jax.device_get(strict._last_tokens)) == 0), "nothing ran"


def test_page_moves_compile_beside_the_step_programs(monkeypatch):
    # Warm-up compiles the page moves on a thread of their own while the step programs compile, so running
    # each of them afterwards (swaps, the host tier's saves and loads, copies, the shift) compiles nothing.
    # Without the executable store: a step program it loaded leaves the pool with a layout object that
    # compares unequal to the one the moves were compiled for (pickling copies JAX's AutoLayout), and the
    # first move is then traced again (found in JAX's cache; serving is not affected).
    bindings = [
        "EngineConfig.compilation_cache_dir = None",
        "EngineConfig.preemption_mode = 'swap'",
        "EngineConfig.kv_host_cache_gib = 0.01",
        "EngineConfig.token_buckets = (64,)",
        "EngineConfig.seq_buckets = (8,)",
        "EngineConfig.page_buckets = (32,)",
    ]
    llm = LLM.from_gin(["configs/tiny_test.gin"], bindings)
    run_moves, compiles_running_moves = page_copy.warmup, []

    def counted(*args, **kwargs):
        with compile_watch.counting() as compiles:
            pool = run_moves(*args, **kwargs)
        compiles_running_moves.append(len(compiles))
        return pool

    monkeypatch.setattr(page_copy, "warmup", counted)
    llm.engine.warmup()
    assert compiles_running_moves == [0]
