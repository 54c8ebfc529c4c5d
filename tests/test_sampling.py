import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage.batch import NO_TOKEN
from jaxpage.sampling import (
    MAX_TOP_K,
    Penalties,
    SamplingRows,
    apply_penalties,
    filter_thresholds,
    greedy_sample,
    prompt_logprobs,
    sample,
)

BASE_KEY = jax.random.key(1234)
NUM_TOP = 4
_sample = jax.jit(sample, static_argnames="num_top_logprobs")
_greedy = jax.jit(greedy_sample, static_argnames="num_top_logprobs")


def _banned(batch, banned=None):
    """i32[B, S]: each row's banned ids (a list per row, padded with NO_TOKEN); none when `banned` is None."""
    banned = banned or [[]] * batch
    width = max(1, max(map(len, banned)))
    table = np.full((batch, width), NO_TOKEN, np.int32)
    for row, ids in enumerate(banned):
        table[row, : len(ids)] = ids
    return jnp.asarray(table)


def _rows(
    batch, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, positions=None, banned=None
) -> SamplingRows:
    """Per-row parameters; each may be a scalar (every row) or a sequence (one per row)."""
    seeds = np.arange(batch) if seeds is None else seeds
    positions = np.zeros(batch) if positions is None else positions
    full = lambda value, dtype: jnp.asarray(np.broadcast_to(np.asarray(value).astype(dtype), (batch,)))
    return SamplingRows(
        full(temperature, np.float32),
        full(top_k, np.int32),
        full(top_p, np.float32),
        full(min_p, np.float32),
        full(seeds, np.uint32),
        full(positions, np.int32),
        _banned(batch, banned),
    )


def _draw(logits, penalties=None, **params):
    """Samples every row of `logits` (f32[B, V]); returns numpy tokens, logprobs."""
    out = _sample(jnp.asarray(logits, jnp.float32), _rows(len(logits), **params), BASE_KEY, 0, penalties)
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
    out = _greedy(jnp.asarray(logits), _banned(6), num_top_logprobs=0)
    np.testing.assert_array_equal(np.asarray(out.token_ids), logits.argmax(-1))
    expected = _log_softmax(logits)[np.arange(6), logits.argmax(-1)]
    np.testing.assert_allclose(np.asarray(out.logprobs), expected, rtol=1e-5)


def test_banned_tokens_are_never_drawn_and_logprobs_stay_raw():
    # Row 0 bans its two likeliest tokens, row 1 nothing, row 2 the token holding nearly all the mass, row 3
    # ids past the vocabulary only (ignored).
    logits = _random_logits(4, 300, seed=21)
    logits[2, 7] = 50.0
    order = np.argsort(-logits, axis=-1)
    banned = [order[0, :2].tolist(), [], [7], [300, 10**6]]
    allowed = logits.copy()
    allowed[0, order[0, :2]] = -np.inf
    allowed[2, 7] = -np.inf

    greedy = _greedy(jnp.asarray(logits), _banned(4, banned), num_top_logprobs=0)
    np.testing.assert_array_equal(np.asarray(greedy.token_ids), allowed.argmax(-1))
    rows = np.arange(4)
    raw = _log_softmax(logits)
    np.testing.assert_allclose(np.asarray(greedy.logprobs), raw[rows, allowed.argmax(-1)], rtol=1e-5)

    many = np.repeat(logits, 200, axis=0)  # 200 seeds per row
    many_banned = [ids for ids in banned for _ in range(200)]
    penalties = _penalties([[1, 2]] * len(many), [1] * len(many), 8, *[[1.0] * len(many)] * 3)
    for extra in (None, penalties):
        tokens, logprobs = _draw(many, extra, temperature=1.0, banned=many_banned)
        for row, ids in enumerate(many_banned):
            assert tokens[row] not in ids, (row, tokens[row])
        np.testing.assert_allclose(logprobs, _log_softmax(many)[np.arange(len(many)), tokens], rtol=1e-5)
        assert len(set(tokens[400:600].tolist())) > 1  # row 2 still samples what is left


def test_temperature_zero_rows_are_argmax_among_sampled_rows():
    logits = _random_logits(8, 500, seed=1)
    temperature = np.array([0, 1, 0, 0.7, 0, 2, 0, 1], np.float32)
    tokens, _ = _draw(logits, temperature=temperature, min_p=0.3)
    greedy_rows = temperature == 0
    np.testing.assert_array_equal(tokens[greedy_rows], logits.argmax(-1)[greedy_rows])


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


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # As vLLM: top_k keeps {0.5, 0.2}, renormalised {0.71, 0.29}; top_p 0.7 then keeps only the first. On the
    # full distribution the mass before 0.2 (0.5) is below 0.7, so it would have stayed.
    row = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32))
    counts = _histogram(row, 2_000, top_k=2, top_p=0.7)
    assert counts[0] == 2_000


def test_no_top_k_draws_beyond_the_candidates():
    # A flat distribution over more tokens than the candidates: the whole vocabulary must stay reachable.
    vocab = 4 * MAX_TOP_K
    tokens, _ = _draw(np.zeros((2000, vocab), np.float32), top_p=0.9)
    assert len(set(tokens.tolist())) > 2 * MAX_TOP_K


# ---- min_p, the filters together, penalties: numpy references on fixed logits ------------------------------


def _reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """vLLM's order on one row: temperature, min_p, top_k, top_p (each over what the last one kept)."""
    probs = np.exp(_log_softmax(logits / temperature))
    keep = probs >= min_p * probs.max()
    order = np.argsort(-probs, kind="stable")
    if top_k:
        keep[order[top_k:]] = False
    kept = np.where(keep, probs, 0) / np.where(keep, probs, 0).sum()
    before = np.cumsum(kept[order]) - kept[order]
    keep[order[before >= top_p]] = False
    final = np.where(keep, probs, 0)
    return final / final.sum()


def _allowed(logits, temperature, top_k, top_p, min_p):
    """bool[B, V]: the tokens the device filters leave to each row."""
    scaled = jnp.asarray(logits / temperature[:, None])
    rows = _rows(len(logits), temperature, top_k, top_p, min_p)
    threshold = jax.jit(filter_thresholds)(scaled, rows.top_k, rows.top_p, rows.min_p)
    return np.asarray(scaled >= threshold[:, None])


def test_min_p_top_k_top_p_keep_what_the_reference_keeps():
    rng = np.random.default_rng(10)
    batch, vocab = 96, 100  # all of the vocabulary is among the candidates: the sets must match exactly
    logits = rng.normal(size=(batch, vocab)).astype(np.float32) * rng.uniform(0.5, 4, size=(batch, 1))
    temperature = rng.choice([0.5, 1.0, 1.7], size=batch).astype(np.float32)
    top_k = rng.choice([0, 0, 1, 3, 20], size=batch)
    top_p = rng.choice([1.0, 1.0, 0.3, 0.8, 0.95], size=batch).astype(np.float32)
    min_p = rng.choice([0.0, 0.0, 0.02, 0.1, 0.5, 1.0], size=batch).astype(np.float32)
    allowed = _allowed(logits, temperature, top_k, top_p, min_p)
    for b in range(batch):
        expected = _reference_probs(logits[b], temperature[b], top_k[b], top_p[b], min_p[b]) > 0
        np.testing.assert_array_equal(allowed[b], expected, err_msg=f"row {b}")


def test_min_p_keeps_tokens_beyond_the_candidates():
    # A nearly flat row: min_p 0.5 keeps several hundred tokens, far more than the top_k candidates.
    row = np.random.default_rng(11).normal(size=1000).astype(np.float32) * 0.15
    allowed = _allowed(row[None], np.ones(1, np.float32), [0], [1.0], np.array([0.5], np.float32))[0]
    expected = _reference_probs(row, min_p=0.5) > 0
    assert expected.sum() > 2 * MAX_TOP_K
    np.testing.assert_array_equal(allowed, expected)


@pytest.mark.parametrize(
    "params",
    [
        dict(min_p=0.15),
        dict(temperature=0.8, min_p=0.05, top_k=6, top_p=0.9),
        dict(temperature=1.5, min_p=0.2, top_p=0.7),
    ],
)
def test_filtered_sampling_matches_the_reference_distribution(params):
    row = np.array([2.0, 1.4, 1.0, 0.7, 0.3, 0.0, -0.4, -0.8, 1.2, -1.5, 0.5, -2.5], np.float32)
    counts = _histogram(row, 20_000, **params)
    stat, dof = _chi_square(counts, _reference_probs(row, **params))
    assert stat < _chi_square_limit(dof), (stat, counts)


def _penalties(histories, num_prompt, width, repetition, presence, frequency, poison=0):
    """Penalties of rows whose (prompt + output) tokens are `histories`; entries past a row's tokens hold
    `poison`, which must be ignored."""
    history = np.full((len(histories), width), poison, np.int32)
    for b, tokens in enumerate(histories):
        history[b, : len(tokens)] = tokens
    f32 = lambda x: jnp.asarray(np.asarray(x, np.float32))
    return Penalties(
        jnp.asarray(history),
        jnp.asarray(np.asarray(num_prompt, np.int32)),
        jnp.asarray(np.asarray([len(h) for h in histories], np.int32)),
        f32(repetition),
        f32(presence),
        f32(frequency),
    )


def _reference_penalties(logits, prompt, output, repetition, presence, frequency):
    out = logits.astype(np.float64).copy()
    for token in set(prompt) | set(output):
        out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
    for token in set(output):
        out[token] -= frequency * output.count(token) + presence
    return out


# Repeated tokens in prompts and outputs, a token in both, an empty output, a row without penalties.
PROMPTS = [[5, 9, 5, 2], [3, 3, 3], [7, 1], [4, 8, 0]]
OUTPUTS = [[9, 9, 11, 5], [], [1, 1, 1, 6, 6], [2]]
PENALTY_ROWS = dict(
    repetition=[1.3, 2.0, 0.7, 1.0], presence=[0.5, -1.0, 2.0, 0.0], frequency=[0.25, 1.0, -0.5, 0]
)


def test_penalties_match_the_reference():
    logits = _random_logits(4, 16, seed=12)
    logits[:, :8] = np.abs(logits[:, :8]) * np.array([1, -1, 1, -1, 1, -1, 1, -1])  # both signs in play
    histories = [p + o for p, o in zip(PROMPTS, OUTPUTS, strict=True)]
    penalties = _penalties(histories, [len(p) for p in PROMPTS], 12, poison=13, **PENALTY_ROWS)
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), penalties))
    for b in range(4):
        args = [PENALTY_ROWS[name][b] for name in ("repetition", "presence", "frequency")]
        expected = _reference_penalties(logits[b], PROMPTS[b], OUTPUTS[b], *args)
        np.testing.assert_allclose(got[b], expected, rtol=1e-6, err_msg=f"row {b}")
    np.testing.assert_array_equal(got[3], logits[3])  # penalties off: the logits as they were


def test_greedy_rows_take_the_argmax_of_the_penalised_logits_and_logprobs_stay_raw():
    logits = _random_logits(4, 16, seed=13, scale=0.5)
    for b, token in enumerate((9, 3, 1, 2)):  # a repeated token leads each row before the penalties
        logits[b, token] = logits[b].max() + 0.1
    histories = [p + o for p, o in zip(PROMPTS, OUTPUTS, strict=True)]
    penalties = _penalties(histories, [len(p) for p in PROMPTS], 16, **PENALTY_ROWS)
    out = _sample(jnp.asarray(logits), _rows(4, temperature=0.0), BASE_KEY, NUM_TOP, penalties)
    expected = [
        _reference_penalties(logits[b], PROMPTS[b], OUTPUTS[b], *(PENALTY_ROWS[n][b] for n in PENALTY_ROWS))
        for b in range(4)
    ]
    np.testing.assert_array_equal(np.asarray(out.token_ids), np.argmax(expected, axis=-1))
    assert np.any(np.asarray(out.token_ids) != logits.argmax(-1)), "the penalties changed nothing here"
    tokens = np.asarray(out.token_ids)
    np.testing.assert_allclose(
        np.asarray(out.logprobs), _log_softmax(logits)[np.arange(4), tokens], rtol=1e-5
    )


def test_seeded_penalised_row_ignores_its_neighbours_and_the_history_width():
    rng = np.random.default_rng(14)
    mine = rng.normal(size=400).astype(np.float32)
    params = dict(temperature=1.0, top_p=0.95, min_p=0.01)
    history = [3, 3, 17, 250, 17, 17, 99]
    alone, _ = _draw(
        mine[None], _penalties([history], [3], 8, [1.5], [0.5], [0.7]), seeds=[77], positions=[7], **params
    )
    for batch, row, width in ((7, 3, 32), (16, 0, 64)):
        logits = rng.normal(size=(batch, 400)).astype(np.float32) * 5
        logits[row] = mine
        histories = [rng.integers(0, 400, size=rng.integers(0, width)).tolist() for _ in range(batch)]
        histories[row] = history
        num_prompt = [rng.integers(0, len(h) + 1) for h in histories]
        num_prompt[row] = 3
        knobs = [rng.uniform(0.5, 2, batch), rng.uniform(-2, 2, batch), rng.uniform(-2, 2, batch)]
        for knob, value in zip(knobs, (1.5, 0.5, 0.7), strict=True):
            knob[row] = value
        seeds, positions = rng.integers(0, 2**32, size=batch), rng.integers(0, 1000, size=batch)
        seeds[row], positions[row] = 77, 7
        penalties = _penalties(histories, num_prompt, width, *knobs, poison=5)
        tokens, _ = _draw(logits, penalties, seeds=seeds, positions=positions, **params)
        assert tokens[row] == alone[0], (batch, row)


# ---- logprobs ---------------------------------------------------------------------------------------------


def _assert_top_logprobs(out, logits, k):
    expected_ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(out.top_token_ids), expected_ids)
    expected = np.take_along_axis(_log_softmax(logits), expected_ids, axis=-1)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["greedy", "sampled", "penalised"])
def test_top_logprobs_are_the_log_softmax_top_k_of_the_unmodified_logits(variant):
    logits = _random_logits(4, 300, seed=15)
    if variant == "greedy":
        out = _greedy(jnp.asarray(logits), _banned(len(logits)), num_top_logprobs=NUM_TOP)
    else:
        penalties = None
        if variant == "penalised":
            histories = [list(range(50)), [], [7, 7], [299]]
            penalties = _penalties(histories, [10, 0, 1, 1], 64, [2, 1, 1.5, 3], [1, 0, 2, -2], [1, 0, 2, 2])
        rows = _rows(4, temperature=[0.5, 1.0, 2.0, 0.0], top_k=[0, 3, 0, 0], min_p=0.05)
        out = _sample(jnp.asarray(logits), rows, BASE_KEY, NUM_TOP, penalties)
    _assert_top_logprobs(out, logits, NUM_TOP)
    assert np.asarray(out.top_token_ids).dtype == np.int32


def test_prompt_logprobs_are_the_log_softmax_at_each_next_token():
    logits = _random_logits(10, 300, seed=16)
    next_ids = np.random.default_rng(16).integers(0, 300, size=10).astype(np.int32)
    out = jax.jit(prompt_logprobs, static_argnames="num_top_logprobs")(
        jnp.asarray(logits), jnp.asarray(next_ids), num_top_logprobs=3
    )
    np.testing.assert_allclose(
        np.asarray(out.logprobs), _log_softmax(logits)[np.arange(10), next_ids], rtol=1e-5
    )
    _assert_top_logprobs(out, logits, 3)


def test_no_sampler_variant_sorts_the_vocabulary():
    # lax.top_k must stay a TopK over the candidates; a full sort of [B, V] costs ~30x as much on CPU.
    batch, vocab = 4, 1000
    logits = jax.ShapeDtypeStruct((batch, vocab), jnp.float32)
    rows = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _rows(batch))
    penalties = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        _penalties([[1, 2]] * batch, [1] * batch, 8, *[[1] * batch] * 3),
    )
    programs = [
        _greedy.lower(logits, rows.banned_token_ids, num_top_logprobs=NUM_TOP),
        _sample.lower(logits, rows, BASE_KEY, NUM_TOP, None),
        _sample.lower(logits, rows, BASE_KEY, NUM_TOP, penalties),
    ]
    for program in programs:
        sorts = [line for line in program.compile().as_text().splitlines() if " sort(" in line]
        assert sorts == [], sorts
