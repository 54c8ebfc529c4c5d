"""Blocked ragged paged attention in plain jnp: the CPU path, same signature and semantics as
`ragged_paged_attention_reference` (which stays the simple oracle).

The reference gathers, for every new token, its request's whole padded page table, so its cost grows with the
bucket's pages per row rather than with the tokens held. Here the step's new tokens are cut into work items of
up to `tokens_per_item` consecutive tokens of one request, and each item's visible KV into blocks of
`pages_per_block` pages. Only the (item, block) pairs an item can see exist: a short request, a padded row or
the early tokens of a prompt (causal) cost nothing past their own last block. A loop takes the pairs
`blocks_per_chunk` at a time (its trip count read at run time) and folds each into its item's online softmax.
A pair gathers its block once for all the item's tokens and all query heads of a KV head (GQA), so K/V is
never repeated per token or per query head.

The data-dependent trip count costs nothing special on a CPU. On a GPU it would make the host wait for the
device every step, which is one reason the Pallas kernels serve there.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.ragged_paged_attention import check_ragged_inputs, token_request_ids

# The running max starts finite, so a row that has seen only masked logits never computes inf - inf.
_MASKED_MAX = -1e30


def default_blocks(num_tokens: int, batch: int) -> tuple[int, int, int]:
    """(tokens_per_item, pages_per_block, blocks_per_chunk) for a step of T tokens in B rows, measured on
    SmolLM2 (9 query heads, 3 KV heads, head_dim 64) on a CPU.

    An item's rows are padded to `tokens_per_item` tokens, while each pair gathers a block once for all of
    them: a decode step (T = B) takes one token per item, and steps with prefill chunks take about T / B, at
    most 16. Blocks of 4 pages bound the reads past a request's end; 32 pairs per iteration keep the loop's
    overhead small.
    """
    return min(16, max(1, num_tokens // batch)), 4, 32


def _work_items(cu_q_lens, kv_lens, tokens_per_item: int, num_items: int):
    """Each request's new tokens cut into items of `tokens_per_item`; unused items hold 0 tokens.

    Returns (request i32[I], first flat token i32[I], tokens i32[I], KV position of the first token i32[I],
    the first item of each request i32[B]).
    """
    batch = kv_lens.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    items_per_req = (q_lens + tokens_per_item - 1) // tokens_per_item
    first_item = jnp.cumsum(items_per_req) - items_per_req
    j = jnp.arange(num_items, dtype=jnp.int32)
    req = jnp.searchsorted(first_item + items_per_req, j, side="right", method="compare_all").astype(
        jnp.int32
    )
    real = req < batch
    req = jnp.minimum(req, batch - 1)
    local = (j - first_item[req]) * tokens_per_item
    tok0 = jnp.where(real, cu_q_lens[req] + local, 0)
    n_tok = jnp.where(real, jnp.minimum(tokens_per_item, q_lens[req] - local), 0)
    pos0 = jnp.where(real, kv_lens[req] - q_lens[req] + local, 0)
    return req, tok0, n_tok, pos0, first_item


# Jitted so that a model's per-layer calls are traced and lowered once per bucket, not once per layer.
@functools.partial(
    jax.jit, static_argnames=("sm_scale", "tokens_per_item", "pages_per_block", "blocks_per_chunk")
)
def ragged_paged_attention_blocked(
    q: jax.Array,  # f[T, num_q_heads, head_dim]
    k_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]
    kv_lens: jax.Array,  # i32[B]
    page_table: jax.Array,  # i32[B, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[B + 1]
    *,
    sm_scale: float | None = None,
    tokens_per_item: int | None = None,
    pages_per_block: int | None = None,
    blocks_per_chunk: int | None = None,
) -> jax.Array:  # q.dtype[T, num_q_heads, head_dim]; rows of padding tokens are 0
    """`ragged_paged_attention_reference` computed block by block; the three sizes default to
    `default_blocks` and change only speed."""
    check_ragged_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    batch, pages_per_seq = page_table.shape
    group = num_q_heads // num_kv_heads
    default_tq, default_pb, default_chunk = default_blocks(num_tokens, batch)
    tq = default_tq if tokens_per_item is None else tokens_per_item
    pb = default_pb if pages_per_block is None else pages_per_block
    chunk = default_chunk if blocks_per_chunk is None else blocks_per_chunk
    for name, value in (("tokens_per_item", tq), ("pages_per_block", pb), ("blocks_per_chunk", chunk)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    block_kv = pb * page_size
    if sm_scale is None:
        sm_scale = head_dim**-0.5

    # Every non-empty item holds a token, and each request adds at most one partial item.
    num_items = min(num_tokens, -(-num_tokens // tq) + batch)
    req, tok0, n_tok, pos0, first_item = _work_items(cu_q_lens, kv_lens, tq, num_items)
    kv_end = pos0 + n_tok  # i32[I]: the item's last token sees positions below this; 0 for unused items
    # Whole blocks of page ids are read; the padding columns name the null page, whose slots are masked off.
    page_table = jnp.pad(page_table, ((0, 0), (0, -pages_per_seq % pb)))
    item_pages = page_table[req]  # i32[I, P padded]

    # Rows of an item are (token, query head of the KV head) pairs, so one product serves the whole group.
    r = jnp.arange(tq, dtype=jnp.int32)
    row_ok = r[None, :] < n_tok[:, None]  # bool[I, tq]
    qi = q[jnp.where(row_ok, tok0[:, None] + r[None, :], 0)].astype(jnp.float32) * sm_scale
    qi = qi.reshape(num_items, tq, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    qi = qi.reshape(num_items, num_kv_heads, tq * group, head_dim)  # item-major: a pair takes one slab
    # Position of each row's token; rows of missing tokens get -1 and so see nothing (their logits, maybe
    # NaN from a padding token's query, are replaced, not weighted).
    q_pos = jnp.repeat(jnp.where(row_ok, pos0[:, None] + r[None, :], -1), group, axis=1)  # i32[I, tq * group]

    # The pairs, item-major: item i owns pairs first_pair[i] .. first_pair[i] + num_blocks[i] - 1. Their
    # table depends only on the step's metadata, so XLA computes it once for all layers (CSE).
    num_blocks = (kv_end + block_kv - 1) // block_kv  # i32[I]
    end_pair = jnp.cumsum(num_blocks)
    first_pair = end_pair - num_blocks
    max_pairs = -(-num_items * (page_table.shape[1] // pb) // chunk) * chunk
    pair = jnp.arange(max_pairs, dtype=jnp.int32)
    pair_item = jnp.searchsorted(end_pair, pair, side="right", method="compare_all").astype(jnp.int32)
    pair_real = pair_item < num_items  # the last chunk runs past the last pair
    pair_item = jnp.minimum(pair_item, num_items - 1)
    pair_block = jnp.where(pair_real, pair - first_pair[pair_item], 0)
    pair_pages = item_pages[pair_item[:, None], pair_block[:, None] * pb + jnp.arange(pb, dtype=jnp.int32)]
    pair_end = jnp.where(pair_real, kv_end[pair_item], 0)  # a pair past the last one sees nothing
    # A page of one KV head is one contiguous row here, which XLA gathers as whole rows (2-3x faster). All
    # heads' rows form one table indexed by head * num_pages + page, so an index names one row; indexing
    # [:, pages] names a strided slice of every head, which XLA:CPU gathers element by element.
    num_pages = k_pages.shape[1]
    k_rows, v_rows = (x.reshape(num_kv_heads * num_pages, page_size * head_dim) for x in (k_pages, v_pages))
    head_offset = (jnp.arange(num_kv_heads, dtype=jnp.int32) * num_pages)[:, None, None]

    def body(c, carry):
        acc, m, denom = carry  # f32[Hkv, I, R, head_dim], f32[Hkv, I, R], f32[Hkv, I, R]
        chunk_of = lambda x: lax.dynamic_slice_in_dim(x, c * chunk, chunk)  # noqa: E731
        item, block, end, pages = map(chunk_of, (pair_item, pair_block, pair_end, pair_pages))
        shape = (num_kv_heads, chunk, block_kv, head_dim)
        rows_of_block = head_offset + pages[None]  # i32[Hkv, chunk, pages_per_block]
        # A plain copy of whole rows: fused into the products below, XLA:CPU gathered element by element and
        # transposed (decode attention 1.3-1.45x slower; docs/kernels.md).
        k, v = lax.optimization_barrier((k_rows[rows_of_block], v_rows[rows_of_block]))
        k, v = k.reshape(shape).astype(jnp.float32), v.reshape(shape).astype(jnp.float32)
        pos = block[:, None] * block_kv + jnp.arange(block_kv, dtype=jnp.int32)  # i32[chunk, block_kv]
        # Slots past the item's end may be stale or poisoned: 0 * NaN is NaN, so V is zeroed, not unweighted.
        v = jnp.where((pos < end[:, None])[None, :, :, None], v, 0.0)
        # The queries (small) are put in K's [Hkv, chunk] order, so K is used as gathered.
        logits = jnp.einsum("kcrd,kcld->kcrl", qi[item].transpose(1, 0, 2, 3), k)
        visible = (pos[:, None, :] <= q_pos[item][:, :, None]) & (pos < end[:, None])[:, None, :]
        logits = jnp.where(visible[None], logits, -jnp.inf)
        # Several pairs of a chunk may fold into one item: scatter-max, then scatter-add, merge them.
        m_new = m.at[:, item].max(logits.max(axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(logits - m_new[:, item][..., None])
        denom = (denom * alpha).at[:, item].add(p.sum(axis=-1))
        acc = (acc * alpha[..., None]).at[:, item].add(jnp.einsum("kcrl,kcld->kcrd", p, v))
        return acc, m_new, denom

    rows = (num_kv_heads, num_items, tq * group)
    init = (
        jnp.zeros((*rows, head_dim), jnp.float32),
        jnp.full(rows, _MASKED_MAX, jnp.float32),
        jnp.zeros(rows, jnp.float32),
    )
    acc, _, denom = lax.fori_loop(0, (end_pair[-1] + chunk - 1) // chunk, body, init)
    out = acc / jnp.where(denom == 0, 1.0, denom)[..., None]  # rows that saw nothing stay 0
    out = out.reshape(num_kv_heads, num_items, tq, group, head_dim).transpose(1, 2, 0, 3, 4)
    out = out.reshape(num_items, tq, num_q_heads, head_dim)

    # Each flat token reads its row back from its item; padding tokens (request B) get 0.
    seq = token_request_ids(cu_q_lens, num_tokens)  # i32[T]
    is_real = seq < batch
    seq = jnp.minimum(seq, batch - 1)
    local = jnp.arange(num_tokens, dtype=jnp.int32) - cu_q_lens[seq]
    item = jnp.where(is_real, first_item[seq] + local // tq, 0)
    out = jnp.where(is_real[:, None, None], out[item, local % tq], 0.0)
    return out.astype(q.dtype)
