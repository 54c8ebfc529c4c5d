"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) as a functional Flax model over a paged KV pool.

`forward` is a pure function of (params, step inputs, KV pool) returning (logits, KV pool): every layer writes
its new K/V into its own pages and attends through `models.attention`. The parameter tree is the one
documented in docs/architecture.md, so loaders can build it without Flax.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from models import sharding
from models.attention import AttentionMetadata, check_backend, paged_attention
from models.config import ModelConfig
from models.layers import apply_rope, rms_norm, rope_inv_freq, swiglu

KVPool = tuple[tuple[jax.Array, jax.Array], ...]  # per layer: 2 x f[Hkv, num_pages, page_size, head_dim]

_init = nn.initializers.normal(0.02)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], dtype, init=_init) -> jax.Array:
    """`module.param` without its shape check, which traces the parameter's initializer again (a random
    normal of its shape) at every call: SmolLM2's warm-up from a full compilation cache took 16.2 s instead of
    18.4 s without it (30 buckets, the 2-core development machine). The shape is checked here directly."""
    if not module.has_variable("params", name):
        return module.param(name, init, shape, dtype)
    value = module.get_variable("params", name)
    if value.shape != tuple(shape):
        path = f"{module.scope.path_text}/{name}"
        raise ValueError(f"parameter {path} has shape {value.shape}, expected {tuple(shape)}")
    return value


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    attention: str
    decode_only: bool = False  # see models.attention.paged_attention
    heads_mesh: Mesh | None = None  # attention split over heads across this mesh (models.sharding)
    only_parameters: bool = False  # declare the parameters (init) and compute nothing: see `init_params`

    @nn.compact
    def __call__(self, x, positions, kv_pages, metadata: AttentionMetadata):
        cfg = self.cfg
        dt = cfg.jnp_dtype
        d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        q_width, kv_width = cfg.num_q_heads * hd, cfg.num_kv_heads * hd

        def param(name, shape, init=_init):
            return _param(self, name, shape, dt, init)

        attn_norm = param("attn_norm", (d,), nn.initializers.ones)
        wq, wk, wv = param("wq", (d, q_width)), param("wk", (d, kv_width)), param("wv", (d, kv_width))
        if cfg.qkv_bias:
            zeros = nn.initializers.zeros
            bq, bk, bv = (
                param("bq", (q_width,), zeros),
                param("bk", (kv_width,), zeros),
                param("bv", (kv_width,), zeros),
            )
        wo = param("wo", (q_width, d))
        mlp_norm = param("mlp_norm", (d,), nn.initializers.ones)
        w_gate, w_up, w_down = param("w_gate", (d, f)), param("w_up", (d, f)), param("w_down", (f, d))
        if self.only_parameters:
            return x, kv_pages

        h = rms_norm(x, attn_norm, cfg.rms_norm_eps)
        q, k, v = h @ wq, h @ wk, h @ wv
        if cfg.qkv_bias:
            q, k, v = q + bq, k + bk, v + bv
        num_tokens = x.shape[0]
        inv_freq = rope_inv_freq(cfg)
        q = apply_rope(q.reshape(num_tokens, cfg.num_q_heads, hd), positions, inv_freq)
        k = apply_rope(k.reshape(num_tokens, cfg.num_kv_heads, hd), positions, inv_freq)
        v = v.reshape(num_tokens, cfg.num_kv_heads, hd)
        out, kv_pages = paged_attention(
            q, k, v, kv_pages, metadata, backend=self.attention, decode_only=self.decode_only,
            mesh=self.heads_mesh,
        )  # fmt: skip
        x = x + out.reshape(num_tokens, q_width) @ wo
        x = x + swiglu(rms_norm(x, mlp_norm, cfg.rms_norm_eps), w_gate, w_up, w_down)
        return x, kv_pages


class Llama(nn.Module):
    cfg: ModelConfig
    attention: str = "reference"
    decode_only: bool = False  # see models.attention.paged_attention
    mesh: Mesh | None = None  # tensor parallelism: the parameters and the pool are split over it
    only_parameters: bool = False  # declare the parameters (init) and compute nothing: see `init_params`

    @nn.compact
    def __call__(self, token_ids, positions, kv_pool: KVPool, metadata: AttentionMetadata, logits_indices):
        cfg = self.cfg
        dt = cfg.jnp_dtype
        embed = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), dt)
        x = None if self.only_parameters else jnp.take(embed, token_ids, axis=0)
        new_pool = []
        shards_heads = self.mesh is not None and sharding.shards_heads(cfg, self.mesh.size)
        heads_mesh = self.mesh if shards_heads else None
        # A Python loop, not a scan: each layer's pages stay separate donated buffers updated in place.
        for i in range(cfg.num_layers):
            layer = DecoderLayer(
                cfg, self.attention, self.decode_only, heads_mesh, self.only_parameters, name=f"layers_{i}"
            )
            x, kv_pages = layer(x, positions, kv_pool[i], metadata)
            new_pool.append(kv_pages)
        final_norm = _param(self, "final_norm", (cfg.hidden_size,), dt, nn.initializers.ones)
        head = (
            embed.T
            if cfg.tie_word_embeddings
            else _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), dt)
        )
        if self.only_parameters:
            return None, kv_pool
        # Only the rows that will be sampled go through the final norm and the vocabulary projection.
        x = rms_norm(x[logits_indices], final_norm, cfg.rms_norm_eps)
        logits = jnp.dot(x, head, preferred_element_type=jnp.float32)
        return logits, tuple(new_pool)


def init_kv_pool(
    cfg: ModelConfig, num_pages: int, page_size: int, dtype=None, mesh: Mesh | None = None
) -> KVPool:
    """Zeroed pages for every layer; page 0 is the null page and is never handed to a request. With `mesh`,
    each page is split over KV heads across it where attention is (models.sharding), else whole on every
    device; the zeros are made in place, shard by shard."""
    if num_pages < 2:
        raise ValueError(f"num_pages must be at least 2 (page 0 is reserved), got {num_pages}")
    if page_size < 1:
        raise ValueError(f"page_size must be positive, got {page_size}")
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    dtype = dtype or cfg.jnp_dtype
    if mesh is None:
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))
    where = NamedSharding(mesh, sharding.kv_pool_spec(cfg, mesh.size))
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=where)
    return tuple((zeros(), zeros()) for _ in range(cfg.num_layers))


def init_params(cfg: ModelConfig, key: jax.Array, mesh: Mesh | None = None) -> dict:
    """Random parameters (normal, std 0.02; norms at 1) in the documented tree, for tests and benchmarks.
    With a `mesh` of several devices, each is made on its shards (models.sharding), never whole on one device;
    with one, on its device."""
    # Only the parameters are declared: Flax's `init` would otherwise run the forward pass on a dummy token,
    # on one device eagerly, op by op (~60 small programs, 7 s of a cold start of the 8B shapes on an H200).
    no_pool = ((None, None),) * cfg.num_layers

    def init(k):
        return Llama(cfg, only_parameters=True).init(k, None, None, no_pool, None, None)["params"]

    if mesh is None or mesh.size == 1:
        # Not jitted: each parameter's random draw is a small program compiled once per shape, where the one
        # program of the whole tree took 107 s to compile for Llama-3-8B's shapes on an H200. The values are
        # the same: Flax derives each parameter's key from its module's path and its place among the module's
        # declarations, whether traced or eager.
        with jax.default_device(None if mesh is None else mesh.devices.flat[0]):
            return init(key)
    shapes = jax.eval_shape(init, key)
    return jax.jit(init, out_shardings=sharding.param_shardings(cfg, mesh, shapes))(key)


def forward(
    params: dict,
    cfg: ModelConfig,
    token_ids: jax.Array,  # i32[T]
    positions: jax.Array,  # i32[T]
    kv_pool: KVPool,
    metadata: AttentionMetadata,
    logits_indices: jax.Array,  # i32[N]
    *,
    attention: str = "reference",
    decode_only: bool = False,  # every row has at most one token: see models.attention.paged_attention
    mesh: Mesh | None = None,  # tensor parallelism: params and pool placed by models.sharding over it
) -> tuple[jax.Array, KVPool]:  # (f32[N, vocab], updated pool)
    check_backend(attention)
    return Llama(cfg, attention, decode_only, mesh).apply(
        {"params": params}, token_ids, positions, kv_pool, metadata, logits_indices
    )
