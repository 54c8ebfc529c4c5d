"""Load a GGUF file (llama.cpp's format) into a ModelConfig and the param tree of docs/architecture.md.

The header is parsed here rather than with `gguf.GGUFReader`: the reader builds a numpy view per string, which
takes ~5 s for SmolLM2's 98k-entry vocabulary and merge list; a plain `struct` walk takes well under a second.
Dequantization is `gguf.quants.dequantize`.
"""

import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from models import checkpoint
from models.config import ModelConfig, RopeScaling

_MAGIC = b"GGUF"
_SUPPORTED_TYPES = {
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
}
# llama.cpp runs Llama with interleaved (GPT-J) RoPE, so its converter permutes Q/K rows; Qwen2 runs NeoX RoPE
# (HF's rotate-half) and is stored unpermuted.
_ARCHITECTURES = {"llama": True, "qwen2": False}  # architecture -> Q/K rows permuted
# GGUFValueType -> struct format of its scalars; 8 is STRING, 9 is ARRAY.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFTensor(NamedTuple):
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: ggml's ne[] reversed, so a Linear weight is [out, in] like HF's
    data: np.ndarray  # u8[nbytes], a view into the mapped file


class _Cursor:
    """Reads little-endian GGUF values from a mapped file, advancing an offset."""

    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        raw = self.buf[self.pos : self.pos + n]
        if len(raw) != n:
            raise ValueError("string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        item_type, n = self.scalar("I"), self.scalar("Q")
        if item_type in _SCALAR_FORMATS and _SCALAR_FORMATS[item_type] != "?":
            dtype = np.dtype("<" + _SCALAR_FORMATS[item_type])
            array = np.frombuffer(self.buf, dtype, count=n, offset=self.pos).copy()
            self.pos += array.nbytes
            return array
        return [self.value(item_type) for _ in range(n)]


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """Parses a GGUF file's metadata and tensor directory; tensor data stay in the mapped file.

    Returns:
      (metadata key -> value, tensor name -> GGUFTensor). Arrays of numbers (token types) are numpy arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file (bad magic bytes)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        cur = _Cursor(buf)
        cur.pos = 4
        version = cur.scalar("I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version} (big-endian files are not supported)")
        n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
            infos.append((name, tuple(reversed(dims)), cur.scalar("I"), cur.scalar("Q")))
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: truncated or corrupt GGUF header ({e})") from e
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, shape, raw_type, offset in infos:
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"{path}: tensor {name} has unknown GGML type {raw_type}") from None
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        nbytes = int(np.prod(shape, dtype=np.int64)) // block_size * type_size
        start = data_start + offset
        if start + nbytes > len(buf):
            raise ValueError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
        tensors[name] = GGUFTensor(name, ggml_type, shape, np.frombuffer(buf, np.uint8, nbytes, start))
    return metadata, tensors


def _float32(value) -> float:
    # GGUF stores these as float32; the shortest repr recovers the number written (1e-05, not 9.99e-06).
    return float(str(np.float32(value)))


def _llama3_rope_factors(scaling: RopeScaling, inv_freq: np.ndarray) -> np.ndarray:
    """f32[hd/2]: what llama.cpp divides each RoPE frequency by for Llama-3 scaling (its `rope_freqs`)."""
    wavelen = 2 * np.pi / inv_freq
    orig = scaling.original_max_position_embeddings
    smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    band = 1 / ((1 - smooth) / scaling.factor + smooth)
    low, high = orig / scaling.low_freq_factor, orig / scaling.high_freq_factor
    return np.where(wavelen < high, 1.0, np.where(wavelen > low, scaling.factor, band))


def _rope_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int, path: Path) -> RopeScaling:
    """Recovers Llama-3 scaling from llama.cpp's per-frequency factors.

    The factors determine only the ratios original/low and original/high, so low_freq_factor is fixed to 1
    (Llama 3.1/3.2's value); any equivalent triple gives the same frequencies.
    """
    inv_freq = theta ** (-np.arange(0, head_dim, 2) / head_dim)
    factor = float(factors.max())
    band = (factors > 1 + 1e-4) & (factors < factor - 1e-4)
    if factors.shape != inv_freq.shape or factor <= 1 or band.sum() < 2:
        raise ValueError(f"{path}: tensor rope_freqs.weight is not Llama-3 rope scaling; unsupported")
    # In the band 1/f = (1 - s)/factor + s with s = (orig / wavelen - 1) / (high - 1): linear in 1 / wavelen.
    smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_freq[band] / (2 * np.pi), smooth, 1)
    high = 1 - 1 / intercept
    scaling = RopeScaling(_float32(factor), 1.0, _float32(high), int(round(-slope / intercept)))
    if not np.allclose(_llama3_rope_factors(scaling, inv_freq), factors, rtol=1e-3):
        raise ValueError(f"{path}: tensor rope_freqs.weight does not match Llama-3 rope scaling; unsupported")
    return scaling


def gguf_config(
    metadata: dict[str, Any], tensors: dict[str, GGUFTensor], path: Path, dtype: str
) -> ModelConfig:
    """Builds the ModelConfig from `<arch>.*` metadata keys and the tensor directory."""
    arch = metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {list(_ARCHITECTURES)})"
        )

    def get(key, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata key {arch}.{key} is missing")
        if isinstance(value, np.ndarray):  # per-layer head counts; the model needs them equal
            if len(set(value.tolist())) != 1:
                raise ValueError(
                    f"{path}: GGUF metadata {arch}.{key} varies per layer ({value}); unsupported"
                )
            value = value[0]
        return value

    hidden, num_q_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = metadata.get(f"{arch}.attention.key_length")
    if head_dim is None:
        if hidden % num_q_heads:
            raise ValueError(
                f"{path}: {arch}.embedding_length ({hidden}) is not divisible by "
                f"{arch}.attention.head_count ({num_q_heads})"
            )
        head_dim = hidden // num_q_heads
    head_dim = int(head_dim)
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(
            f"{path}: partial rotary ({arch}.rope.dimension_count != head_dim {head_dim}); unsupported"
        )
    scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type != "none":
        raise ValueError(f"{path}: GGUF {arch}.rope.scaling.type {scaling_type!r} is not supported")
    theta = _float32(get("rope.freq_base", 10000.0))
    rope_scaling = None
    if "rope_freqs.weight" in tensors:
        factors = dequantize_tensor(tensors["rope_freqs.weight"], path)
        rope_scaling = _rope_scaling_from_factors(factors, theta, head_dim, path)
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: tensor token_embd.weight is missing")
    try:
        return ModelConfig(
            vocab_size=int(tensors["token_embd.weight"].shape[0]),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_q_heads=num_q_heads,
            num_kv_heads=int(get("attention.head_count_kv", num_q_heads)),
            head_dim=head_dim,
            max_position_embeddings=int(get("context_length")),
            rms_norm_eps=_float32(get("attention.layer_norm_rms_epsilon")),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings="output.weight" not in tensors,
            qkv_bias="blk.0.attn_q.bias" in tensors,
            dtype=dtype,
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def dequantize_tensor(tensor: GGUFTensor, path: Path) -> np.ndarray:
    """Returns f32[tensor.shape]; raises ValueError naming the tensor for an unsupported GGML type."""
    if tensor.ggml_type not in _SUPPORTED_TYPES:
        supported = sorted(t.name for t in _SUPPORTED_TYPES)
        raise ValueError(
            f"{path}: tensor {tensor.name} has GGML type {tensor.ggml_type.name}; supported: {supported}"
        )
    raw = tensor.data.reshape(quant_shape_to_byte_shape(tensor.shape, tensor.ggml_type))
    out = dequantize(raw, tensor.ggml_type)
    assert out.shape == tensor.shape, (tensor.name, out.shape, tensor.shape)
    return out


def _unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row order: each head's rotate-half halves interleaved (x0, y0, x1, ...)."""
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_names(cfg: ModelConfig) -> dict[str, str]:
    """Param key (checkpoint.param_shapes) -> GGUF tensor name."""
    names = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
    per_layer = {
        "attn_norm": "attn_norm.weight",
        "wq": "attn_q.weight",
        "wk": "attn_k.weight",
        "wv": "attn_v.weight",
        "wo": "attn_output.weight",
        "bq": "attn_q.bias",
        "bk": "attn_k.bias",
        "bv": "attn_v.bias",
        "mlp_norm": "ffn_norm.weight",
        "w_gate": "ffn_gate.weight",
        "w_up": "ffn_up.weight",
        "w_down": "ffn_down.weight",
    }
    for i in range(cfg.num_layers):
        names.update({f"layers_{i}/{k}": f"blk.{i}.{v}" for k, v in per_layer.items()})
    return {key: names[key] for key in checkpoint.param_shapes(cfg)}


def load_gguf(path: str | Path, dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """Loads a GGUF checkpoint: dequantizes each tensor and converts it to the param tree (numpy, `dtype`)."""
    path = Path(path)
    metadata, tensors = read_gguf(path)
    cfg = gguf_config(metadata, tensors, path, dtype)
    names = _gguf_names(cfg)
    unused = set(tensors) - set(names.values()) - {"rope_freqs.weight"}
    if unused:
        raise ValueError(
            f"{path}: tensors not used by the {metadata['general.architecture']} model: {sorted(unused)}"
        )
    permuted = _ARCHITECTURES[metadata["general.architecture"]]
    shapes = checkpoint.param_shapes(cfg)
    for key, shape in shapes.items():  # check everything before the slow part
        tensor = tensors.get(names[key])
        if tensor is None:
            raise ValueError(f"{path}: tensor {names[key]} is missing")
        # Linear weights are stored [out, in] like HF's; the param tree wants [in, out].
        want = shape[::-1] if key.split("/")[-1] in checkpoint.LINEAR_WEIGHTS else shape
        if tensor.shape != want:
            raise ValueError(f"{path}: tensor {tensor.name} has shape {tensor.shape}, expected {want}")
        if tensor.ggml_type not in _SUPPORTED_TYPES:
            dequantize_tensor(tensor, path)  # raises the unsupported-type error

    def convert(key: str) -> np.ndarray:
        kind = key.split("/")[-1]
        w = dequantize_tensor(tensors[names[key]], path)
        if permuted and kind in ("wq", "bq"):
            w = _unpermute_rows(w, cfg.num_q_heads)
        elif permuted and kind in ("wk", "bk"):
            w = _unpermute_rows(w, cfg.num_kv_heads)
        return np.ascontiguousarray(w.T if kind in checkpoint.LINEAR_WEIGHTS else w, dtype=cfg.jnp_dtype)

    # numpy releases the GIL in the heavy parts of dequantization, so tensors convert in parallel.
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        flat = dict(zip(shapes, pool.map(convert, shapes), strict=True))
    return cfg, checkpoint.nest(flat)
