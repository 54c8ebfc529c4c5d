"""Mixed steps: the single-token requests of a ragged batch go to the decode kernel, the others to the ragged
kernel; together they equal the reference (interpret mode on CPU, NaN wherever nothing may be read)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ragged_paged_attention import assert_matches_reference, lower_for_h100, make_paged_case

from pallas_kernels.mixed_attention import mixed_paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference

# (q_len, kv_len): decodes before, between and after prefill chunks, a one-token chunk of a prompt (also a
# single-token request), an empty padding row in the middle.
MIXED = [(1, 9), (1, 40), (12, 12), (1, 1), (0, 0), (20, 53), (1, 17), (1, 64), (7, 30), (1, 33)]


@pytest.mark.parametrize(
    "lengths",
    [MIXED, [(1, 5), (1, 70), (1, 16), (0, 0)], [(9, 9), (30, 45), (0, 0)]],
    ids=["mixed", "decodes only", "prefills only"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference(lengths, dtype):
    q_lens, kv_lens = zip(*lengths, strict=True)
    args = make_paged_case(
        len(lengths), q_lens=q_lens, kv_lens=kv_lens, num_q_heads=8, num_kv_heads=2, head_dim=64,
        page_size=8, dtype=dtype, num_tokens=sum(q_lens) + 6, extra_pages=2,
    )  # fmt: skip
    out = jax.jit(functools.partial(mixed_paged_attention, interpret=True))(*args)
    assert_matches_reference(args, out, dtype)
    np.testing.assert_array_equal(np.asarray(out[sum(q_lens) :], np.float32), 0.0)


def test_lowers_to_two_triton_kernels_for_h100():
    f = jax.ShapeDtypeStruct
    args = (
        f((512, 32, 128), jnp.bfloat16),
        f((8, 512, 16, 128), jnp.bfloat16),
        f((8, 512, 16, 128), jnp.bfloat16),
        f((256,), jnp.int32),
        f((256, 128), jnp.int32),
        f((257,), jnp.int32),
    )
    hlo = lower_for_h100(mixed_paged_attention, *args)
    assert hlo.count("__gpu$xla.gpu.triton") == 2


def test_the_ragged_kernel_leaves_skipped_requests_at_zero():
    q_lens, kv_lens = zip(*MIXED, strict=True)
    args = make_paged_case(
        3, q_lens=q_lens, kv_lens=kv_lens, num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=8,
        dtype=jnp.float32,
    )  # fmt: skip
    skip = jnp.asarray([q == 1 for q in q_lens])
    out = jax.jit(functools.partial(ragged_paged_attention, interpret=True, skip_rows=skip))(*args)
    expected = jax.jit(ragged_paged_attention_reference)(*args)
    single = np.repeat(np.asarray(q_lens) == 1, q_lens)
    np.testing.assert_array_equal(np.asarray(out)[single], 0.0)
    np.testing.assert_allclose(np.asarray(out)[~single], np.asarray(expected)[~single], atol=1e-5, rtol=1e-5)
