"""The one switch between attention backends (models/attention.py): a mixed step through the Pallas kernels
(one-token rows in the decode kernel, the others in the ragged kernel) writes and attends as the reference.

Random K/V in a pool of shuffled pages; the step writes its own tokens first, as a layer does.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import AttentionMetadata, paged_attention


def _mixed_step(seed, q_lens, context_lens, num_tokens, *, heads=(8, 2), head_dim=16, page_size=8):
    """(q, k, v, kv_pages, metadata): rows with `context_lens` cached tokens and `q_lens` new ones."""
    rng = np.random.default_rng(seed)
    num_q_heads, num_kv_heads = heads
    kv_lens = [c + n for c, n in zip(context_lens, q_lens, strict=True)]
    pages_per_row = max(-(-kv // page_size) for kv in kv_lens) + 1  # a null column, as a bucket has
    num_pages = 1 + len(kv_lens) * pages_per_row
    ids = iter(rng.permutation(np.arange(1, num_pages)))
    table = np.zeros((len(kv_lens), pages_per_row), np.int32)
    for b, kv in enumerate(kv_lens):
        table[b, : -(-kv // page_size)] = [next(ids) for _ in range(-(-kv // page_size))]
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    slots = np.zeros(num_tokens, np.int32)  # padding tokens write the null page
    for b, (context, n) in enumerate(zip(context_lens, q_lens, strict=True)):
        pos = context + np.arange(n)
        slots[cu_q_lens[b] : cu_q_lens[b + 1]] = table[b, pos // page_size] * page_size + pos % page_size
    pool_shape = (num_kv_heads, num_pages, page_size, head_dim)
    kv_pages = tuple(jnp.asarray(rng.standard_normal(pool_shape), jnp.float32) for _ in range(2))
    q, k, v = (
        jnp.asarray(rng.standard_normal((num_tokens, h, head_dim)), jnp.float32)
        for h in (num_q_heads, num_kv_heads, num_kv_heads)
    )
    metadata = AttentionMetadata(
        jnp.asarray(slots), jnp.asarray(cu_q_lens), jnp.asarray(kv_lens, jnp.int32), jnp.asarray(table)
    )
    return q, k, v, kv_pages, metadata


@pytest.mark.parametrize(
    "q_lens,context_lens",
    [
        ([1, 1, 9, 1, 3, 0], [20, 5, 0, 40, 16, 0]),  # decode rows around prompt chunks, a padding row
        ([1, 1, 1, 0], [7, 30, 0, 0]),  # one-token rows only, yet not decode_only's layout (padding tokens)
        ([12, 4], [0, 9]),  # no one-token row
    ],
)
def test_mixed_step_through_the_kernels_equals_the_reference(q_lens, context_lens):
    q, k, v, kv_pages, metadata = _mixed_step(len(q_lens), q_lens, context_lens, num_tokens=sum(q_lens) + 3)
    run = jax.jit(paged_attention, static_argnames=("backend", "decode_only"))
    out, pages = run(q, k, v, kv_pages, metadata, backend="pallas_interpret")
    expected, expected_pages = run(q, k, v, kv_pages, metadata, backend="reference")
    real = int(sum(q_lens))  # padding tokens' outputs are unspecified
    np.testing.assert_allclose(np.asarray(out[:real]), np.asarray(expected[:real]), atol=1e-5, rtol=1e-5)
    for got, want in zip(pages, expected_pages, strict=True):
        np.testing.assert_array_equal(np.asarray(got[:, 1:]), np.asarray(want[:, 1:]))
