"""HF checkpoint directories (config.json + safetensors) written here with random weights."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from models import checkpoint
from models.config import RopeScaling
from models.loaders import load_hf, load_model

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def _weights(config, rng, dtype=np.float32):
    """HF-named random weights ([out, in] for Linear) matching `config`."""
    h, inter, hd = config["hidden_size"], config["intermediate_size"], 16
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if config["architectures"] == ["Qwen2ForCausalLM"]:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,)}
            shapes |= {p + "self_attn.v_proj.bias": (kv,)}
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


def _write(directory, config, weights, shards=1):
    """Writes config.json and one model.safetensors, or `shards` files with an index."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(weights, str(directory / "model.safetensors"))
        return directory
    names = sorted(weights)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s::shards]}
        save_file(part, str(directory / file))
        weight_map |= {n: file for n in part}
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def _check_equal(params, weights, dtype=np.float32):
    """Every written tensor is in the tree (transposed for Linear), cast to `dtype`, and nothing else is."""
    flat = checkpoint.flatten(params)
    rename = {
        "model.embed_tokens.weight": "embed",
        "model.norm.weight": "final_norm",
        "lm_head.weight": "lm_head",
    }
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
    per_layer |= {f"self_attn.{x}_proj": f"w{x}" for x in "qkvo"} | {
        f"mlp.{x}_proj": f"w_{x}" for x in ("gate", "up", "down")
    }
    seen = set()
    for name, want in weights.items():
        if name in rename:
            key = rename[name]
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            leaf = per_layer[module] if kind == "weight" else "b" + module[-6]  # q_proj.bias -> bq
            key = f"layers_{i}/{leaf}"
        got = flat[key].T if key.split("/")[-1] in checkpoint.LINEAR_WEIGHTS else flat[key]
        assert got.dtype == dtype, key
        np.testing.assert_array_equal(got, want.astype(dtype), err_msg=key)
        seen.add(key)
    assert seen == set(flat)


def test_single_file_llama_loads_transposed(tmp_path):
    weights = _weights(CONFIG, np.random.default_rng(0))
    cfg, params = load_hf(_write(tmp_path / "m", CONFIG, weights))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (64, 64, 96, 2)
    assert (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.max_position_embeddings) == (4, 2, 16, 256)
    assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.tie_word_embeddings, cfg.qkv_bias) == (
        1e-6,
        1e4,
        False,
        False,
    )
    _check_equal(params, weights)


def test_sharded_bf16_checkpoint_loads_in_each_dtype(tmp_path):
    config = dict(CONFIG, tie_word_embeddings=True)
    weights = _weights(config, np.random.default_rng(1), dtype=ml_dtypes.bfloat16)
    directory = _write(tmp_path / "m", config, weights, shards=3)
    for dtype in ("float32", "bfloat16"):
        cfg, params = load_model(directory, dtype=dtype)
        assert cfg.dtype == dtype and cfg.tie_word_embeddings and "lm_head" not in params
        _check_equal(params, weights, dtype=np.dtype(cfg.jnp_dtype))


def test_qwen2_has_qkv_bias_and_mistral_window_caps_context(tmp_path):
    config = dict(CONFIG, architectures=["Qwen2ForCausalLM"])
    weights = _weights(config, np.random.default_rng(2))
    cfg, params = load_hf(_write(tmp_path / "q", config, weights))
    assert cfg.qkv_bias
    _check_equal(params, weights)
    config = dict(CONFIG, architectures=["MistralForCausalLM"], sliding_window=128, head_dim=16)
    cfg, _ = load_hf(_write(tmp_path / "m", config, _weights(config, np.random.default_rng(3))))
    assert cfg.max_position_embeddings == 128 and cfg.head_dim == 16


@pytest.mark.parametrize("style", ["rope_scaling", "rope_parameters"])
def test_llama3_rope_scaling_in_both_transformers_styles(tmp_path, style):
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling |= {"original_max_position_embeddings": 8192, "rope_type": "llama3"}
    config = dict(CONFIG)
    del config["rope_theta"]
    if style == "rope_parameters":  # transformers 5 keeps theta inside
        config["rope_parameters"] = scaling | {"rope_theta": 500000.0}
    else:
        config |= {"rope_scaling": scaling, "rope_theta": 500000.0}
    cfg, _ = load_hf(_write(tmp_path / "m", config, _weights(config, np.random.default_rng(4))))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)


def _error(directory):
    with pytest.raises(ValueError) as e:
        load_hf(directory)
    return str(e.value)


def test_config_errors_name_the_field_and_file(tmp_path):
    weights = _weights(CONFIG, np.random.default_rng(5))
    cases = {
        "yarn": (
            dict(CONFIG, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
            "rope_scaling.rope_type 'yarn'",
        ),
        "heads": (dict(CONFIG, num_attention_heads=5), "num_attention_heads (5)"),
        "kv": (dict(CONFIG, num_key_value_heads=3), "num_kv_heads (3)"),
        "arch": (dict(CONFIG, architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel"),
        "missing": ({k: v for k, v in CONFIG.items() if k != "vocab_size"}, "field vocab_size is missing"),
        "bias": (dict(CONFIG, attention_bias=True), "attention_bias"),
        "act": (dict(CONFIG, hidden_act="gelu"), "hidden_act 'gelu'"),
    }
    for name, (config, expected) in cases.items():
        msg = _error(_write(tmp_path / name, config, weights))
        assert expected in msg and "config.json" in msg, (name, msg)


def test_checkpoint_errors_name_the_file_or_tensor(tmp_path):
    weights = _weights(CONFIG, np.random.default_rng(6))
    assert "does not exist" in _error(tmp_path / "absent")
    with pytest.raises(ValueError, match="neither a .gguf file"):
        load_model(_write(tmp_path / "x", CONFIG, weights) / "config.json")

    sharded = _write(tmp_path / "sharded", CONFIG, weights, shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    assert "shard model-00002-of-00002.safetensors does not exist" in _error(sharded)

    wrong = dict(weights, **{"model.layers.1.mlp.up_proj.weight": np.zeros((96, 32), np.float32)})
    msg = _error(_write(tmp_path / "wrong", CONFIG, wrong))
    assert "model.layers.1.mlp.up_proj.weight" in msg and "(96, 32)" in msg

    missing = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    assert "lm_head.weight is missing" in _error(_write(tmp_path / "nohead", CONFIG, missing))

    corrupt = _write(tmp_path / "corrupt", CONFIG, weights)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert "model.safetensors" in _error(corrupt)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(CONFIG))
    assert "neither model.safetensors nor model.safetensors.index.json" in _error(empty)
    (empty / "config.json").write_text("{")
    assert "config.json: not valid JSON" in _error(empty)
