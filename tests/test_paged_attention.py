"""The Pallas decode kernel (one query token per request), run by the Pallas interpreter on CPU, against the
jnp reference; plus the tuning table it reads. Unreadable pages, slots and padded rows' queries are NaN."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ragged_paged_attention import CASES, TOLERANCE, lower_for_h100, make_paged_case

from pallas_kernels import tuning
from pallas_kernels.paged_attention import num_splits, paged_attention, paged_attention_reference


def decode_case(seed, *, kv_lens, num_q_heads, num_kv_heads, head_dim, page_size, dtype):
    """(q f[B, Hq, d], k_pages, v_pages, kv_lens, page_table) with NaN queries for padded rows (kv_len 0)."""
    q, k_pages, v_pages, kv_lens_a, page_table, _ = make_paged_case(
        seed,
        q_lens=[1] * len(kv_lens),
        kv_lens=kv_lens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
    )
    q = jnp.where((kv_lens_a == 0)[:, None, None], jnp.nan, q)
    return q, k_pages, v_pages, kv_lens_a, page_table


def check(args, dtype, sm_scale=None, blocks=None):
    kernel = functools.partial(paged_attention, sm_scale=sm_scale, interpret=True, blocks=blocks)
    out = jax.jit(kernel)(*args)
    expected = jax.jit(functools.partial(paged_attention_reference, sm_scale=sm_scale))(*args)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    out, expected = np.asarray(out, np.float32), np.asarray(expected, np.float32)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    np.testing.assert_array_equal(out[np.asarray(args[3]) == 0], 0.0)  # padded rows


def _lengths(page_size):
    # Lengths 1, page_size - 1, page_size + 1, long (several KV blocks), and an empty padding row.
    return [1, page_size - 1, page_size + 1, 0, 150]


class TestPagedAttentionInterpret:
    INTERPRET = True

    @pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,page_size,dtype", CASES)
    def test_matches_reference(self, num_q_heads, num_kv_heads, head_dim, page_size, dtype):
        args = decode_case(
            page_size + head_dim,
            kv_lens=_lengths(page_size),
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            page_size=page_size,
            dtype=dtype,
        )
        check(args, dtype)

    @pytest.mark.parametrize("min_programs", [1, 10**6])
    def test_one_split_and_many_splits(self, min_programs):
        # min_programs 1: the whole length in one program; 10**6: one KV block per split, most splits empty.
        args = decode_case(
            5,
            kv_lens=[37, 1, 0, 16],
            num_q_heads=8,
            num_kv_heads=2,
            head_dim=64,
            page_size=8,
            dtype=jnp.float32,
        )
        blocks = tuning.DecodeBlocks(block_kv=16, min_programs=min_programs, num_warps=4, num_stages=2)
        check(args, jnp.float32, sm_scale=0.2, blocks=blocks)


def test_split_count_fills_the_gpu_only_when_needed():
    blocks = tuning.DecodeBlocks(block_kv=64, min_programs=528, num_warps=4, num_stages=3)
    # Batch 1, 8 KV heads, 32768 tokens in pages of 16: 512 blocks of 64 tokens, 64 splits of 8 blocks.
    assert num_splits(1, 8, 2048, 16, blocks) == (64, 32)
    # 256 requests x 8 heads already launch 2048 programs: no split.
    assert num_splits(256, 8, 128, 16, blocks) == (1, 128)
    # Never more splits than KV blocks.
    assert num_splits(1, 1, 3, 16, blocks) == (1, 4)


def test_bad_inputs_raise():
    f = jax.ShapeDtypeStruct
    pages = f((2, 5, 8, 64), jnp.float32)
    with pytest.raises(
        ValueError, match="q must be \\[B, num_q_heads, head_dim\\] with B = len\\(kv_lens\\)"
    ):
        jax.eval_shape(paged_attention, f((4, 4, 64), jnp.float32), pages, pages, f((3,), jnp.int32),
                       f((3, 2), jnp.int32))  # fmt: skip
    with pytest.raises(ValueError, match="kv_lens must be \\[B\\] and page_table \\[B, pages_per_seq\\]"):
        jax.eval_shape(paged_attention, f((3, 4, 64), jnp.float32), pages, pages, f((3,), jnp.int32),
                       f((3, 2, 1), jnp.int32))  # fmt: skip


class TestTuning:
    def test_device_families(self):
        assert tuning.device_family("NVIDIA H100 80GB HBM3") == "H100"
        assert tuning.device_family("NVIDIA H200") == "H100"
        assert tuning.device_family("cpu") == "default"

    def test_every_head_dim_gets_blocks(self):
        assert tuning.decode_blocks(128, "NVIDIA H100 80GB HBM3").num_stages >= 2
        assert tuning.decode_blocks(256, "cpu") == tuning.decode_blocks(128, "cpu")
        assert tuning.ragged_blocks(32, "cpu") == tuning.ragged_blocks(64, "cpu")

    def test_float32_blocks_shrink_to_fit_shared_memory(self):
        h100 = "NVIDIA H100 80GB HBM3"
        table = tuning.ragged_blocks(128, h100)
        fit = functools.partial(
            tuning.fit_shared_memory, q_rows=table.block_m, head_dim=128, device_kind=h100
        )
        assert fit(table, itemsize=2) == table  # the bf16 row fits as tuned
        f32 = fit(table, itemsize=4)
        assert f32.num_stages == 2 and f32.block_kv < table.block_kv and f32.block_m == table.block_m
        assert tuning.shared_memory_bytes(f32, q_rows=table.block_m, head_dim=128, itemsize=4) <= 232448

    def test_invalid_blocks_raise(self):
        with pytest.raises(ValueError, match="DecodeBlocks.block_kv must be a power of 2 >= 16, got 48"):
            tuning.DecodeBlocks(block_kv=48, min_programs=1, num_warps=4, num_stages=2)
        with pytest.raises(ValueError, match="RaggedBlocks.block_m must be a power of 2 >= 16, got 8"):
            tuning.RaggedBlocks(block_m=8, block_kv=64, num_warps=4, num_stages=2)


def test_lowers_to_triton_for_h100():
    f = jax.ShapeDtypeStruct
    pages = f((8, 512, 16, 128), jnp.bfloat16)
    args = (f((4, 32, 128), jnp.bfloat16), pages, pages, f((4,), jnp.int32), f((4, 64), jnp.int32))
    blocks = tuning.decode_blocks(128, "NVIDIA H100 80GB HBM3")
    hlo = lower_for_h100(functools.partial(paged_attention, blocks=blocks), *args)
    assert hlo.count("__gpu$xla.gpu.triton") == 1
