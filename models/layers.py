"""Building blocks of the Llama family: RMSNorm, rotary embeddings, SwiGLU."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig, RopeScaling


def rms_norm(
    x: jax.Array,  # f[..., D]
    weight: jax.Array,  # f[D]
    eps: float,
) -> jax.Array:  # f[..., D] in weight's dtype
    # Normalise in float32 as HF does, then scale in the model dtype.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32.astype(weight.dtype) * weight


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:  # f32[head_dim // 2]
    """Inverse frequencies, with Llama-3 scaling when configured (same formula as HF's `llama3` rope type)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    if cfg.rope_scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, cfg.rope_scaling)
    return inv_freq.astype(np.float32)


def _llama3_scaled(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def apply_rope(
    x: jax.Array,  # f[T, H, head_dim]
    positions: jax.Array,  # i32[T]
    inv_freq: np.ndarray,  # f32[head_dim // 2]
) -> jax.Array:  # f[T, H, head_dim]
    """Rotate-half rotary embedding (HF convention: the two halves of head_dim form the complex pairs)."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # f32[T, head_dim // 2]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def swiglu(
    x: jax.Array,  # f[T, D]
    w_gate: jax.Array,  # f[D, F]
    w_up: jax.Array,  # f[D, F]
    w_down: jax.Array,  # f[F, D]
) -> jax.Array:  # f[T, D]
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down
