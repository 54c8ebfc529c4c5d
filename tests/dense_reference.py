"""The model's logits at every position of one sequence in a single dense pass: what chunked, paged and
cached serving must reproduce."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.attention import AttentionMetadata


def dense_logits(model_config, params, token_ids: list[int]) -> np.ndarray:
    """f32[T, V]: the logits at each of the T tokens (they predict the token after it), from one forward
    pass over the whole sequence held in a single page."""
    num_tokens = len(token_ids)
    # Padded at the end to a power of two, so the few lengths a test walks through share one compiled pass:
    # attention is causal, so tokens after the T real ones change none of their logits.
    padded = max(16, 1 << (num_tokens - 1).bit_length())
    tokens = np.zeros(padded, np.int32)
    tokens[:num_tokens] = token_ids
    return np.asarray(_dense_pass(params, model_config, jnp.asarray(tokens)))[:num_tokens]


@functools.partial(jax.jit, static_argnums=1)
def _dense_pass(params, model_config, tokens):
    num_tokens = tokens.shape[0]
    pool = llama.init_kv_pool(model_config, num_pages=2, page_size=num_tokens)
    positions = jnp.arange(num_tokens, dtype=jnp.int32)
    metadata = AttentionMetadata(
        slot_mapping=positions + num_tokens,  # page 1
        cu_q_lens=jnp.array([0, num_tokens], jnp.int32),
        kv_lens=jnp.array([num_tokens], jnp.int32),
        page_table=jnp.array([[1]], jnp.int32),
    )
    logits, _ = llama.forward(params, model_config, tokens, positions, pool, metadata, positions)
    return logits


def dense_log_softmax(model_config, params, token_ids: list[int]) -> np.ndarray:
    """f32[T, V]: log-softmax of `dense_logits`."""
    return np.asarray(jax.nn.log_softmax(dense_logits(model_config, params, token_ids), axis=-1))


def assert_top_logprobs(got: dict[int, float], token_id: int, dense_row: np.ndarray, k: int, tol=1e-4):
    """`got` is {token_id: logprob, then the k most likely}: checks every value against the dense row (f32[V])
    and that the alternatives are k of the most likely, in order (near-ties may swap)."""
    ids = list(got)
    assert ids[0] == token_id, (ids, token_id)
    # Paged, chunked attention sums in another order than one dense pass: float32 rounding, relative 1e-4.
    np.testing.assert_allclose([got[i] for i in ids], dense_row[ids], rtol=tol, atol=tol)
    # The chosen token appears once, first: among the top k or before them. The rest keep their order.
    top = ids[1:] if len(ids) == k + 1 else ids
    assert len(top) == k and len(set(top)) == k, (ids, k)
    values = np.array([got[i] for i in top])
    assert np.all(np.diff([got[i] for i in ids[1:]]) <= 0), got
    if k:
        kth = np.sort(dense_row)[-k]
        assert values.min() >= kth - tol * (1 + abs(kth)), (values, np.sort(dense_row)[-k:])
