"""The linear layers of a decode/prefill step alone: separate Q/K/V and gate/up matmuls against fused ones.

A step's matmuls read every weight once; at few rows they should run at the HBM bandwidth, at many rows at the
tensor cores' rate. This chains the projections of all layers of a model shape (Q, K, V, O, gate, up, down;
no attention, no norms) on an activation of M rows, in two layouts: separate weights as in the checkpoint, and
Q/K/V and gate/up each concatenated into one matrix (one wider matmul each). Device time of chained calls;
prints per M and layout the milliseconds, the weights' bytes over that time, the HBM floor (bytes over the
measured read bandwidth) and the bf16 FLOP rate. XLA's flags (XLA_FLAGS, e.g.
--xla_gpu_enable_triton_gemm=false) are recorded with the result, so runs under different flags compare.

  python scripts/bench_projections.py --config llama3_8b_shape --rows 32,64,128,256,512,2048
"""

import dataclasses
import datetime
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags
from device_timing import best_seconds, chained_loop, command_line, hbm_bytes_per_s
from model_shapes import CONFIGS

flags.DEFINE_string("output_dir", "benchmarks/results", "Where the JSON result is written.")
flags.DEFINE_string("config", "llama3_8b_shape", "Model shape (scripts/model_shapes.py).")
flags.DEFINE_string("dtype", "bfloat16", "Weights and activations.")
flags.DEFINE_list("rows", ["32", "64", "128", "256", "512", "2048"], "Rows (tokens) of the activation.")
flags.DEFINE_integer("calls", 10, "Chained calls per timing.")
flags.DEFINE_float("hbm_gib", 4.0, "Size of the array summed to measure HBM read bandwidth.")
FLAGS = flags.FLAGS

LAYOUTS = ("separate", "fused")


def random_layers(cfg, key) -> list[dict]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_q_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = dict(wq=(d, q), wk=(d, kv), wv=(d, kv), wo=(q, d), w_gate=(d, f), w_up=(d, f), w_down=(f, d))
    layers = []
    for layer_key in jax.random.split(key, cfg.num_layers):
        keys = dict(zip(shapes, jax.random.split(layer_key, len(shapes)), strict=True))
        layers.append({n: 0.02 * jax.random.normal(keys[n], s, cfg.jnp_dtype) for n, s in shapes.items()})
    return layers


def fuse(layer: dict) -> dict:
    return {
        "wqkv": jnp.concatenate([layer["wq"], layer["wk"], layer["wv"]], axis=1),
        "wo": layer["wo"],
        "w_gate_up": jnp.concatenate([layer["w_gate"], layer["w_up"]], axis=1),
        "w_down": layer["w_down"],
    }


def projections(x, layers, q_width: int, intermediate: int):
    """All layers' matmuls; K and V feed a checksum so XLA keeps them. Each layer's input is normalised (as
    the model's norms do) so random weights keep the activations finite and the layouts comparable."""
    checksum = jnp.zeros((), jnp.float32)
    for w in layers:
        x = (x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + 1e-5)).astype(
            x.dtype
        )
        if "wqkv" in w:
            qkv = x @ w["wqkv"]
            q, kv = qkv[:, :q_width], qkv[:, q_width:]
            gate, up = jnp.split(x @ w["w_gate_up"], [intermediate], axis=1)
        else:
            q, kv = x @ w["wq"], jnp.concatenate([x @ w["wk"], x @ w["wv"]], axis=1)
            gate, up = x @ w["w_gate"], x @ w["w_up"]
        checksum += kv.astype(jnp.float32).sum()
        x = x + q @ w["wo"]
        x = x + (jax.nn.silu(gate) * up) @ w["w_down"]
    return x, checksum


def main(argv):
    del argv
    cfg = dataclasses.replace(CONFIGS[FLAGS.config], dtype=FLAGS.dtype)
    q_width = cfg.num_q_heads * cfg.head_dim
    hbm = hbm_bytes_per_s(FLAGS.hbm_gib)
    separate = random_layers(cfg, jax.random.key(0))
    weights_bytes = sum(a.nbytes for a in jax.tree.leaves(separate))
    device = jax.devices()[0].device_kind
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "device": device,
        "jax_version": jax.__version__,
        "config": FLAGS.config,
        "dtype": FLAGS.dtype,
        "weights_bytes": weights_bytes,
        "hbm_read_bytes_per_s": hbm,
        "rows": [],
    }
    fn = jax.jit(lambda x, layers: projections(x, layers, q_width, cfg.intermediate_size))
    print(f"{device}, JAX {jax.__version__}, XLA_FLAGS={record['xla_flags']!r}, HBM {hbm / 1e12:.2f} TB/s")
    print("| M | layout | ms | weights TB/s | of HBM floor | TFLOP/s | max abs diff vs separate |")
    print("|---|---|---|---|---|---|---|")
    for m in map(int, FLAGS.rows):
        x = 0.1 * jax.random.normal(jax.random.key(m), (m, cfg.hidden_size), cfg.jnp_dtype)
        results = {}
        for layout in LAYOUTS:
            layers = separate if layout == "separate" else [fuse(w) for w in separate]
            carry = jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, x, layers))
            loop = jax.jit(chained_loop(fn, FLAGS.calls), donate_argnums=0)
            loop = loop.lower(carry, (x, layers)).compile()
            seconds = best_seconds(loop, carry, (x, layers), FLAGS.calls, trials=3)
            results[layout] = fn(x, layers)[0]
            del layers
            diff = float(jnp.max(jnp.abs(results[layout] - results["separate"]).astype(jnp.float32)))
            row = {
                "rows": m,
                "layout": layout,
                "seconds": seconds,
                "weights_bytes_per_s": weights_bytes / seconds,
                "fraction_of_hbm_floor": weights_bytes / hbm / seconds,
                "flops_per_s": 2 * m * weights_bytes / jnp.dtype(cfg.dtype).itemsize / seconds,
                "max_abs_diff_vs_separate": diff,
            }
            record["rows"].append(row)
            print(
                f"| {m} | {layout} | {1e3 * seconds:.3f} | {row['weights_bytes_per_s'] / 1e12:.2f} "
                f"| {row['fraction_of_hbm_floor']:.2f} | {row['flops_per_s'] / 1e12:.0f} | {diff:.2e} |",
                flush=True,
            )
    out = Path(FLAGS.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out / f"projections_{device.lower().replace(' ', '-')}_{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    app.run(main)
