"""On-device sampling of one batch in which every row has its own parameters and seed, and the logprobs of
the model's own distribution.

A row's draw uses only its own key, `fold_in(fold_in(base_key, seed), position)`, so a request's tokens do not
depend on which other requests share the batch, how many rows the bucket pads to, or where the row sits.

The order is vLLM's: repetition, frequency and presence penalties change the logits (greedy rows take the
argmax of those); then temperature; then min_p, top_k and top_p, each keeping a prefix of the sorted
distribution renormalised by the filter before it. So the filters are one threshold per row on the
temperature-scaled logits, found among the top `MAX_TOP_K` candidates (`lax.top_k`; no full-vocabulary
sort). The draw is an inverse-CDF draw over the whole vocabulary in two levels (pick a block of the
vocabulary by its mass, then a token inside the block), so a row with no top-k is sampled from the full
distribution, not only from the candidates, and every cumulative sum stays short enough to keep float32
exact where it matters. This costs a few elementwise passes over the logits, far less than a Gumbel noise
per vocabulary entry (threefry for B x V values).

Before all of that, a row's banned tokens (its EOS and stop token ids while it has fewer than `min_tokens`
outputs, as vLLM's min_tokens, whatever `ignore_eos`) get logit -inf, so no row can draw them.

Logprobs (the chosen token's and the `num_top_logprobs` most likely) are always those of the unmodified
logits, before bans, penalties, temperature and filters: what vLLM reports.
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
    top_token_ids: jax.Array  # i32[B, K]: the K most likely tokens of the unmodified logits, descending
    top_logprobs: jax.Array  # f32[B, K]: their log-softmax


class SamplingRows(NamedTuple):
    """Each row's sampling parameters."""

    temperature: jax.Array  # f32[B]; 0 = greedy
    top_k: jax.Array  # i32[B]; 0 = off, else 1..MAX_TOP_K
    top_p: jax.Array  # f32[B] in (0, 1]; 1 = off
    min_p: jax.Array  # f32[B] in [0, 1]; 0 = off
    seeds: jax.Array  # u32[B]
    positions: jax.Array  # i32[B]: position in the request of the token being sampled
    banned_token_ids: jax.Array  # i32[B, S]: ids the row may not draw; entries >= V are ignored


class Penalties(NamedTuple):
    """Each row's token history and penalties; a row without penalties has history_lens 0 and 1, 0, 0."""

    history: jax.Array  # i32[B, H]: the row's prompt tokens, then its output tokens; the rest is ignored
    history_prompt_lens: jax.Array  # i32[B]: leading history entries that are prompt tokens
    history_lens: jax.Array  # i32[B]: history entries that are tokens
    repetition: jax.Array  # f32[B] > 0; 1 = off
    presence: jax.Array  # f32[B]; 0 = off
    frequency: jax.Array  # f32[B]; 0 = off


class PromptLogprobs(NamedTuple):
    logprobs: jax.Array  # f32[T]: log-softmax at each token of the token that follows it
    top_token_ids: jax.Array  # i32[T, K]
    top_logprobs: jax.Array  # f32[T, K]


def _top_logprobs(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:  # f32[N, V] -> [N, k] x 2
    if k == 0:
        return jnp.zeros((logits.shape[0], 0), jnp.int32), jnp.zeros((logits.shape[0], 0), jnp.float32)
    values, ids = jax.lax.top_k(logits, k)
    return ids.astype(jnp.int32), values - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def _logprobs_of(logits: jax.Array, token_ids: jax.Array) -> jax.Array:  # f32[N, V], i32[N] -> f32[N]
    chosen = jnp.take_along_axis(logits, token_ids[:, None], axis=1)[:, 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)


def _sampled(logits: jax.Array, token_ids: jax.Array, num_top_logprobs: int) -> SampledTokens:
    return SampledTokens(token_ids, _logprobs_of(logits, token_ids), *_top_logprobs(logits, num_top_logprobs))


def prompt_logprobs(
    logits: jax.Array,  # f32[T, V]: the logits at every token of a step
    next_token_ids: jax.Array,  # i32[T]: the token following each one (any valid id where none matters)
    num_top_logprobs: int,  # static K
) -> PromptLogprobs:
    """Log-probabilities of each token's successor and the K most likely successors, for prompt logprobs."""
    logits = logits.astype(jnp.float32)
    return PromptLogprobs(_logprobs_of(logits, next_token_ids), *_top_logprobs(logits, num_top_logprobs))


def ban_tokens(logits: jax.Array, banned_token_ids: jax.Array) -> jax.Array:  # f32[B, V], i32[B, S]
    """The logits with each row's banned ids at -inf; ids past the vocabulary (the padding) are dropped."""
    rows = jnp.broadcast_to(jnp.arange(logits.shape[0], dtype=jnp.int32)[:, None], banned_token_ids.shape)
    return logits.at[rows, banned_token_ids].set(-jnp.inf, mode="drop")


def greedy_sample(
    logits: jax.Array,  # f32[B, V]
    banned_token_ids: jax.Array,  # i32[B, S], as SamplingRows.banned_token_ids
    num_top_logprobs: int,
) -> SampledTokens:
    """Argmax of every row but its banned tokens: the variant compiled for steps in which no row samples or
    has penalties."""
    raw = logits.astype(jnp.float32)
    token_ids = jnp.argmax(ban_tokens(raw, banned_token_ids), axis=-1).astype(jnp.int32)
    return _sampled(raw, token_ids, num_top_logprobs)


def apply_penalties(logits: jax.Array, penalties: Penalties) -> jax.Array:  # f32[B, V] -> f32[B, V]
    """vLLM's penalties: a token seen in the prompt or output has its logit divided by `repetition` when
    positive, multiplied when not; then OpenAI's, over output tokens only: minus `frequency` per occurrence
    and minus `presence` once."""
    batch, vocab = logits.shape
    index = jnp.arange(penalties.history.shape[1], dtype=jnp.int32)[None, :]
    seen = index < penalties.history_lens[:, None]  # bool[B, H]
    in_output = seen & (index >= penalties.history_prompt_lens[:, None])
    rows = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], penalties.history.shape)
    # Entries outside a set scatter to column `vocab`, past the end, and are dropped.
    output_columns = jnp.where(in_output, penalties.history, vocab)
    prompt_columns = jnp.where(seen & ~in_output, penalties.history, vocab)
    counts = jnp.zeros((batch, vocab), jnp.float32).at[rows, output_columns].add(1.0, mode="drop")
    in_prompt = jnp.zeros((batch, vocab), jnp.bool_).at[rows, prompt_columns].set(True, mode="drop")

    repetition = jnp.where(in_prompt | (counts > 0), penalties.repetition[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / repetition, logits * repetition)
    return logits - penalties.frequency[:, None] * counts - penalties.presence[:, None] * (counts > 0)


def filter_thresholds(
    scaled: jax.Array,  # f32[B, V]: logits / temperature
    top_k: jax.Array,  # i32[B]; 0 = off
    top_p: jax.Array,  # f32[B]; 1 = off
    min_p: jax.Array,  # f32[B]; 0 = off
) -> jax.Array:  # f32[B]: the smallest scaled logit a row may still draw
    """min_p, then top_k, then top_p over what those two kept, as one threshold per row."""
    num_candidates = min(MAX_TOP_K, scaled.shape[1])
    values, _ = jax.lax.top_k(scaled, num_candidates)  # f32[B, C], descending
    # XLA:CPU runs top_k as a sort plus a slice that it turns back into a TopK call, unless other slices of
    # the candidates get folded into the sort first; then it sorts the whole vocabulary (30x slower).
    values = jax.lax.optimization_barrier(values)
    # min_p: p >= min_p * p_max, i.e. scaled >= max + log(min_p) (log 0 = -inf: off).
    threshold = values[:, 0] + jnp.log(min_p)
    k_index = jnp.clip(top_k, 1, num_candidates) - 1
    k_threshold = jnp.take_along_axis(values, k_index[:, None], axis=1)[:, 0]
    threshold = jnp.maximum(threshold, jnp.where(top_k > 0, k_threshold, -jnp.inf))

    # The nucleus is the shortest prefix of the sorted distribution left so far whose mass reaches top_p: a
    # candidate is in it when the mass strictly before it is still below top_p. The mass is renormalised
    # over what min_p and top_k kept, which may reach past the candidates (min_p alone).
    kept = jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf)
    probs = jnp.where(
        values >= threshold[:, None], jnp.exp(values - jax.nn.logsumexp(kept, axis=-1, keepdims=True)), 0.0
    )
    mass = jnp.cumsum(probs, axis=1)
    in_nucleus = (mass - probs) < top_p[:, None]
    last = jnp.sum(in_nucleus, axis=1) - 1
    p_threshold = jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]
    # A nucleus wider than the candidates has an unknown edge somewhere below them; keeping the whole tail
    # adds at most 1 - top_p of mass, whereas cutting at the candidates could drop far more.
    closed = (mass[:, -1] >= top_p) & (top_p < 1)
    return jnp.maximum(threshold, jnp.where(closed, p_threshold, -jnp.inf))


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
    rows: SamplingRows,
    base_key: jax.Array,  # a typed PRNG key (jax.random.key)
    num_top_logprobs: int,  # static K of the top logprobs
    penalties: Penalties | None = None,  # None compiles the variant without them
) -> SampledTokens:
    """Samples one token per row with that row's parameters; greedy rows take the argmax of the logits after
    bans and penalties."""
    raw = logits.astype(jnp.float32)
    logits = ban_tokens(raw, rows.banned_token_ids)
    logits = logits if penalties is None else apply_penalties(logits, penalties)
    greedy = rows.temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, rows.temperature)[:, None]
    threshold = filter_thresholds(scaled, rows.top_k, rows.top_p, rows.min_p)
    # Subtracting the row max keeps exp in range; the threshold is a scaled logit, so compare before that.
    weights = jnp.where(
        scaled >= threshold[:, None], jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True)), 0.0
    )

    def row_key(seed, position):
        return jax.random.fold_in(jax.random.fold_in(base_key, seed), position)

    keys = jax.vmap(row_key)(rows.seeds, rows.positions)
    uniforms = jax.vmap(lambda key: jax.random.uniform(key, (2,)))(keys)  # f32[B, 2]
    drawn = _inverse_cdf(weights, uniforms)
    token_ids = jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
    return _sampled(raw, token_ids, num_top_logprobs)
