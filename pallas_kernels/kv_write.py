"""Write a step's new K/V into the page pool at flat slots (`page * page_size + offset`).

Padding tokens carry slot 0, which lies in the reserved null page 0: their writes land where nothing is ever
read, so no branch is needed. Callers donate the pool so XLA updates it in place: the Pallas `write_kv`
aliases each pool to its output, so with a donated pool a step writes T x heads rows and copies nothing else.
"""

import functools

import jax
import jax.experimental.pallas.triton as plt
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import tuning


def check_kv_write_inputs(k, v, k_pages, v_pages, slot_mapping) -> None:
    if k.shape != v.shape or k.ndim != 3:
        raise ValueError(
            f"k and v must both be [num_tokens, num_kv_heads, head_dim], got {k.shape}, {v.shape}"
        )
    if k_pages.shape != v_pages.shape or k_pages.ndim != 4:
        raise ValueError(f"k_pages and v_pages must match and be 4-D, got {k_pages.shape}, {v_pages.shape}")
    if (k.shape[1], k.shape[2]) != (k_pages.shape[0], k_pages.shape[3]):
        raise ValueError(
            f"new K/V heads x head_dim {k.shape[1:]} do not match the pool's "
            f"{(k_pages.shape[0], k_pages.shape[3])}"
        )
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != jnp.int32:
        raise ValueError(
            f"slot_mapping must be i32[{k.shape[0]}], got {slot_mapping.dtype}{slot_mapping.shape}"
        )


def write_kv_reference(
    k: jax.Array,  # f[T, num_kv_heads, head_dim]
    v: jax.Array,  # f[T, num_kv_heads, head_dim]
    k_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]
    slot_mapping: jax.Array,  # i32[T]
) -> tuple[jax.Array, jax.Array]:  # the updated (k_pages, v_pages)
    check_kv_write_inputs(k, v, k_pages, v_pages, slot_mapping)
    page_size = k_pages.shape[2]
    page, offset = slot_mapping // page_size, slot_mapping % page_size
    k_pages = k_pages.at[:, page, offset, :].set(k.swapaxes(0, 1).astype(k_pages.dtype))
    v_pages = v_pages.at[:, page, offset, :].set(v.swapaxes(0, 1).astype(v_pages.dtype))
    return k_pages, v_pages


def _write_kernel(k_ref, v_ref, k_in_ref, v_in_ref, slot_ref, k_out_ref, v_out_ref, *, block_tokens):
    del k_in_ref, v_in_ref  # the same buffers as the outputs: the pools, updated in place
    i, h = pl.program_id(0), pl.program_id(1)
    num_tokens, _, head_dim = k_ref.shape
    page_size = k_out_ref.shape[2]
    t = i * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)
    valid = t < num_tokens
    # Rows past the last token read slot 0: like padding tokens they aim at the null page (and are masked).
    slot = plt.load(slot_ref.at[t], mask=valid, other=0)
    page, offset = slot // page_size, slot % page_size
    dim = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    src = (t[:, None], jnp.full((block_tokens, 1), h, jnp.int32), dim)
    dst = (jnp.full((block_tokens, 1), h, jnp.int32), page[:, None], offset[:, None], dim)
    for new_ref, pool_ref in ((k_ref, k_out_ref), (v_ref, v_out_ref)):
        row = plt.load(new_ref.at[src], mask=valid[:, None], other=0)
        plt.store(pool_ref.at[dst], row.astype(pool_ref.dtype), mask=valid[:, None])


def write_kv(
    k: jax.Array,  # f[T, num_kv_heads, head_dim]
    v: jax.Array,  # f[T, num_kv_heads, head_dim]
    k_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]; donate it for an in-place update
    v_pages: jax.Array,  # f[num_kv_heads, num_pages, page_size, head_dim]; donate it for an in-place update
    slot_mapping: jax.Array,  # i32[T]; padding tokens carry 0 (the null page)
    *,
    interpret: bool = False,
    blocks: tuning.KvWriteBlocks | None = None,
) -> tuple[jax.Array, jax.Array]:  # the updated (k_pages, v_pages)
    """The Pallas kernel of `write_kv_reference`. Grid (token block, KV head); a program scatters its rows."""
    check_kv_write_inputs(k, v, k_pages, v_pages, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of 2 for the Pallas kernels, got {head_dim}")
    if k_pages.size >= 2**31:  # the kernel's pointer offsets are 32-bit
        raise ValueError(f"k_pages has {k_pages.size} elements; the Pallas kernels index below 2**31")
    if blocks is None:
        blocks = tuning.kv_write_blocks()
    return pl.pallas_call(
        functools.partial(_write_kernel, block_tokens=blocks.block_tokens),
        grid=(pl.cdiv(num_tokens, blocks.block_tokens), num_kv_heads),
        out_shape=(
            jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
            jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype),
        ),
        input_output_aliases={2: 0, 3: 1},
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
        interpret=interpret,
        name="write_kv",
    )(k, v, k_pages, v_pages, slot_mapping)
