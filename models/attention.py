"""Paged attention for one layer: write the step's K/V into the pool, then attend over pages.

The one switch between the backends lives here: "cpu_kernel" (the C++ kernel for XLA:CPU, the CPU path where
it builds), "blocked" (pure jnp), "reference" (the simple pure-jnp oracle), "pallas" (the GPU kernels) and
"pallas_interpret" (the kernels in Pallas' interpreter).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels import cpu_attention
from pallas_kernels.blocked_attention import ragged_paged_attention_blocked
from pallas_kernels.kv_write import write_kv_reference
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

BACKENDS = ("cpu_kernel", "blocked", "reference", "pallas", "pallas_interpret")
# The attentions of XLA's own ops (and the CPU kernel beside them); they write K/V with the reference scatter,
# which XLA does in place.
_JNP_ATTENTION = {"blocked": ragged_paged_attention_blocked, "reference": ragged_paged_attention_reference}


class AttentionMetadata(NamedTuple):
    """Where the step's tokens go in the pool and what each one may see (docs/architecture.md)."""

    slot_mapping: jax.Array  # i32[T]
    cu_q_lens: jax.Array  # i32[B + 1]
    kv_lens: jax.Array  # i32[B]
    page_table: jax.Array  # i32[B, P]


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")


# Jitted so that a step program traces, lowers and compiles its layers' attention once rather than once per
# layer (every layer calls it with the same shapes). With `models.llama`'s cheaper parameter lookups, warm-up
# of the 8B's 24 buckets on an H200 fell from 171 s to 55 s wall (from 1,215 to 289 thread-seconds of tracing
# and compiling). XLA inlines the call: the pool is still updated in place, and the steps run as fast.
@functools.partial(jax.jit, static_argnames=("backend", "decode_only", "mesh"))
def paged_attention(
    q: jax.Array,  # f[T, Hq, head_dim], rotary already applied
    k: jax.Array,  # f[T, Hkv, head_dim], rotary already applied
    v: jax.Array,  # f[T, Hkv, head_dim]
    kv_pages: tuple[jax.Array, jax.Array],  # 2 x f[Hkv, num_pages, page_size, head_dim]
    metadata: AttentionMetadata,
    *,
    backend: str,
    decode_only: bool = False,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:  # (f[T, Hq, head_dim], updated kv_pages)
    """`decode_only` (static) promises that every row has at most one token, row b's at index b, as in a
    decode step; the Pallas backends then run the decode kernel, which reads each row's pages once for all of
    a KV head's query heads instead of the ragged kernel's per-token blocks. "cpu_kernel" runs the C++ kernel
    on decode steps, and on the others too where it has its AVX-512 path (`cpu_attention.fast_for_prefill`);
    its portable loops are slower than the blocked jnp attention on prompt chunks.

    `mesh`: the heads (of q, k, v and the pages) are split over its one axis; every device writes and attends
    over its own heads (each KV head's query heads travel with it), with the step's metadata on all."""
    check_backend(backend)
    # The decode kernel takes the rows' queries only (row b's token is at index b); the tokens past the rows
    # are padding (the bucket may hold more tokens than rows): zeros, discarded.
    decode_kernel = decode_only and backend in ("pallas", "pallas_interpret")
    num_rows = metadata.kv_lens.shape[0]
    attend = functools.partial(
        _write_and_attend, backend=backend, decode_kernel=decode_kernel, decode_only=decode_only
    )
    if mesh is not None and mesh.size > 1:
        heads = PartitionSpec(None, mesh.axis_names[0])  # [T, H, head_dim]
        pages = PartitionSpec(mesh.axis_names[0])  # [Hkv, num_pages, page_size, head_dim]
        # check_vma off: the Pallas calls inside carry no varying-axis annotations.
        attend = jax.shard_map(
            attend,
            mesh=mesh,
            in_specs=(heads, heads, heads, (pages, pages), PartitionSpec()),
            out_specs=(heads, (pages, pages)),
            check_vma=False,
        )
    out, kv_pages = attend(q[:num_rows] if decode_kernel else q, k, v, kv_pages, metadata)
    if decode_kernel:
        out = jnp.zeros_like(q).at[:num_rows].set(out)
    return out, kv_pages


def _write_and_attend(
    q, k, v, kv_pages, metadata: AttentionMetadata, *, backend: str, decode_kernel: bool, decode_only: bool
):
    k_pages, v_pages = kv_pages
    if backend == "cpu_kernel" or backend in _JNP_ATTENTION:
        k_pages, v_pages = write_kv_reference(k, v, k_pages, v_pages, metadata.slot_mapping)
        if backend != "cpu_kernel":
            attend = _JNP_ATTENTION[backend]
        elif decode_only or cpu_attention.fast_for_prefill(k_pages.shape[2], k_pages.shape[3]):
            attend = cpu_attention.ragged_paged_attention_cpu
        else:  # prompt chunks without the kernel's AVX-512 path
            attend = ragged_paged_attention_blocked
        out = attend(q, k_pages, v_pages, metadata.kv_lens, metadata.page_table, metadata.cu_q_lens)
        return out, (k_pages, v_pages)
    # Imported here so that CPU-only users never load the Triton lowering.
    from pallas_kernels.kv_write import write_kv
    from pallas_kernels.mixed_attention import mixed_paged_attention

    interpret = backend == "pallas_interpret"
    k_pages, v_pages = write_kv(k, v, k_pages, v_pages, metadata.slot_mapping, interpret=interpret)
    if decode_kernel:
        from pallas_kernels.paged_attention import paged_attention as decode_attention

        out = decode_attention(
            q, k_pages, v_pages, metadata.kv_lens, metadata.page_table, interpret=interpret
        )
        return out, (k_pages, v_pages)
    out = mixed_paged_attention(
        q, k_pages, v_pages, metadata.kv_lens, metadata.page_table, metadata.cu_q_lens, interpret=interpret
    )
    return out, (k_pages, v_pages)
