"""The blocked CPU attention against the pure-jnp reference, on poisoned pools.

Pages no request owns, the null page, slots past a request's length and the queries of padding tokens are NaN,
page ids are a random permutation of the pool, and page tables are wider than the longest request (as in a
bucket), so a read past the loop's bound or a wrong index fails loudly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ragged_paged_attention import make_paged_case

from jaxpage.config import user_cache_dir
from models.attention import AttentionMetadata, paged_attention
from pallas_kernels import cpu_attention
from pallas_kernels.blocked_attention import ragged_paged_attention_blocked
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference


def make_case(seed, *, q_lens, padding, **shape):
    """A float32 case of `make_paged_case` with `padding` NaN query tokens after the last request's."""
    return make_paged_case(seed, q_lens=q_lens, num_tokens=sum(q_lens) + padding, dtype=jnp.float32, **shape)


def check_against_reference(args, **blocks):
    out = jax.jit(functools.partial(ragged_paged_attention_blocked, **blocks))(*args)
    expected = jax.jit(ragged_paged_attention_reference)(*args)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-6, rtol=2e-5)
    num_real = int(args[-1][-1])
    np.testing.assert_array_equal(np.asarray(out[num_real:]), 0.0)


def _mixed(page_size):
    # (q_len, kv_len): decode at lengths 1, page_size - 1, page_size + 1; a fresh prompt of page_size - 1; a
    # chunk over a cached prefix; an empty padding row; a long prompt after a prefix.
    return [
        (1, 1),
        (1, page_size - 1),
        (1, page_size + 1),
        (page_size - 1, page_size - 1),
        (page_size + 1, 3 * page_size),
        (0, 0),
        (40, 110),
    ]


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (9, 3)])  # GQA groups 1 and 3
@pytest.mark.parametrize("page_size", [8, 16])
# The default sizes (here about T / B = 9 tokens per item); one pair per iteration; several pairs of one item
# folded in one iteration, with blocks that do not divide the page table.
@pytest.mark.parametrize(
    "tokens_per_item,pages_per_block,blocks_per_chunk", [(None, None, None), (1, 1, 1), (16, 3, 5)]
)
def test_mixed_prefill_and_decode_match_reference(
    num_q_heads, num_kv_heads, page_size, tokens_per_item, pages_per_block, blocks_per_chunk
):
    q_lens, kv_lens = zip(*_mixed(page_size), strict=True)
    args = make_case(
        page_size + num_q_heads,
        q_lens=q_lens,
        kv_lens=kv_lens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=32,
        page_size=page_size,
        extra_pages=5,
        padding=3,
    )
    check_against_reference(
        args,
        tokens_per_item=tokens_per_item,
        pages_per_block=pages_per_block,
        blocks_per_chunk=blocks_per_chunk,
    )


# The last case ends on a real row with several blocks, so the loop's last chunk has pairs past the last one.
@pytest.mark.parametrize("kv_lens", [(1, 7, 9, 0), (200, 3, 0, 0), (16, 17, 15, 33), (5, 130)])
def test_decode_rows_match_reference(kv_lens):
    # One token per row, as in a decode step; the default blocks take the one-token-per-item path.
    q_lens = [1 if kv else 0 for kv in kv_lens]
    args = make_case(
        sum(kv_lens), q_lens=q_lens, kv_lens=kv_lens, num_q_heads=9, num_kv_heads=3, head_dim=64,
        page_size=16, extra_pages=4, padding=len(kv_lens) - sum(q_lens),
    )  # fmt: skip
    check_against_reference(args)


def test_all_padding_step_is_zero():
    # A warm-up step: every row empty, every token padding; the loop runs zero times.
    args = make_case(
        0, q_lens=[0, 0], kv_lens=[0, 0], num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=8,
        extra_pages=2, padding=4,
    )  # fmt: skip
    out = jax.jit(ragged_paged_attention_blocked)(*args)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_explicit_scale_and_bfloat16_pool():
    q, k_pages, v_pages, *rest = make_case(
        5, q_lens=[9, 1], kv_lens=[30, 12], num_q_heads=4, num_kv_heads=1, head_dim=32, page_size=8,
        extra_pages=1, padding=0,
    )  # fmt: skip
    args = (q.astype(jnp.bfloat16), k_pages.astype(jnp.bfloat16), v_pages.astype(jnp.bfloat16), *rest)
    out = jax.jit(functools.partial(ragged_paged_attention_blocked, sm_scale=0.3))(*args)
    expected = jax.jit(functools.partial(ragged_paged_attention_reference, sm_scale=0.3))(*args)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=2e-2)


def test_bad_block_sizes_raise():
    args = make_case(
        1, q_lens=[1], kv_lens=[3], num_q_heads=2, num_kv_heads=1, head_dim=16, page_size=8, extra_pages=0,
        padding=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="pages_per_block must be a positive int, got -1"):
        ragged_paged_attention_blocked(*args, pages_per_block=-1)


# The blocked path on a 4-token chunk; the CPU kernel on a decode step, which it serves on every CPU.
@pytest.mark.parametrize("backend,first_len", [("blocked", 4), ("cpu_kernel", 1)])
def test_backend_writes_and_attends_like_the_reference(backend, first_len):
    # The model-facing switch: K/V written at the slots, then the step's tokens attend.
    if backend == "cpu_kernel" and not cpu_attention.load(user_cache_dir() / "kernels"):
        pytest.skip("no C++ compiler on this machine")
    q, k_pages, v_pages, kv_lens, page_table, cu_q_lens = make_case(
        3, q_lens=[first_len, 1], kv_lens=[4, 20], num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=8,
        extra_pages=2, padding=1,
    )  # fmt: skip
    k_pages, v_pages = jnp.nan_to_num(k_pages), jnp.nan_to_num(v_pages)
    num_tokens = first_len + 2
    positions = np.array([*range(4 - first_len, 4), 19, 0])
    rows = np.array([0] * first_len + [1])
    slots = np.zeros(num_tokens, np.int32)
    real = num_tokens - 1
    slots[:real] = np.asarray(page_table)[rows, positions[:real] // 8] * 8 + positions[:real] % 8
    metadata = AttentionMetadata(jnp.asarray(slots), cu_q_lens, kv_lens, page_table)
    rng = np.random.default_rng(4)
    k, v = (jnp.asarray(rng.standard_normal((num_tokens, 2, 16)), jnp.float32) for _ in range(2))
    args = (jnp.nan_to_num(q), k, v, (k_pages, v_pages), metadata)
    step = jax.jit(functools.partial(paged_attention, backend=backend, decode_only=backend == "cpu_kernel"))
    out, pool = step(*args)
    want, want_pool = jax.jit(functools.partial(paged_attention, backend="reference"))(*args)
    if backend == "cpu_kernel":
        assert cpu_attention.TARGET in step.lower(*args).as_text()
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-6, rtol=2e-5)
    for got, expected in zip(pool, want_pool, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
