"""Paged decode attention: one new query token per request, split over the KV length (flash-decoding).

Grid (request, KV head, split). A program loads the query heads that share KV head h (the GQA group, padded
to the 16-row MMA minimum), streams its split's pages block by block through the page table, and leaves a
normalised partial output plus its log-sum-exp that a small jnp combine merges (with one split, the final
output directly). Each KV head's pages
are thus read once for the whole group, and the split count is chosen so that batch 1 with a long context
still fills the GPU. docs/kernels.md has the design and the pipelining argument.
"""

import functools
import math

import jax
import jax.experimental.pallas.triton as plt
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import tuning
from pallas_kernels.ragged_paged_attention import (
    check_kernel_shapes,
    check_ragged_inputs,
    dot_f32,
    dot_precision,
    kv_rows,
    load_kv_block,
    next_power_of_2,
    ragged_paged_attention_reference,
    softmax_init,
    softmax_step,
)


def check_paged_attention_inputs(q, k_pages, v_pages, kv_lens, page_table) -> None:
    """Raises ValueError on inputs the decode kernel and its reference cannot serve (static checks only)."""
    if q.ndim != 3 or kv_lens.ndim != 1 or q.shape[0] != kv_lens.shape[0]:
        raise ValueError(
            "q must be [B, num_q_heads, head_dim] with B = len(kv_lens), "
            f"got q {q.shape}, kv_lens {kv_lens.shape}"
        )
    cu_q_lens = jax.ShapeDtypeStruct((q.shape[0] + 1,), jnp.int32)  # one token per request, by construction
    check_ragged_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens)


def paged_attention_reference(
    q: jax.Array,  # f[B, num_q_heads, head_dim]
    k_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]
    kv_lens: jax.Array,  # i32[B]; 0 for padded rows
    page_table: jax.Array,  # i32[B, pages_per_seq]
    *,
    sm_scale: float | None = None,
    interpret: bool = False,
) -> jax.Array:  # q.dtype[B, num_q_heads, head_dim]; rows with kv_len 0 are 0
    """Pure-jnp decode attention: ragged attention where every request has exactly one new token."""
    del interpret  # accepted so the kernel and the reference are interchangeable
    check_paged_attention_inputs(q, k_pages, v_pages, kv_lens, page_table)
    cu_q_lens = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return ragged_paged_attention_reference(
        q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, sm_scale=sm_scale
    )


def _decode_kernel(
    q_ref, k_ref, v_ref, kv_lens_ref, pt_ref, *out_refs, scale, group, page_size, block_kv, pages_per_split
):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim = q_ref.shape[1]
    rows = max(16, next_power_of_2(group))  # the MMA needs >= 16 rows; the extra rows are masked off
    precision = dot_precision(k_ref.dtype)
    kv_len = kv_lens_ref[b]
    first_page = split * pages_per_split
    end_page = jnp.minimum(first_page + pages_per_split, pl.cdiv(kv_len, page_size))
    num_blocks = pl.cdiv(jnp.maximum(end_page - first_page, 0) * page_size, block_kv)
    # The group's query heads, gathered and padded in-kernel: no separate XLA pass over q before the call.
    row = jnp.arange(rows, dtype=jnp.int32)
    real = row < group
    head = h * group + row  # distinct even where masked: a masked duplicate could race a real store
    dim = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    q = plt.load(q_ref.at[head[:, None], dim], mask=real[:, None], other=0).astype(k_ref.dtype)

    # Unlike the ragged kernel, the page ids are loaded in the iteration that uses them: carrying them one
    # block ahead made Triton keep the K/V copies of the next blocks in flight (its pipeliner then waits for
    # only the current block), but on an H100 that gained nothing here and cost 3-6% at batch 64, where
    # decode already runs at ~0.9 of HBM bandwidth with two programs per SM (docs/kernels.md).
    def body(i, carry):
        pos = first_page * page_size + i * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
        in_kv = pos < kv_len
        # Masked past kv_len, so the table needs no padding to whole blocks (and no pass to pad it).
        page_ids = plt.load(pt_ref.at[pos // page_size], mask=in_kv, other=0)
        rows_kv = kv_rows(page_ids, page_size)
        # Each K/V byte is read once per step: mark it first to evict, keeping L2 for the page tables and q.
        k = load_kv_block(k_ref, rows_kv, in_kv, eviction_policy="evict_first")
        v = load_kv_block(v_ref, rows_kv, in_kv, eviction_policy="evict_first")
        logits = dot_f32(q, k, precision, trans_b=True) * scale
        return softmax_step(carry, jnp.where(in_kv[None, :], logits, -jnp.inf), v, precision)

    acc, m, denom = lax.fori_loop(0, num_blocks, body, softmax_init(rows, head_dim))
    out = acc / jnp.where(denom == 0, 1.0, denom)[:, None]
    # Only the group's real rows are stored, straight into [.., num_q_heads, head_dim] outputs.
    o_ref = out_refs[0]
    plt.store(o_ref.at[head[:, None], dim], out.astype(o_ref.dtype), mask=real[:, None])
    if len(out_refs) == 2:  # several splits: the combine weighs each by its log-sum-exp
        # -inf for a split with nothing to read, so the combine weights it 0.
        plt.store(out_refs[1].at[head], m + jnp.log2(denom), mask=real)


def _combine(o: jax.Array, lse: jax.Array) -> jax.Array:
    """Merges splits: o f32[S, ..., d] (each normalised), lse f32[S, ...] in log2 units -> f32[..., d]."""
    top = lse.max(axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp2(lse - top)  # f32[S, ...]
    den = w.sum(axis=0)
    return (w[..., None] * o).sum(axis=0) / jnp.where(den == 0, 1.0, den)[..., None]


def num_splits(batch: int, num_kv_heads: int, pages_per_seq: int, page_size: int, blocks) -> tuple[int, int]:
    """(splits, pages per split): just enough KV splits to launch `blocks.min_programs` programs."""
    ppb = max(1, blocks.block_kv // page_size)
    num_blocks = pl.cdiv(pages_per_seq, ppb)
    splits = min(num_blocks, max(1, pl.cdiv(blocks.min_programs, batch * num_kv_heads)))
    blocks_per_split = pl.cdiv(num_blocks, splits)
    return pl.cdiv(num_blocks, blocks_per_split), blocks_per_split * ppb


def paged_attention(
    q: jax.Array,  # f[B, num_q_heads, head_dim]
    k_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]
    kv_lens: jax.Array,  # i32[B]; 0 for padded rows
    page_table: jax.Array,  # i32[B, pages_per_seq]; padded with the null page 0
    *,
    sm_scale: float | None = None,
    interpret: bool = False,
    blocks: tuning.DecodeBlocks | None = None,
) -> jax.Array:  # q.dtype[B, num_q_heads, head_dim]; rows with kv_len 0 are 0
    """The Pallas decode kernel of `paged_attention_reference`; `blocks` overrides the tuning table."""
    check_paged_attention_inputs(q, k_pages, v_pages, kv_lens, page_table)
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    pages_per_seq = page_table.shape[1]
    check_kernel_shapes(q, k_pages)
    group = num_q_heads // num_kv_heads
    if blocks is None:  # the table's row, fitted to this dtype's shared memory needs
        rows = max(16, next_power_of_2(group))
        itemsize = jnp.dtype(k_pages.dtype).itemsize
        blocks = tuning.fit_shared_memory(
            tuning.decode_blocks(head_dim), q_rows=rows, head_dim=head_dim, itemsize=itemsize
        )
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    splits, pages_per_split = num_splits(batch, num_kv_heads, pages_per_seq, page_size, blocks)
    kernel = functools.partial(
        _decode_kernel,
        scale=sm_scale * math.log2(math.e),
        group=group,
        page_size=page_size,
        block_kv=max(blocks.block_kv, page_size),
        pages_per_split=pages_per_split,
    )
    num_pages = k_pages.shape[1]
    flat = (num_kv_heads, num_pages * page_size, head_dim)  # token rows: a free reshape of the pool
    pages = pl.BlockSpec((None, *flat[1:]), lambda b, h, s: (h, 0, 0))
    if splits == 1:  # one program sees a request's whole length: it writes the final output, no combine
        out_specs = pl.BlockSpec((None, num_q_heads, head_dim), lambda b, h, s: (b, 0, 0))
        out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    else:
        out_specs = [
            pl.BlockSpec((None, None, num_q_heads, head_dim), lambda b, h, s: (s, b, 0, 0)),
            pl.BlockSpec((None, None, num_q_heads), lambda b, h, s: (s, b, 0)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((splits, batch, num_q_heads, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((splits, batch, num_q_heads), jnp.float32),
        ]
    out = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, splits),
        in_specs=[
            pl.BlockSpec((None, num_q_heads, head_dim), lambda b, h, s: (b, 0, 0)),
            pages,
            pages,
            pl.BlockSpec((batch,), lambda b, h, s: (0,)),
            pl.BlockSpec((None, pages_per_seq), lambda b, h, s: (b, 0)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(q, k_pages.reshape(flat), v_pages.reshape(flat), kv_lens, page_table)
    if splits == 1:
        return out
    return _combine(*out).astype(q.dtype)
