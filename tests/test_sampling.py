import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage.sampling import MAX_TOP_K, greedy_sample, sample

BASE_KEY = jax.random.key(1234)
_sample = jax.jit(sample)


def _draw(logits, temperature=1.0, top_k=0, top_p=1.0, seeds=None, positions=None):
    """Samples every row of `logits` (f32[B, V]) with the same parameters; returns numpy tokens, logprobs."""
    batch = logits.shape[0]
    seeds = np.arange(batch, dtype=np.uint32) if seeds is None else np.asarray(seeds, np.uint32)
    positions = np.zeros(batch, np.int32) if positions is None else np.asarray(positions, np.int32)
    out = _sample(
        jnp.asarray(logits, jnp.float32),
        jnp.full(batch, temperature, jnp.float32),
        jnp.full(batch, top_k, jnp.int32),
        jnp.full(batch, top_p, jnp.float32),
        jnp.asarray(seeds),
        jnp.asarray(positions),
        BASE_KEY,
    )
    return np.asarray(out.token_ids), np.asarray(out.logprobs)


def _random_logits(batch, vocab, seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(size=(batch, vocab)).astype(np.float32) * scale


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _histogram(logits_row, num_draws, **params):
    """Draws num_draws tokens from one row (one seed per draw) and returns the counts per token."""
    logits = np.broadcast_to(logits_row, (num_draws, logits_row.shape[0]))
    tokens, _ = _draw(logits, **params)
    return np.bincount(tokens, minlength=logits_row.shape[0])


def _chi_square(counts, probs):
    support = probs > 0
    assert counts[~support].sum() == 0, f"drew tokens outside the allowed set: {np.nonzero(counts[~support])}"
    expected = probs[support] * counts.sum()
    return float((((counts[support] - expected) ** 2) / expected).sum()), int(support.sum()) - 1


# Chi-square quantile far in the tail: a correct sampler with a fixed key never gets near it, a wrong one
# (off by a few percent of mass on any token at these draw counts) does.
def _chi_square_limit(dof):
    return dof + 8 * np.sqrt(2 * dof) + 10


def test_greedy_sample_is_argmax_with_full_vocab_logprob():
    logits = _random_logits(6, 300)
    out = jax.jit(greedy_sample)(jnp.asarray(logits))
    np.testing.assert_array_equal(np.asarray(out.token_ids), logits.argmax(-1))
    expected = _log_softmax(logits)[np.arange(6), logits.argmax(-1)]
    np.testing.assert_allclose(np.asarray(out.logprobs), expected, rtol=1e-5)


def test_temperature_zero_rows_are_argmax_among_sampled_rows():
    logits = _random_logits(8, 500, seed=1)
    temperature = np.array([0, 1, 0, 0.7, 0, 2, 0, 1], np.float32)
    out = _sample(
        jnp.asarray(logits),
        jnp.asarray(temperature),
        jnp.zeros(8, jnp.int32),
        jnp.ones(8, jnp.float32),
        jnp.arange(8, dtype=jnp.uint32),
        jnp.zeros(8, jnp.int32),
        BASE_KEY,
    )
    greedy_rows = temperature == 0
    np.testing.assert_array_equal(np.asarray(out.token_ids)[greedy_rows], logits.argmax(-1)[greedy_rows])


def test_logprob_is_of_the_unmodified_logits_whatever_the_temperature():
    logits = _random_logits(16, 200, seed=2)
    tokens, logprobs = _draw(logits, temperature=2.5, top_k=5)
    np.testing.assert_allclose(logprobs, _log_softmax(logits)[np.arange(16), tokens], rtol=1e-5)


def test_seeded_row_ignores_its_neighbours_and_the_batch_size():
    rng = np.random.default_rng(3)
    mine = rng.normal(size=(1, 400)).astype(np.float32)
    params = dict(temperature=1.0, top_p=0.95)
    alone, _ = _draw(mine, seeds=[77], positions=[5], **params)
    for batch, row in ((2, 1), (7, 3), (16, 0)):
        logits = rng.normal(size=(batch, 400)).astype(np.float32) * 5
        logits[row] = mine[0]
        seeds = rng.integers(0, 2**32, size=batch, dtype=np.uint32)
        seeds[row] = 77
        positions = rng.integers(0, 1000, size=batch)
        positions[row] = 5
        tokens, _ = _draw(logits, seeds=seeds, positions=positions, **params)
        assert tokens[row] == alone[0], (batch, row)


def test_the_draw_depends_on_seed_and_position():
    logits = np.zeros((64, 50), np.float32)  # uniform: any change of key shows as a change of token
    by_position, _ = _draw(logits, seeds=np.full(64, 9), positions=np.arange(64))
    by_seed, _ = _draw(logits, seeds=np.arange(64), positions=np.zeros(64))
    assert len(set(by_position.tolist())) > 20 and len(set(by_seed.tolist())) > 20


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_one_is_greedy(temperature):
    logits = _random_logits(32, 1000, seed=4)
    tokens, _ = _draw(logits, temperature=temperature, top_k=1)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_tiny_top_p_is_greedy():
    logits = _random_logits(32, 1000, seed=5)
    tokens, _ = _draw(logits, temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_temperature_sampling_matches_softmax(temperature):
    row = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0], np.float32)
    counts = _histogram(row, 20_000, temperature=temperature)
    stat, dof = _chi_square(counts, np.exp(_log_softmax(row / temperature)))
    assert stat < _chi_square_limit(dof), (stat, counts)


def test_full_vocab_sampling_matches_softmax_across_blocks():
    # Mass spread over tokens in different blocks of the two-level draw, plus a long low tail.
    row = np.full(1500, -4.0, np.float32)
    row[[3, 255, 256, 700, 1499]] = [1.0, 0.5, 2.0, 0.0, 1.5]
    counts = _histogram(row, 8_000)
    probs = np.exp(_log_softmax(row))
    heavy = [3, 255, 256, 700, 1499]
    grouped_counts = np.append(counts[heavy], counts.sum() - counts[heavy].sum())
    grouped_probs = np.append(probs[heavy], 1 - probs[heavy].sum())
    stat, dof = _chi_square(grouped_counts, grouped_probs)
    assert stat < _chi_square_limit(dof), (stat, grouped_counts)


def test_top_k_samples_the_renormalised_top_tokens():
    row = np.array([0.3, 2.0, -1.0, 1.0, 1.2, 0.0, -2.0, 0.9], np.float32)
    top3 = np.argsort(-row)[:3]
    probs = np.zeros_like(row)
    probs[top3] = np.exp(_log_softmax(row[top3]))
    counts = _histogram(row, 20_000, top_k=3)
    stat, dof = _chi_square(counts, probs)
    assert stat < _chi_square_limit(dof), (stat, counts)


def test_top_p_samples_the_nucleus():
    row = np.log(np.array([0.4, 0.05, 0.3, 0.1, 0.15], np.float32))
    # Sorted: 0.4, 0.3, 0.15, 0.1, 0.05. With top_p 0.8 the mass before 0.15 is 0.7 < 0.8: it is in; before
    # 0.1 it is 0.85: out.
    nucleus = np.array([0.4, 0, 0.3, 0, 0.15])
    counts = _histogram(row, 20_000, top_p=0.8)
    stat, dof = _chi_square(counts, nucleus / nucleus.sum())
    assert stat < _chi_square_limit(dof), (stat, counts)


def test_top_k_and_top_p_together_take_the_smaller_set():
    row = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32))
    counts = _histogram(row, 5_000, top_k=3, top_p=0.6)  # top_p keeps {0.5, 0.2}, top_k {0.5, 0.2, 0.15}
    assert counts[2:].sum() == 0 and counts[0] > 0 and counts[1] > 0


def test_no_top_k_draws_beyond_the_candidates():
    # A flat distribution over more tokens than the candidates: the whole vocabulary must stay reachable.
    vocab = 4 * MAX_TOP_K
    tokens, _ = _draw(np.zeros((2000, vocab), np.float32), top_p=0.9)
    assert len(set(tokens.tolist())) > 2 * MAX_TOP_K
