"""Ragged paged attention: one call attends a flat batch of new tokens (prefill chunks and decode tokens).

Request b owns new tokens `q[cu_q_lens[b]:cu_q_lens[b+1]]`; they are the last `q_len_b` of its `kv_lens[b]`
tokens, whose K/V already sit in the pages listed by `page_table[b]` (the step writes them before attending).
Token i of request b sees KV positions `0 .. kv_lens[b] - q_len_b + i` (causal among the new tokens, full view
of everything earlier: prefix-cache hits and earlier prefill chunks).

Pool layout: `[num_kv_heads, num_pages, page_size, head_dim]`, so one KV head's page is one contiguous block
of `page_size * head_dim` elements — what a kernel program that owns one KV head reads per step. Page 0 is the
null page: page tables are padded with 0 and padded requests have `q_len == kv_len == 0`; nothing in an unused
page or past `kv_lens` may reach the output (tests fill them with NaN).
"""

import functools
import math

import jax
import jax.experimental.pallas.triton as plt
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import tuning


def check_ragged_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens) -> None:
    """Raises ValueError on shapes the kernels and the reference cannot serve (static checks only)."""
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_dim], got shape {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            "k_pages and v_pages must both be [num_kv_heads, num_pages, page_size, head_dim], "
            f"got {k_pages.shape} and {v_pages.shape}"
        )
    num_kv_heads, _, _, head_dim = k_pages.shape
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} != k_pages head_dim {head_dim}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"num_q_heads {q.shape[1]} is not a multiple of num_kv_heads {num_kv_heads}")
    if kv_lens.ndim != 1 or page_table.ndim != 2 or page_table.shape[0] != kv_lens.shape[0]:
        raise ValueError(
            "kv_lens must be [B] and page_table [B, pages_per_seq], "
            f"got {kv_lens.shape} and {page_table.shape}"
        )
    if cu_q_lens.shape != (kv_lens.shape[0] + 1,):
        raise ValueError(f"cu_q_lens must be [B + 1] = [{kv_lens.shape[0] + 1}], got {cu_q_lens.shape}")
    for name, x in (("kv_lens", kv_lens), ("page_table", page_table), ("cu_q_lens", cu_q_lens)):
        if x.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")


def token_request_ids(cu_q_lens: jax.Array, num_tokens: int) -> jax.Array:
    """i32[num_tokens]: the request each flat token belongs to; padding tokens get B (one past the last)."""
    # Padded requests have empty ranges, so `side="right"` skips them and lands on the owner of each token.
    # "compare_all" (T x B comparisons) rather than the default binary search, a while loop whose every
    # iteration XLA:GPU may decide on the host.
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    return jnp.searchsorted(cu_q_lens[1:], tokens, side="right", method="compare_all").astype(jnp.int32)


def ragged_paged_attention_reference(
    q: jax.Array,  # f[T, num_q_heads, head_dim]
    k_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]
    kv_lens: jax.Array,  # i32[B]
    page_table: jax.Array,  # i32[B, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[B + 1]
    *,
    sm_scale: float | None = None,
) -> jax.Array:  # q.dtype[T, num_q_heads, head_dim]; rows of padding tokens are 0
    """Pure-jnp ragged paged attention: the oracle for the Pallas, blocked and CPU kernels."""
    check_ragged_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    batch, pages_per_seq = page_table.shape
    group = num_q_heads // num_kv_heads
    max_kv = pages_per_seq * page_size
    if sm_scale is None:
        sm_scale = head_dim**-0.5

    seq = token_request_ids(cu_q_lens, num_tokens)  # i32[T]
    is_real = seq < batch
    seq_c = jnp.minimum(seq, batch - 1)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    # Absolute KV position of each new token: the last q_len of the request's kv_len tokens.
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    q_pos = kv_lens[seq_c] - q_lens[seq_c] + (t - cu_q_lens[seq_c])  # i32[T]

    # Each token gathers its own request's pages: cost is of the order of the attention itself.
    pages = page_table[seq_c]  # i32[T, P]
    k = k_pages[:, pages].reshape(num_kv_heads, num_tokens, max_kv, head_dim)
    v = v_pages[:, pages].reshape(num_kv_heads, num_tokens, max_kv, head_dim)
    kv_pos = jnp.arange(max_kv, dtype=jnp.int32)
    visible = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < kv_lens[seq_c][:, None])
    visible &= is_real[:, None]  # bool[T, max_kv]

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("tkgd,ktld->tkgl", qg, k.astype(jnp.float32)) * sm_scale
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(scores - row_max)  # exactly 0 where not visible
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    # Masked V entries may be NaN (poisoned pages): 0 * NaN is NaN, so zero them rather than rely on probs.
    v = jnp.where(visible[None, :, :, None], v.astype(jnp.float32), 0.0)
    out = jnp.einsum("tkgl,ktld->tkgd", probs, v) / jnp.where(denom == 0, 1.0, denom)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


# ------------------------------------------------------------------------------------------------------------
# Pallas kernel (Triton lowering). The pieces the decode kernel shares live here too (see docs/kernels.md).

# The running max starts finite, so a row that has seen only masked logits never computes inf - inf.
_MASKED_MAX = -1e30


def check_kernel_shapes(q, k_pages) -> None:
    """Raises ValueError on sizes the Triton kernels cannot serve: their tiles need power-of-2 sizes, and
    their pointer offsets are 32-bit (a per-layer pool of 2**31 elements is 4 GiB of bf16 per K or V)."""
    head_dim, page_size = k_pages.shape[3], k_pages.shape[2]
    for name, x in (("q", q), ("k_pages", k_pages)):
        if math.prod(x.shape) >= 2**31:
            raise ValueError(
                f"{name} has {math.prod(x.shape)} elements; the Pallas kernels index below 2**31"
            )
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of 2 >= 16 for the Pallas kernels, got {head_dim}")
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of 2 for the Pallas kernels, got {page_size}")


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def dot_precision(dtype) -> lax.Precision | None:
    # Triton multiplies float32 operands in TF32 by default; float32 callers asked for float32.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot_f32(a: jax.Array, b: jax.Array, precision, trans_b: bool = False) -> jax.Array:
    """f32[M, N] = a f[M, K] @ b f[K, N] (b f[N, K] when trans_b), through lax: pl.dot is gone in JAX 0.12."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def kv_rows(page_ids: jax.Array, page_size: int) -> jax.Array:
    """i32[n]: the flat pool row (page * page_size + offset) of each of a block's n tokens."""
    n = page_ids.shape[0]
    return page_ids * page_size + jnp.arange(n, dtype=jnp.int32) % page_size


def load_kv_block(
    pool_ref,  # ref f[num_pages * page_size, head_dim]: one KV head's pages, flattened to token rows
    rows: jax.Array,  # i32[n]: the block's token rows, from kv_rows
    valid: jax.Array | None,  # bool[n], None when every token is valid
    eviction_policy: str | None = None,
) -> jax.Array:  # f[n, head_dim]; invalid rows are 0
    """Gathers a block of tokens via the page table; invalid rows are masked loads, never read (NaN is fine).

    A 2-D [tokens, head_dim] tile straight into the MMA is the shape Triton's software pipeliner recognises
    as an operand load and stages through shared memory with asynchronous copies.
    """
    idx = (rows[:, None], jnp.arange(pool_ref.shape[1], dtype=jnp.int32)[None, :])
    mask = None if valid is None else valid[:, None]
    return plt.load(
        pool_ref.at[idx], mask=mask, other=None if valid is None else 0, eviction_policy=eviction_policy
    )


def softmax_init(rows: int, head_dim: int):
    """(acc f32[rows, head_dim], running max f32[rows], running sum f32[rows]) before any KV block."""
    acc = jnp.zeros((rows, head_dim), jnp.float32)
    return acc, jnp.full((rows,), _MASKED_MAX, jnp.float32), jnp.zeros((rows,), jnp.float32)


def softmax_step(carry, logits: jax.Array, v: jax.Array, precision):
    """One online-softmax update: logits f32[M, N] in log2 units (masked = -inf), v f[N, head_dim]."""
    acc, m, denom = carry
    m_new = jnp.maximum(m, logits.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(logits - m_new[:, None])
    denom = alpha * denom + p.sum(axis=1)
    acc = acc * alpha[:, None] + dot_f32(p.astype(v.dtype), v, precision)
    return acc, m_new, denom


def _ragged_kernel(
    work_ref, q_ref, k_ref, v_ref, pt_ref, out_in_ref, o_ref, *, scale, group, tokens, page_size, block_kv
):
    del out_in_ref  # the same buffer as o_ref, zeros: rows that no program writes (padding tokens) stay 0
    h = pl.program_id(1)
    # A work item: `n_tok` new tokens of request `req` from flat token `tok0`, the first at KV position pos0.
    req, tok0, n_tok, pos0 = work_ref[0], work_ref[1], work_ref[2], work_ref[3]
    head_dim = q_ref.shape[2]
    g_pad = next_power_of_2(group)
    rows = tokens * g_pad
    precision = dot_precision(k_ref.dtype)

    # Rows are (token, query head of KV head h) pairs, so each K/V block feeds the whole group in one MMA.
    t = tok0 + jnp.arange(tokens, dtype=jnp.int32)
    head = h * group + jnp.arange(g_pad, dtype=jnp.int32)
    io_idx = (t[:, None, None], head[None, :, None], jnp.arange(head_dim, dtype=jnp.int32)[None, None, :])
    io_mask = ((t < tok0 + n_tok)[:, None] & (head < (h + 1) * group)[None, :])[:, :, None]
    q = plt.load(q_ref.at[io_idx], mask=io_mask, other=0).reshape(rows, head_dim).astype(k_ref.dtype)
    q_pos = pos0 + jnp.arange(rows, dtype=jnp.int32) // g_pad  # i32[rows]

    kv_end = pos0 + n_tok  # the last token sees up to kv_end - 1; nothing later is read
    num_blocks = pl.cdiv(jnp.maximum(kv_end, 0), block_kv)
    # Blocks wholly at or before the first token's position are visible to every row: no mask work at all.
    num_full = jnp.where(n_tok > 0, jnp.clip((pos0 + 1) // block_kv, 0, num_blocks), 0)

    def block_rows(i):  # i32[block_kv]: pool rows of KV block i (page ids past kv_end are not read)
        pos = i * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
        return kv_rows(plt.load(pt_ref.at[req, pos // page_size], mask=pos < kv_end, other=0), page_size)

    # The page ids of block i + 1 are loaded while block i computes (they ride in the loop carry), so block
    # i's K/V addresses never wait on a load issued in the same iteration.
    def body(i, carry, masked):
        rows_kv, state = carry
        pos = i * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
        next_rows = block_rows(i + 1)
        in_kv = pos < kv_end if masked else None
        k = load_kv_block(k_ref, rows_kv, in_kv)
        v = load_kv_block(v_ref, rows_kv, in_kv)
        logits = dot_f32(q, k, precision, trans_b=True) * scale
        if masked:
            logits = jnp.where((pos[None, :] <= q_pos[:, None]) & in_kv[None, :], logits, -jnp.inf)
        return next_rows, softmax_step(state, logits, v, precision)

    carry = (block_rows(0), softmax_init(rows, head_dim))
    carry = lax.fori_loop(0, num_full, functools.partial(body, masked=False), carry)
    _, (acc, _, denom) = lax.fori_loop(num_full, num_blocks, functools.partial(body, masked=True), carry)
    out = acc / jnp.where(denom == 0, 1.0, denom)[:, None]
    plt.store(o_ref.at[io_idx], out.reshape(tokens, g_pad, head_dim).astype(o_ref.dtype), mask=io_mask)


def _work_list(cu_q_lens, kv_lens, tokens: int, num_items: int, skip_rows=None) -> jax.Array:
    """i32[num_items, 4]: (request, first flat token, tokens, first token's KV position) per q block.

    Each request's new tokens are cut into blocks of `tokens`; unused items have 0 tokens, and so do the
    requests of `skip_rows`. The list is reversed so the heaviest blocks (a long request's last ones, which
    see the most KV) start first and the idle items last.
    """
    batch = kv_lens.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    blocks = (q_lens + tokens - 1) // tokens
    if skip_rows is not None:
        blocks = jnp.where(skip_rows, 0, blocks)
    cu_blocks = jnp.cumsum(blocks)
    j = jnp.arange(num_items, dtype=jnp.int32)
    req = jnp.searchsorted(cu_blocks, j, side="right", method="compare_all").astype(jnp.int32)  # no loop
    real = req < batch
    req = jnp.minimum(req, batch - 1)
    local = (j - (cu_blocks[req] - blocks[req])) * tokens
    item = jnp.stack(
        [
            req,
            jnp.where(real, cu_q_lens[req] + local, 0),
            jnp.where(real, jnp.minimum(tokens, q_lens[req] - local), 0),
            jnp.where(real, kv_lens[req] - q_lens[req] + local, 0),
        ],
        axis=1,
    )
    return item[::-1].astype(jnp.int32)


def ragged_paged_attention(
    q: jax.Array,  # f[T, num_q_heads, head_dim]
    k_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]
    kv_lens: jax.Array,  # i32[B]
    page_table: jax.Array,  # i32[B, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[B + 1]
    *,
    sm_scale: float | None = None,
    interpret: bool = False,
    blocks: tuning.RaggedBlocks | None = None,
    skip_rows: jax.Array | None = None,  # bool[B]: requests whose tokens are left alone (0 in the output)
) -> jax.Array:  # q.dtype[T, num_q_heads, head_dim]; rows of padding tokens are 0
    """The Pallas kernel of `ragged_paged_attention_reference`, same semantics; `blocks` overrides the tuning.

    Grid: (q block, KV head). A program owns up to `block_m` rows = tokens x the KV head's query heads of one
    request, and streams that request's pages block by block up to its causal limit (docs/kernels.md).
    """
    check_ragged_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    batch, pages_per_seq = page_table.shape
    check_kernel_shapes(q, k_pages)
    if blocks is None:  # the table's row, fitted to this dtype's shared memory needs
        table = tuning.ragged_blocks(head_dim)
        itemsize = jnp.dtype(k_pages.dtype).itemsize
        blocks = tuning.fit_shared_memory(table, q_rows=table.block_m, head_dim=head_dim, itemsize=itemsize)
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    group = num_q_heads // num_kv_heads
    tokens = max(1, blocks.block_m // next_power_of_2(group))
    block_kv = max(blocks.block_kv, page_size)
    # Every item holds >= 1 token, and a request adds at most one partial block.
    num_items = max(1, min(num_tokens, pl.cdiv(num_tokens, tokens) + batch))
    work = _work_list(cu_q_lens, kv_lens, tokens, num_items, skip_rows)
    # Whole blocks of page ids are read; the padding columns name the null page and are masked off.
    page_table = jnp.pad(page_table, ((0, 0), (0, -pages_per_seq % (block_kv // page_size))))

    kernel = functools.partial(
        _ragged_kernel,
        scale=sm_scale * math.log2(math.e),
        group=group,
        tokens=tokens,
        page_size=page_size,
        block_kv=block_kv,
    )
    whole = lambda shape: pl.BlockSpec(shape, lambda j, h: (0,) * len(shape))
    flat = (num_kv_heads, num_pages * page_size, head_dim)  # token rows: a free reshape of the pool
    pages = pl.BlockSpec((None, *flat[1:]), lambda j, h: (h, 0, 0))
    return pl.pallas_call(
        kernel,
        grid=(num_items, num_kv_heads),
        in_specs=[
            pl.BlockSpec((None, 4), lambda j, h: (j, 0)),
            whole(q.shape),
            pages,
            pages,
            # The program's request row is chosen in-kernel from its work item, so the whole table is passed.
            whole(page_table.shape),
            whole(q.shape),
        ],
        out_specs=whole(q.shape),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        input_output_aliases={5: 0},
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(work, q, k_pages.reshape(flat), v_pages.reshape(flat), page_table, jnp.zeros_like(q))
