"""The paged Llama forward against a dense, page-free forward written independently here."""

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import AttentionMetadata
from models.config import ModelConfig, RopeScaling
from models.layers import rope_inv_freq
from models.llama import forward, init_kv_pool, init_params

TINY = ModelConfig(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=96,
    num_layers=2,
    num_q_heads=6,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    rope_theta=10000.0,
)
PAGE_SIZE = 4
NUM_PAGES = 40


def dense_forward(params, cfg, token_ids):  # i32[S] -> f32[S, vocab]; plain causal attention, no pages
    def norm(x, w):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps) * w

    def rope(x, pos):  # f[S, H, hd]: rotate-half written out with explicit complex pairs (i, i + hd/2)
        inv = jnp.asarray(rope_inv_freq(cfg))
        ang = pos[:, None, None] * inv[None, None, :]
        half = cfg.head_dim // 2
        xc = (x[..., :half] + 1j * x[..., half:]) * jnp.exp(1j * ang)
        return jnp.concatenate([xc.real, xc.imag], -1)

    s = token_ids.shape[0]
    pos = jnp.arange(s, dtype=jnp.float32)
    x = params["embed"][token_ids]
    for i in range(cfg.num_layers):
        p = params[f"layers_{i}"]
        h = norm(x, p["attn_norm"])
        q = rope((h @ p["wq"] + p.get("bq", 0)).reshape(s, cfg.num_q_heads, cfg.head_dim), pos)
        k = rope((h @ p["wk"] + p.get("bk", 0)).reshape(s, cfg.num_kv_heads, cfg.head_dim), pos)
        v = (h @ p["wv"] + p.get("bv", 0)).reshape(s, cfg.num_kv_heads, cfg.head_dim)
        k = jnp.repeat(k, cfg.q_per_kv, axis=1)
        v = jnp.repeat(v, cfg.q_per_kv, axis=1)
        scores = jnp.einsum("qhd,khd->hqk", q, k) / np.sqrt(cfg.head_dim)
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf)
        attn = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, -1), v).reshape(s, -1)
        x = x + attn @ p["wo"]
        h = norm(x, p["mlp_norm"])
        x = x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return norm(x, params["final_norm"]) @ head


def run_chunks(params, cfg, tokens, chunk_sizes, page_ids):
    """Feeds `tokens` through the paged forward in chunks; returns logits of every token and the pool."""
    pool = init_kv_pool(cfg, NUM_PAGES, PAGE_SIZE)
    step = jax.jit(forward, static_argnums=(1,))
    page_table = np.zeros((1, len(page_ids)), np.int32)
    page_table[0] = page_ids
    start, all_logits = 0, []
    for n in chunk_sizes:
        pos = np.arange(start, start + n, dtype=np.int32)
        slots = np.asarray(page_ids, np.int32)[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE
        md = AttentionMetadata(
            jnp.asarray(slots),
            jnp.array([0, n], jnp.int32),
            jnp.array([start + n], jnp.int32),
            jnp.asarray(page_table),
        )
        logits, pool = step(
            params,
            cfg,
            jnp.asarray(tokens[start : start + n]),
            jnp.asarray(pos),
            pool,
            md,
            jnp.arange(n, dtype=jnp.int32),
        )
        all_logits.append(np.asarray(logits))
        start += n
    return np.concatenate(all_logits), pool


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        dataclasses.replace(TINY, tie_word_embeddings=True, qkv_bias=True),
        dataclasses.replace(TINY, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32)),
    ],
    ids=["plain", "tied_bias", "llama3_rope"],
)
def test_one_step_prefill_matches_dense(cfg):
    params = init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 23).astype(np.int32)
    got, _ = run_chunks(params, cfg, tokens, [23], page_ids=list(range(1, 7)))
    want = np.asarray(dense_forward(params, cfg, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_chunked_prefill_and_scattered_pages_match_one_step():
    params = init_params(TINY, jax.random.key(1))
    tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, 30).astype(np.int32)
    one_step, _ = run_chunks(params, TINY, tokens, [30], page_ids=list(range(1, 9)))
    scattered = list(np.random.default_rng(2).permutation(np.arange(1, NUM_PAGES))[:8])
    for chunks in ([7, 1, 13, 9], [1] * 30, [16, 14]):
        got, _ = run_chunks(params, TINY, tokens, chunks, page_ids=scattered)
        np.testing.assert_allclose(got, one_step, atol=2e-5, rtol=2e-5)


def test_two_requests_in_one_step_do_not_see_each_other():
    params = init_params(TINY, jax.random.key(2))
    rng = np.random.default_rng(3)
    a, b = (
        rng.integers(0, TINY.vocab_size, 9).astype(np.int32),
        rng.integers(0, TINY.vocab_size, 6).astype(np.int32),
    )
    pages_a, pages_b = [5, 2, 9], [7, 3]
    slots = [pages_a[i // PAGE_SIZE] * PAGE_SIZE + i % PAGE_SIZE for i in range(9)]
    slots += [pages_b[i // PAGE_SIZE] * PAGE_SIZE + i % PAGE_SIZE for i in range(6)]
    # One padding token and one padded request row: both must change nothing.
    tokens = np.concatenate([a, b, [0]]).astype(np.int32)
    positions = np.concatenate([np.arange(9), np.arange(6), [0]]).astype(np.int32)
    md = AttentionMetadata(
        jnp.asarray(np.array(slots + [0], np.int32)),
        jnp.array([0, 9, 15, 15], jnp.int32),
        jnp.array([9, 6, 0], jnp.int32),
        jnp.array([pages_a, pages_b + [0], [0, 0, 0]], jnp.int32),
    )
    pool = init_kv_pool(TINY, NUM_PAGES, PAGE_SIZE)
    logits, _ = forward(
        params, TINY, jnp.asarray(tokens), jnp.asarray(positions), pool, md, jnp.array([8, 14])
    )
    np.testing.assert_allclose(
        logits[0], dense_forward(params, TINY, jnp.asarray(a))[-1], atol=2e-5, rtol=2e-5
    )
    np.testing.assert_allclose(
        logits[1], dense_forward(params, TINY, jnp.asarray(b))[-1], atol=2e-5, rtol=2e-5
    )


def test_bad_config_and_pool_are_named():
    with pytest.raises(ValueError, match="num_q_heads"):
        dataclasses.replace(TINY, num_q_heads=5)
    with pytest.raises(ValueError, match="dtype"):
        dataclasses.replace(TINY, dtype="int8")
    with pytest.raises(ValueError, match="num_pages"):
        init_kv_pool(TINY, 1, PAGE_SIZE)


def test_a_parameter_of_the_wrong_shape_is_named():
    params = init_params(TINY, jax.random.key(0))
    d, width = params["layers_1"]["wk"].shape
    params["layers_1"]["wk"] = params["layers_1"]["wk"][:, :-1]
    tokens = np.zeros(3, np.int32)
    message = rf"parameter /layers_1/wk has shape \({d}, {width - 1}\), expected \({d}, {width}\)"
    with pytest.raises(ValueError, match=message):
        run_chunks(params, TINY, tokens, [3], page_ids=[1])


def test_random_parameters_are_the_same_on_a_one_device_mesh():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("tp",))
    plain, on_mesh = init_params(TINY, jax.random.key(4)), init_params(TINY, jax.random.key(4), mesh)
    jax.tree.map(np.testing.assert_array_equal, plain, on_mesh)


@pytest.mark.parametrize(
    "cfg, digest",
    [
        (TINY, "9acd70f531c23fec"),
        (dataclasses.replace(TINY, qkv_bias=True), "aca0b7b1152360b5"),
        (dataclasses.replace(TINY, tie_word_embeddings=True), "6525d77b897a0565"),
    ],
    ids=["lm_head", "qkv_bias", "tied"],
)
def test_random_parameters_keep_their_values(cfg, digest):
    # The digests are of what `init_params` gave when Flax's `init` still ran the forward pass on a token
    # (2026-11-29, JAX 0.11.2); it now only declares the parameters. Flax derives each key from the order of
    # declaration in its module, so a reordering would change the values, and every benchmark of random
    # weights with them.
    params = init_params(cfg, jax.random.key(5))
    sha = hashlib.sha256()
    for path, leaf in sorted(
        jax.tree_util.tree_leaves_with_path(params), key=lambda p: jax.tree_util.keystr(p[0])
    ):
        sha.update(jax.tree_util.keystr(path).encode())
        sha.update(np.asarray(leaf).tobytes())
    assert sha.hexdigest()[:16] == digest
