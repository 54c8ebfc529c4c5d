"""On-device sampling of one batch in which every row has its own temperature, top-k, top-p and seed.

A row's draw uses only its own key, `fold_in(fold_in(base_key, seed), position)`, so a request's tokens do not
depend on which other requests share the batch, how many rows the bucket pads to, or where the row sits.

The filters are applied as one threshold per row on the temperature-scaled logits, found among the top
`MAX_TOP_K` candidates (`lax.top_k`; no full-vocabulary sort). The draw is then an inverse-CDF draw over the
whole vocabulary in two levels (pick a block of the vocabulary by its mass, then a token inside the block), so
a row with no top-k is sampled from the full distribution, not only from the candidates, and every cumulative
sum stays short enough to keep float32 exact where it matters. This costs a few elementwise passes over the
logits, far less than a Gumbel noise per vocabulary entry (threefry for B x V values).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# The largest top_k a request may ask for, and the number of candidates the top-p threshold is searched in.
MAX_TOP_K = 128
# Vocabulary entries per block of the two-level draw: short cumulative sums on both levels.
_BLOCK = 256


class SampledTokens(NamedTuple):
    token_ids: jax.Array  # i32[B]
    logprobs: jax.Array  # f32[B]: log-softmax of the unmodified logits at the chosen token


def _chosen_logprobs(logits: jax.Array, token_ids: jax.Array) -> jax.Array:
    # What vLLM reports: the model's own distribution, before temperature and filters.
    chosen = jnp.take_along_axis(logits, token_ids[:, None], axis=1)[:, 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)


def greedy_sample(logits: jax.Array) -> SampledTokens:  # logits: f32[B, V]
    """Argmax of every row: the variant compiled for steps in which no row samples."""
    token_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return SampledTokens(token_ids, _chosen_logprobs(logits, token_ids))


def _thresholds(
    scaled: jax.Array,  # f32[B, V]: logits / temperature
    top_k: jax.Array,  # i32[B]; 0 = off
    top_p: jax.Array,  # f32[B]; 1 = off
) -> jax.Array:  # f32[B]: the smallest scaled logit a row may still draw
    num_candidates = min(MAX_TOP_K, scaled.shape[1])
    values, _ = jax.lax.top_k(scaled, num_candidates)  # f32[B, K], descending
    k_index = jnp.clip(top_k, 1, num_candidates) - 1
    k_threshold = jnp.where(top_k > 0, jnp.take_along_axis(values, k_index[:, None], axis=1)[:, 0], -jnp.inf)

    # The nucleus is the shortest prefix of the sorted distribution whose mass reaches top_p: a candidate is
    # in it when the mass strictly before it is still below top_p.
    probs = jnp.exp(values - jax.nn.logsumexp(scaled, axis=-1, keepdims=True))
    mass = jnp.cumsum(probs, axis=1)
    in_nucleus = (mass - probs) < top_p[:, None]
    last = jnp.sum(in_nucleus, axis=1) - 1
    p_threshold = jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]
    # A nucleus wider than the candidates has an unknown edge somewhere below them; keeping the whole tail
    # adds at most 1 - top_p of mass, whereas cutting at the candidates could drop far more.
    closed = (mass[:, -1] >= top_p) & (top_p < 1)
    p_threshold = jnp.where(closed, p_threshold, -jnp.inf)
    return jnp.maximum(k_threshold, p_threshold)


def _inverse_cdf(weights: jax.Array, uniforms: jax.Array) -> jax.Array:
    """i32[B]: per row, the entry whose cumulative weight first exceeds u * total (u in [0, 1)).

    weights: f32[B, V] >= 0 with a positive sum per row; uniforms: f32[B, 2], one per level.
    """
    batch, vocab = weights.shape
    num_blocks = -(-vocab // _BLOCK)
    blocks = jnp.pad(weights, ((0, 0), (0, num_blocks * _BLOCK - vocab))).reshape(batch, num_blocks, _BLOCK)
    block_mass = jnp.sum(blocks, axis=-1)  # f32[B, num_blocks]
    block = _pick(block_mass, uniforms[:, 0])
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # f32[B, _BLOCK]
    return block * _BLOCK + _pick(inside, uniforms[:, 1])


def _pick(weights: jax.Array, u: jax.Array) -> jax.Array:  # f32[B, N], f32[B] -> i32[B]
    cumulative = jnp.cumsum(weights, axis=-1)
    target = u * cumulative[:, -1]
    index = jnp.sum(cumulative <= target[:, None], axis=-1)
    # Rounding can put the target at the very top; never land on a zero-weight entry past the last real one.
    positions = jnp.arange(weights.shape[-1], dtype=jnp.int32)
    last_positive = jnp.max(jnp.where(weights > 0, positions, 0), axis=-1)
    return jnp.minimum(index, last_positive).astype(jnp.int32)


def sample(
    logits: jax.Array,  # f32[B, V]
    temperature: jax.Array,  # f32[B]; 0 = greedy
    top_k: jax.Array,  # i32[B]; 0 = off, else 1..MAX_TOP_K
    top_p: jax.Array,  # f32[B] in (0, 1]; 1 = off
    seeds: jax.Array,  # u32[B]
    positions: jax.Array,  # i32[B]: position in the request of the token being sampled
    base_key: jax.Array,  # a typed PRNG key (jax.random.key)
) -> SampledTokens:
    """Samples one token per row with that row's parameters; greedy rows take the argmax."""
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    threshold = _thresholds(scaled, top_k, top_p)
    # Subtracting the row max keeps exp in range; the threshold is a scaled logit, so compare before that.
    weights = jnp.where(
        scaled >= threshold[:, None], jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True)), 0.0
    )

    def row_key(seed, position):
        return jax.random.fold_in(jax.random.fold_in(base_key, seed), position)

    keys = jax.vmap(row_key)(seeds, positions)
    uniforms = jax.vmap(lambda key: jax.random.uniform(key, (2,)))(keys)  # f32[B, 2]
    drawn = _inverse_cdf(weights, uniforms)
    token_ids = jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
    return SampledTokens(token_ids, _chosen_logprobs(logits, token_ids))
