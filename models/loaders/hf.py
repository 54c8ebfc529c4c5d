"""Load an HF checkpoint directory (config.json + model.safetensors or a sharded index) as the param tree."""

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from models import checkpoint
from models.config import ModelConfig, RopeScaling

# architecture -> qkv_bias; all three share Llama's tensor names.
_ARCHITECTURES = {"LlamaForCausalLM": False, "MistralForCausalLM": False, "Qwen2ForCausalLM": True}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def _rope(raw: dict, path: Path) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from transformers 4's `rope_theta` + `rope_scaling` or 5's `rope_parameters`."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(
            f"{path}: rope_scaling.rope_type {rope_type!r} is not supported (supported: default, llama3)"
        )
    try:
        fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, RopeScaling(**{k: params[k] for k in fields})
    except KeyError as e:
        raise ValueError(f"{path}: rope_scaling field {e.args[0]} is missing") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def hf_config(raw: dict, path: Path, dtype: str) -> ModelConfig:
    """Builds the ModelConfig from a parsed config.json (`path` names it in errors)."""
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in _ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"{path}: architectures {archs} not supported (supported: {list(_ARCHITECTURES)})")

    def need(field):
        if raw.get(field) is None:
            raise ValueError(f"{path}: field {field} is missing")
        return raw[field]

    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    for field in ("attention_bias", "mlp_bias"):  # Llama's flags also put biases on o_proj / the MLP
        if raw.get(field) and arch == "LlamaForCausalLM":
            raise ValueError(f"{path}: {field}=true is not supported")
    hidden, num_q_heads = need("hidden_size"), need("num_attention_heads")
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if (
            not (isinstance(hidden, int) and isinstance(num_q_heads, int) and num_q_heads > 0)
            or hidden % num_q_heads
        ):
            raise ValueError(
                f"{path}: hidden_size ({hidden}) is not divisible by num_attention_heads ({num_q_heads}) "
                "and there is no head_dim"
            )
        head_dim = hidden // num_q_heads
    max_pos = need("max_position_embeddings")
    window = raw.get("sliding_window")
    if window and (arch == "MistralForCausalLM" or raw.get("use_sliding_window")):
        # The runtime attends to the whole context; capping it at the window keeps that exact.
        max_pos = min(max_pos, window)
    theta, rope_scaling = _rope(raw, path)
    try:
        return ModelConfig(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_q_heads=num_q_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_q_heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=_ARCHITECTURES[arch],
            dtype=dtype,
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _hf_names(cfg: ModelConfig) -> dict[str, str]:
    """Param key (checkpoint.param_shapes) -> safetensors tensor name."""
    names = {
        "embed": "model.embed_tokens.weight",
        "final_norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
    }
    per_layer = {
        "attn_norm": "input_layernorm.weight",
        "wq": "self_attn.q_proj.weight",
        "wk": "self_attn.k_proj.weight",
        "wv": "self_attn.v_proj.weight",
        "wo": "self_attn.o_proj.weight",
        "bq": "self_attn.q_proj.bias",
        "bk": "self_attn.k_proj.bias",
        "bv": "self_attn.v_proj.bias",
        "mlp_norm": "post_attention_layernorm.weight",
        "w_gate": "mlp.gate_proj.weight",
        "w_up": "mlp.up_proj.weight",
        "w_down": "mlp.down_proj.weight",
    }
    for i in range(cfg.num_layers):
        names.update({f"layers_{i}/{k}": f"model.layers.{i}.{v}" for k, v in per_layer.items()})
    return {key: names[key] for key in checkpoint.param_shapes(cfg)}


def _shard_of_each_tensor(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or the shards a sharded index names)."""
    index = directory / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from e
        shards = {name: directory / shard for name, shard in weight_map.items()}
        for shard in sorted(set(shards.values())):
            if not shard.is_file():
                raise ValueError(f"{index}: shard {shard.name} does not exist")
        return shards
    single = directory / _SINGLE
    if not single.is_file():
        raise ValueError(f"{directory}: neither {_SINGLE} nor {_INDEX} found")
    try:
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{single}: unreadable safetensors file ({e})") from e


def read_hf_config(directory: str | Path, dtype: str = "float32") -> ModelConfig:
    """The ModelConfig of an HF checkpoint directory, from its config.json alone."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"HF checkpoint {directory}: config.json does not exist")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    return hf_config(raw, config_path, dtype)


def load_hf(directory: str | Path, dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """Loads an HF checkpoint directory into (config, param tree of numpy arrays in `dtype`)."""
    directory = Path(directory)
    cfg = read_hf_config(directory, dtype)
    shard_of = _shard_of_each_tensor(directory)
    names = _hf_names(cfg)
    wanted_by_file: dict[Path, list[str]] = {}
    for key, name in names.items():
        if name not in shard_of:
            hint = " and tie_word_embeddings is false" if key == "lm_head" else ""
            raise ValueError(f"{directory}: tensor {name} is missing{hint}")
        wanted_by_file.setdefault(shard_of[name], []).append(key)
    shapes = checkpoint.param_shapes(cfg)
    flat = {}
    for file, keys in wanted_by_file.items():
        try:
            with safe_open(file, framework="numpy") as f:
                present = set(f.keys())
                for key in keys:
                    name = names[key]
                    if name not in present:
                        raise ValueError(f"{file}: tensor {name} is missing (the index says it is here)")
                    transposed = key.split("/")[-1] in checkpoint.LINEAR_WEIGHTS
                    want = shapes[key][::-1] if transposed else shapes[key]
                    got = tuple(f.get_slice(name).get_shape())
                    if got != want:
                        raise ValueError(f"{file}: tensor {name} has shape {got}, expected {want}")
                    w = f.get_tensor(name)
                    flat[key] = np.ascontiguousarray(w.T if transposed else w, dtype=cfg.jnp_dtype)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: unreadable safetensors file ({e})") from e
    return cfg, checkpoint.nest({key: flat[key] for key in names})
