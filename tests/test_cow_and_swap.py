"""Samples of one prompt sharing pages (copy-on-write), best_of, and preemption by recompute and by swap, on
the tiny random model (configs/tiny_test.gin), plus the device page moves themselves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage import LLM, SamplingParams, page_copy
from jaxpage.sampling_params import sample_seed

PROMPTS = [
    "Hello there, how are you today?",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "1 2 3 4 5",
]


def tiny(*bindings):
    return LLM.from_gin(["configs/tiny_test.gin"], list(bindings))


def assert_pool_full(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_free_pages == engine.pool.num_usable_pages
    assert engine.scheduler.kv_cache.num_used_swap_pages == 0 and not engine._swapped


@pytest.fixture(scope="module")
def llm():
    return tiny()


def test_n_seeded_samples_each_equal_the_sample_run_alone(llm):
    params = SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=42)
    (output,) = llm.generate(PROMPTS[0], params)
    assert [c.index for c in output.outputs] == [0, 1, 2]
    copies = llm.engine.metrics().num_copies
    for index, completion in enumerate(output.outputs):
        alone = SamplingParams(max_tokens=10, temperature=1.0, seed=sample_seed(42, index))
        assert llm.generate(PROMPTS[0], alone)[0].outputs[0].token_ids == completion.token_ids
    assert len({tuple(c.token_ids) for c in output.outputs}) == 3, "the samples did not diverge"
    assert copies > 0, "the samples' shared last prompt page was never copied"
    assert_pool_full(llm)


def test_best_of_returns_the_n_with_the_highest_cumulative_logprob(llm):
    params = SamplingParams(n=2, best_of=5, max_tokens=6, temperature=1.0, seed=7)
    (output,) = llm.generate(PROMPTS[2], params)
    assert len(output.outputs) == 2
    everything = llm.generate(PROMPTS[2], SamplingParams(n=5, max_tokens=6, temperature=1.0, seed=7))[0]
    scores = sorted((c.cumulative_logprob for c in everything.outputs), reverse=True)
    assert sorted((c.cumulative_logprob for c in output.outputs), reverse=True) == pytest.approx(scores[:2])
    assert_pool_full(llm)


def test_greedy_samples_share_pages_and_agree(llm):
    (output,) = llm.generate(PROMPTS[1], SamplingParams(n=4, max_tokens=8, temperature=0))
    alone = llm.generate(PROMPTS[1], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].token_ids
    assert all(c.token_ids == alone for c in output.outputs)
    assert_pool_full(llm)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_changes_no_greedy_token(llm, mode):
    prompts = [p * 2 for p in PROMPTS] + PROMPTS
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    small = tiny("EngineConfig.num_pages = 20", f"EngineConfig.preemption_mode = '{mode}'")
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params)]
    metrics = small.engine.metrics()
    assert metrics.num_preemptions > 0, "the pool was not small enough to preempt"
    if mode == "swap":
        assert metrics.num_swap_outs > 0 and metrics.num_swap_ins == metrics.num_swap_outs
    assert got == expected
    assert_pool_full(small)


def test_page_moves_copy_gather_and_scatter_whole_pages():
    shape = (2, 6, 4, 3)  # [heads, pages, page_size, head_dim]
    keys = jax.random.split(jax.random.key(0), 4)
    pool = tuple(
        (jax.random.normal(keys[2 * i], shape), jax.random.normal(keys[2 * i + 1], shape)) for i in range(2)
    )
    before = jax.tree.map(np.asarray, pool)

    saved = page_copy.gather_pages(pool, [4, 1, 2])
    assert saved.shape == (2, 2, 2, 3, 4, 3)
    np.testing.assert_array_equal(saved[1, 0, :, 0], before[1][0][:, 4])
    np.testing.assert_array_equal(saved[0, 1, :, 2], before[0][1][:, 2])

    pool = page_copy.copy_pages(pool, [(1, 3), (3, 5)])  # every read sees the pool before the call
    pool = page_copy.scatter_pages(pool, [2, 1], saved[:, :, :, :2])
    after = jax.tree.map(np.asarray, pool)
    for layer in range(2):
        for kv in range(2):
            old, new = before[layer][kv], after[layer][kv]
            np.testing.assert_array_equal(new[:, 3], old[:, 1])
            np.testing.assert_array_equal(new[:, 5], old[:, 3])
            np.testing.assert_array_equal(new[:, 2], old[:, 4])
            np.testing.assert_array_equal(new[:, 1], old[:, 1])
            np.testing.assert_array_equal(new[:, 4], old[:, 4])
    assert all(a.dtype == jnp.float32 for layer in pool for a in layer)
