"""The Pallas ragged paged-attention kernel, run by the Pallas interpreter on CPU, against the jnp reference.

Every case poisons what must not be read: pages no request owns, the null page, slots past a request's length,
and the queries of padding tokens are NaN, and page ids are a random permutation of the pool.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import tuning
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def make_paged_case(
    seed,
    *,
    q_lens,
    kv_lens,
    num_q_heads,
    num_kv_heads,
    head_dim,
    page_size,
    dtype,
    num_tokens=None,
    extra_pages=0,
):
    """Random queries and pool for requests with these lengths; everything unreadable is NaN. `num_tokens`
    (default: the requests' own) pads the step with NaN queries; `extra_pages` widens the page table with null
    columns past the longest request's pages, as a bucket does.

    Returns (q f[T, Hq, d], k_pages, v_pages f[Hkv, N, page_size, d], kv_lens i32[B], page_table i32[B, P],
    cu_q_lens i32[B + 1]).
    """
    rng = np.random.default_rng(seed)
    pages_needed = [-(-kv // page_size) for kv in kv_lens]
    num_pages = 1 + sum(pages_needed) + 3  # the null page, the requests' pages, and a few nobody owns
    ids = iter(rng.permutation(np.arange(1, num_pages)))
    page_table = np.zeros((len(kv_lens), max(1, *pages_needed) + extra_pages), np.int32)
    readable = np.zeros((num_pages, page_size), bool)
    for b, kv in enumerate(kv_lens):
        for i in range(pages_needed[b]):
            page_table[b, i] = next(ids)
            readable[page_table[b, i], : min(page_size, kv - i * page_size)] = True
    k_pages, v_pages = rng.standard_normal((2, num_kv_heads, num_pages, page_size, head_dim))
    k_pages[:, ~readable] = np.nan
    v_pages[:, ~readable] = np.nan
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((num_tokens or cu_q_lens[-1], num_q_heads, head_dim))
    q[cu_q_lens[-1] :] = np.nan
    as_f = functools.partial(jnp.asarray, dtype=dtype)
    as_i = functools.partial(jnp.asarray, dtype=jnp.int32)
    return as_f(q), as_f(k_pages), as_f(v_pages), as_i(kv_lens), as_i(page_table), as_i(cu_q_lens)


def assert_matches_reference(args, out, dtype, sm_scale=None):
    # Jitted: op-by-op dispatch would compile each primitive separately, which costs more than the test.
    expected = jax.jit(functools.partial(ragged_paged_attention_reference, sm_scale=sm_scale))(*args)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert not np.isnan(np.asarray(out, np.float32)).any()
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=tol, rtol=tol
    )


# Each case covers several rows of the matrix: group sizes 1, 3, 4, 8; head_dim 64 and 128; page sizes
# 8, 16, 32; lengths 1, page_size - 1, page_size + 1 and long; empty padding rows and padding tokens; a long
# prompt over a cached prefix (several q blocks, KV blocks both wholly visible and on the causal diagonal).
def _lengths(page_size):
    # (q_len, kv_len) per request: decode at length 1 and page_size + 1, a fresh prompt of page_size - 1, a
    # chunk over a cached prefix, an empty padding row, and a long prompt after a prefix.
    return [(1, 1), (1, page_size + 1), (page_size - 1, page_size - 1), (page_size + 1, 3 * page_size)] + [
        (0, 0),
        (40, 110),
    ]


CASES = [
    # (num_q_heads, num_kv_heads, head_dim, page_size, dtype): group sizes 1, 3, 4, 8, head_dim 64 and 128,
    # page sizes 8, 16, 32 and both dtypes each appear at least once.
    (2, 2, 64, 8, jnp.float32),
    (9, 3, 64, 16, jnp.bfloat16),  # SmolLM2's heads
    (4, 1, 128, 32, jnp.float32),
    (16, 2, 128, 8, jnp.bfloat16),
]


class TestRaggedPagedAttentionInterpret:
    INTERPRET = True

    @pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,page_size,dtype", CASES)
    def test_matches_reference(self, num_q_heads, num_kv_heads, head_dim, page_size, dtype):
        q_lens, kv_lens = zip(*_lengths(page_size), strict=True)
        args = make_paged_case(
            page_size + head_dim,
            q_lens=q_lens,
            kv_lens=kv_lens,
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            page_size=page_size,
            dtype=dtype,
            num_tokens=sum(q_lens) + 5,  # padding tokens past the last request
        )
        out = jax.jit(functools.partial(ragged_paged_attention, interpret=self.INTERPRET))(*args)
        assert_matches_reference(args, out, dtype)
        np.testing.assert_array_equal(np.asarray(out[sum(q_lens) :], np.float32), 0.0)

    def test_small_blocks_and_explicit_scale(self):
        # The smallest tiles: many q blocks per request (4 tokens x 4 heads), many KV blocks of 2 pages each.
        q_lens, kv_lens = (17, 1, 0, 9), (50, 7, 0, 9)
        args = make_paged_case(
            7, q_lens=q_lens, kv_lens=kv_lens, num_q_heads=8, num_kv_heads=2, head_dim=64, page_size=8,
            dtype=jnp.float32,
        )  # fmt: skip
        blocks = tuning.RaggedBlocks(block_m=16, block_kv=16, num_warps=4, num_stages=2)
        kernel = functools.partial(
            ragged_paged_attention, sm_scale=0.3, interpret=self.INTERPRET, blocks=blocks
        )
        out = jax.jit(kernel)(*args)
        assert_matches_reference(args, out, jnp.float32, sm_scale=0.3)


class TestRaggedInputChecks:
    def _args(self, **kw):
        spec = dict(q=(8, 4, 64), pages=(2, 5, 8, 64), kv_lens=(3,), page_table=(3, 2), cu_q_lens=(4,))
        spec.update(kw)
        f = jax.ShapeDtypeStruct
        return (
            f(spec["q"], jnp.float32),
            f(spec["pages"], jnp.float32),
            f(spec["pages"], jnp.float32),
            f(spec["kv_lens"], spec.get("kv_dtype", jnp.int32)),
            f(spec["page_table"], jnp.int32),
            f(spec["cu_q_lens"], jnp.int32),
        )

    @pytest.mark.parametrize(
        "kw,message",
        [
            (dict(cu_q_lens=(3,)), "cu_q_lens must be"),
            (dict(kv_dtype=jnp.float32), "kv_lens must be int32"),
            (dict(q=(8, 3, 64)), "num_q_heads 3 is not a multiple"),
            (dict(q=(8, 4, 32)), "q head_dim 32"),
            (dict(q=(8, 4, 48), pages=(2, 5, 8, 48)), "head_dim must be a power of 2"),
            (dict(pages=(2, 5, 12, 64)), "page_size must be a power of 2"),
            (dict(q=(8, 8, 128), pages=(8, 2**20, 16, 128)), "k_pages has 17179869184 elements"),
        ],
    )
    def test_bad_inputs_raise(self, kw, message):
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(functools.partial(ragged_paged_attention, interpret=True), *self._args(**kw))


def lower_for_h100(fn, *args):
    """StableHLO of fn lowered for an H100 from a CPU-only machine: the Triton lowering accepts the kernel."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_lowers_to_triton_for_h100():
    f = jax.ShapeDtypeStruct
    args = (
        f((300, 32, 128), jnp.bfloat16),
        f((8, 512, 16, 128), jnp.bfloat16),
        f((8, 512, 16, 128), jnp.bfloat16),
        f((5,), jnp.int32),
        f((5, 40), jnp.int32),
        f((6,), jnp.int32),
    )
    blocks = tuning.ragged_blocks(128, "NVIDIA H100 80GB HBM3")
    hlo = lower_for_h100(functools.partial(ragged_paged_attention, blocks=blocks), *args)
    assert hlo.count("__gpu$xla.gpu.triton") == 1
