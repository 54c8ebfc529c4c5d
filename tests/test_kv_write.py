"""The Pallas KV write, run by the Pallas interpreter on CPU, against `write_kv_reference`."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ragged_paged_attention import lower_for_h100

from pallas_kernels import tuning
from pallas_kernels.kv_write import write_kv, write_kv_reference


def write_case(seed, *, num_tokens, num_real, num_kv_heads, head_dim, page_size, num_pages, dtype):
    """New K/V for num_tokens tokens (the last num_tokens - num_real are padding, slot 0) and a NaN pool."""
    rng = np.random.default_rng(seed)
    slots = np.zeros(num_tokens, np.int32)
    # Distinct slots outside the null page, in random order.
    slots[:num_real] = rng.choice(np.arange(page_size, num_pages * page_size), num_real, replace=False)
    k, v = rng.standard_normal((2, num_tokens, num_kv_heads, head_dim)).astype(np.float32)
    pool = jnp.full((num_kv_heads, num_pages, page_size, head_dim), jnp.nan, dtype)
    return jnp.asarray(k), jnp.asarray(v), pool, pool + 0, jnp.asarray(slots)


class TestWriteKvInterpret:
    INTERPRET = True

    @pytest.mark.parametrize(
        "num_tokens,num_real,num_kv_heads,head_dim,page_size,dtype,block_tokens",
        [
            (21, 18, 3, 64, 8, jnp.float32, 16),  # SmolLM2's 3 KV heads; a partial last token block
            (40, 40, 2, 128, 16, jnp.bfloat16, 8),  # f32 K/V written into a bf16 pool
        ],
    )
    def test_matches_reference(
        self, num_tokens, num_real, num_kv_heads, head_dim, page_size, dtype, block_tokens
    ):
        args = write_case(
            num_tokens,
            num_tokens=num_tokens,
            num_real=num_real,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            page_size=page_size,
            num_pages=9,
            dtype=dtype,
        )
        blocks = tuning.KvWriteBlocks(block_tokens=block_tokens, num_warps=4)
        # The pool is donated, as in the model's step.
        kernel = functools.partial(write_kv, interpret=self.INTERPRET, blocks=blocks)
        expected = jax.jit(write_kv_reference)(*args)
        out = jax.jit(kernel, donate_argnums=(2, 3))(*args)
        for got, want in zip(out, expected, strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype
            # Page 0 takes every padding token's write, in no defined order; nothing reads it.
            np.testing.assert_array_equal(
                np.asarray(got[:, 1:], np.float32), np.asarray(want[:, 1:], np.float32)
            )


def test_bad_inputs_raise():
    f = jax.ShapeDtypeStruct
    pool = f((2, 4, 8, 64), jnp.float32)
    new = f((5, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="slot_mapping must be i32\\[5\\]"):
        jax.eval_shape(write_kv, new, new, pool, pool, f((5,), jnp.float32))
    with pytest.raises(ValueError, match="do not match the pool's"):
        jax.eval_shape(write_kv, f((5, 3, 64), jnp.float32), f((5, 3, 64), jnp.float32), pool, pool,
                       f((5,), jnp.int32))  # fmt: skip
    odd = f((2, 4, 8, 48), jnp.float32)
    with pytest.raises(ValueError, match="head_dim must be a power of 2"):
        jax.eval_shape(write_kv, f((5, 2, 48), jnp.float32), f((5, 2, 48), jnp.float32), odd, odd,
                       f((5,), jnp.int32))  # fmt: skip


def test_lowers_to_triton_with_the_pools_aliased():
    f = jax.ShapeDtypeStruct
    pool = f((8, 512, 16, 128), jnp.bfloat16)
    new = f((100, 8, 128), jnp.bfloat16)
    hlo = lower_for_h100(write_kv, new, new, pool, pool, f((100,), jnp.int32))
    assert hlo.count("__gpu$xla.gpu.triton") == 1
    # Outputs 0 and 1 are written into operands 2 and 3 (the pools): no pool-sized output buffer of its own.
    aliases = re.findall(r"output_tuple_indices = \[(\d)\], operand_index = (\d)", hlo)
    assert sorted(aliases) == [("0", "2"), ("1", "3")]
