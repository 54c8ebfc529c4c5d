"""Ragged paged attention for mixed steps: each request with one new token goes to the decode kernel.

In a step that mixes decodes with prefill chunks, most requests have a single new token. The ragged kernel
gives each of them a whole program of `block_m` query rows (a block of tokens x the GQA group), of which one
token's rows are real; the decode kernel reads the same pages with a 16-row tile, several requests per SM.
So the single-token requests are gathered into a decode batch (request b's token at index b), the ragged
kernel skips them, and their outputs are put back at their tokens. Same semantics as
`ragged_paged_attention_reference`.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.ragged_paged_attention import check_ragged_inputs, ragged_paged_attention


def mixed_paged_attention(
    q: jax.Array,  # f[T, num_q_heads, head_dim]
    k_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]
    kv_lens: jax.Array,  # i32[B]
    page_table: jax.Array,  # i32[B, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[B + 1]
    *,
    interpret: bool = False,
) -> jax.Array:  # q.dtype[T, num_q_heads, head_dim]; rows of padding tokens are 0
    check_ragged_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens)
    num_tokens = q.shape[0]
    single = cu_q_lens[1:] - cu_q_lens[:-1] == 1  # bool[B]
    first_token = jnp.minimum(cu_q_lens[:-1], num_tokens - 1)  # in range even for padded requests
    # The others' kv_len 0 makes their decode programs read nothing and write zeros.
    decode_out = paged_attention(
        q[first_token], k_pages, v_pages, jnp.where(single, kv_lens, 0), page_table, interpret=interpret
    )
    out = ragged_paged_attention(
        q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, interpret=interpret, skip_rows=single
    )
    # Only the single-token requests' tokens are written; the rest's index is out of range and dropped.
    return out.at[jnp.where(single, first_token, num_tokens)].set(decode_out, mode="drop")
