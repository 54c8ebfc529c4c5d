"""Runs the Pallas kernels compiled for the GPU (not interpreted) against their jnp references on a handful
of poisoned shapes (the ragged cases also through the mixed-step split), prints the max errors, and checks
that a donated KV write compiles without a copy of the pool. Exits 1 if anything is off. One call
validates a GPU machine:

  python scripts/check_kernels_gpu.py
"""

import dataclasses
import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from bench_kernels import paged_inputs  # the same directory; one case builder for the bench and this check

from pallas_kernels import tuning
from pallas_kernels.kv_write import write_kv, write_kv_reference
from pallas_kernels.mixed_attention import mixed_paged_attention
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference

TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
LLAMA = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)
SMOLLM = dict(num_q_heads=9, num_kv_heads=3, head_dim=64)
GROUP8 = dict(num_q_heads=16, num_kv_heads=2, head_dim=128)
MHA = dict(num_q_heads=4, num_kv_heads=4, head_dim=64)

# (heads, page_size, dtype, q_lens, kv_lens, padding tokens). Decode uses kv_lens only (one token each).
DECODE = [
    (LLAMA, 16, jnp.bfloat16, None, [1, 15, 17, 0, 1000, 4096], 0),
    (SMOLLM, 8, jnp.float32, None, [1, 7, 9, 0, 300], 0),
    (GROUP8, 32, jnp.bfloat16, None, [31, 33, 2048], 0),
]
RAGGED = [
    (LLAMA, 16, jnp.bfloat16, [1, 1, 300, 17, 0], [1, 2000, 300, 1000, 0], 13),
    (SMOLLM, 8, jnp.float32, [5, 1, 64, 0], [5, 9, 200, 0], 3),
    (LLAMA, 16, jnp.float32, [300, 1, 0], [300, 700, 0], 5),  # float32 at head_dim 128: the fitted blocks
    (MHA, 16, jnp.bfloat16, [129, 1], [129, 4000], 0),
]


def max_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float("nan") if np.isnan(got).any() else float(np.abs(got - want).max())


def check_attention(kind: str, case, blocks) -> tuple[str, float, float]:
    heads, page_size, dtype, q_lens, kv_lens, pad = case
    decode = kind.startswith("decode")
    q_lens = [1] * len(kv_lens) if decode else q_lens
    q, kp, vp, kv, pt, cu = paged_inputs(
        jax.random.key(len(kv_lens)), q_lens=q_lens, kv_lens=kv_lens, page_size=page_size, dtype=dtype,
        poison=True, **heads,
    )  # fmt: skip
    if decode:
        args, kernel, reference = (q, kp, vp, kv, pt), paged_attention, paged_attention_reference
    else:
        q = jnp.concatenate([q, jnp.full((pad, *q.shape[1:]), jnp.nan, dtype)])
        args, kernel, reference = (
            (q, kp, vp, kv, pt, cu),
            mixed_paged_attention if kind == "mixed" else ragged_paged_attention,
            ragged_paged_attention_reference,
        )
    got = jax.jit(kernel if blocks is None else functools.partial(kernel, blocks=blocks))(*args)
    with jax.default_matmul_precision("highest"):  # the reference in full float32 on the GPU too
        want = jax.jit(reference)(*args)
    label = (
        f"{kind} heads={heads['num_q_heads']}/{heads['num_kv_heads']}x{heads['head_dim']} page={page_size}"
    )
    return f"{label} {jnp.dtype(dtype).name} lens={kv_lens}", max_error(got, want), TOLERANCE[dtype]


def check_kv_write(dtype) -> tuple[str, float, float]:
    hkv, d, page_size, num_pages, tokens = 8, 128, 16, 64, 300
    rng = np.random.default_rng(0)
    slots = np.zeros(tokens, np.int32)
    slots[:-20] = rng.choice(np.arange(page_size, num_pages * page_size), tokens - 20, replace=False)
    k, v = jax.random.normal(jax.random.key(1), (2, tokens, hkv, d), dtype)
    pools = [jax.random.normal(jax.random.key(i), (hkv, num_pages, page_size, d), dtype) for i in (2, 3)]
    want = jax.jit(write_kv_reference)(k, v, *pools, jnp.asarray(slots))
    got = jax.jit(write_kv)(k, v, *pools, jnp.asarray(slots))
    err = max(max_error(g[:, 1:], w[:, 1:]) for g, w in zip(got, want, strict=True))  # page 0: padding
    return f"write_kv {jnp.dtype(dtype).name} tokens={tokens}", err, 0.0


def pool_copies(donate=(3, 4)) -> list[str]:
    """Copies of a pool-shaped buffer in a compiled, donated write + attention step (there should be none)."""
    hkv, num_pages, page_size, d = 8, 4096, 16, 128
    pool = jax.ShapeDtypeStruct((hkv, num_pages, page_size, d), jnp.bfloat16)
    f = jax.ShapeDtypeStruct

    def step(q, k, v, k_pages, v_pages, slots, kv_lens, page_table, cu_q_lens):
        k_pages, v_pages = write_kv(k, v, k_pages, v_pages, slots)
        return ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens), k_pages, v_pages

    new = f((64, hkv, d), jnp.bfloat16)
    args = (f((64, 32, d), jnp.bfloat16), new, new, pool, pool, f((64,), jnp.int32), f((4,), jnp.int32),
            f((4, 128), jnp.int32), f((5,), jnp.int32))  # fmt: skip
    hlo = jax.jit(step, donate_argnums=donate).lower(*args).compile().as_text()
    shape = f"bf16[{hkv},{num_pages},{page_size},{d}]"
    return [line.strip() for line in hlo.splitlines() if re.search(rf"{re.escape(shape)}\S* copy\(", line)]


def main(argv):
    del argv
    if jax.devices()[0].platform != "gpu":
        print(f"needs a GPU; found {jax.devices()[0].platform} (the CPU tests run the kernels interpreted)")
        sys.exit(1)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    results = []
    for kind, cases, tuned in (
        ("decode", DECODE, tuning.decode_blocks),
        ("ragged", RAGGED, tuning.ragged_blocks),
    ):
        for case in cases:
            heads, dtype = case[0], case[2]
            table = tuned(heads["head_dim"])
            group = heads["num_q_heads"] // heads["num_kv_heads"]
            q_rows = max(16, 1 << (group - 1).bit_length()) if kind == "decode" else table.block_m
            # What the kernels use when given no blocks: the table's row fitted to the dtype's shared memory.
            blocks = tuning.fit_shared_memory(
                table, q_rows=q_rows, head_dim=heads["head_dim"], itemsize=jnp.dtype(dtype).itemsize
            )
            results.append(check_attention(kind, case, blocks))
            results.append(
                check_attention(f"{kind}(stages=1)", case, dataclasses.replace(blocks, num_stages=1))
            )
    results += [check_attention("mixed", case, None) for case in RAGGED]  # the tuned blocks of both kernels
    results += [check_kv_write(jnp.bfloat16), check_kv_write(jnp.float32)]
    failed = 0
    for label, err, tol in results:
        ok = err <= tol  # NaN fails
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} max|err|={err:.3g} (tol {tol:g})  {label}")
    copies = pool_copies()
    print(f"{'ok  ' if not copies else 'FAIL'} pool copies in a donated step: {len(copies)}")
    for line in copies:
        print("    ", line[:200])
    sys.exit(1 if failed or copies else 0)


if __name__ == "__main__":
    app.run(main)
