"""Whole decode steps of a random-weight model on one GPU: the ragged kernel against the decode kernel.

A decode step (one new token for each of B requests holding `context` tokens) runs `models.llama.forward`
with the Pallas backend twice: as any step (the ragged kernel) and with `decode_only` (the decode kernel),
which is what the runner does for steps of one token per row. Both, and the reference attention, compute the
logits of the same step on the same pool (random K/V, pages in random order); the script compares them and
times each step the way the engine calls it: the host clock around one call on the donated pool until its
logits are ready, median of --calls. The HBM floor of a step is its bytes (every weight once, every request's
K/V once) over the read bandwidth of chained `jnp.sum` calls on a --hbm_gib array. Prints a table; writes
JSON and markdown to --output_dir (device, date, JAX version, command).

  python scripts/bench_decode_step.py --config smollm2_shape --batch_sizes 32,64 --contexts 2048,8192
  python scripts/bench_decode_step.py --attention pallas_interpret --config tiny --batch_sizes 2 \\
      --contexts 64 --calls 2 --hbm_gib 0.01 --output_dir /tmp/x   # CPU, interpreted: plumbing only
"""

import dataclasses
import datetime
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from device_timing import command_line, hbm_bytes_per_s
from model_shapes import CONFIGS

from models.attention import AttentionMetadata
from models.llama import forward, init_params

flags.DEFINE_string("output_dir", "benchmarks/results", "Where the JSON and markdown results are written.")
flags.DEFINE_string("attention", "pallas", "The Pallas backend: pallas, or pallas_interpret on CPU.")
flags.DEFINE_string("config", "smollm2_shape", "Model shape (scripts/model_shapes.py).")
flags.DEFINE_string("dtype", "bfloat16", "Model and KV dtype.")
flags.DEFINE_list("batch_sizes", ["8", "32", "64", "128"], "Requests per step.")
flags.DEFINE_list("contexts", ["512", "2048", "8192"], "Tokens each request holds, the new one included.")
flags.DEFINE_integer("page_size", 16, "Tokens per page.")
flags.DEFINE_integer("calls", 50, "Timed calls per variant; the median is reported.")
flags.DEFINE_float("hbm_gib", 4.0, "Size of the array summed to measure HBM read bandwidth.")
FLAGS = flags.FLAGS

VARIANTS = ("ragged", "decode", "reference")
# |logits - reference| / |reference| (whole step, L2) above which a step fails: bf16 rounding through 30
# layers stays near 1e-2; a wrong row or page is of order 1.
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


def decode_step(cfg, batch: int, context: int, page_size: int, seed: int):
    """(kv_pool, step arrays) of a decode step: B requests of `context` tokens, random K/V, random pages."""
    pages_per_row = -(-context // page_size)
    num_pages = 1 + batch * pages_per_row
    order = np.random.default_rng(seed).permutation(np.arange(1, num_pages))
    page_table = order.reshape(batch, pages_per_row).astype(np.int32)
    position = context - 1
    slots = page_table[:, position // page_size] * page_size + position % page_size
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    keys = jax.random.split(jax.random.key(seed), 2 * cfg.num_layers)
    pool = tuple(
        (
            jax.random.normal(keys[2 * i], shape, cfg.jnp_dtype),
            jax.random.normal(keys[2 * i + 1], shape, cfg.jnp_dtype),
        )
        for i in range(cfg.num_layers)
    )
    rng = np.random.default_rng(seed + 1)
    step = dict(
        token_ids=rng.integers(0, cfg.vocab_size, batch).astype(np.int32),
        positions=np.full(batch, position, np.int32),
        metadata=AttentionMetadata(
            slots.astype(np.int32),
            np.arange(batch + 1, dtype=np.int32),
            np.full(batch, context, np.int32),
            page_table,
        ),
        logits_indices=np.arange(batch, dtype=np.int32),
    )
    return pool, jax.device_put(step)


def step_bytes(cfg, params, batch: int, context: int) -> int:
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    kv = (
        2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    )
    return weights + kv


def time_variant(fn, params, pool, step, calls: int):
    """(median seconds per call, logits of the last call, the pool): calls on the donated pool."""
    logits, pool = fn(params, pool, step)  # compile and first-run allocations stay out
    logits.block_until_ready()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        logits, pool = fn(params, pool, step)
        logits.block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), np.asarray(logits, np.float32), pool


def run_row(cfg, params, steps: dict, batch: int, context: int, hbm: float) -> dict:
    pool, step = decode_step(cfg, batch, context, FLAGS.page_size, seed=batch * 100003 + context)
    seconds, logits = {}, {}
    for name in VARIANTS:
        seconds[name], logits[name], pool = time_variant(steps[name], params, pool, step, FLAGS.calls)
    del pool
    reference = logits["reference"]
    error = {
        name: float(np.linalg.norm(logits[name] - reference) / np.linalg.norm(reference))
        for name in ("ragged", "decode")
    }
    same = {
        name: int(np.sum(logits[name].argmax(-1) == reference.argmax(-1))) for name in ("ragged", "decode")
    }
    floor = step_bytes(cfg, params, batch, context) / hbm
    return {
        "batch": batch,
        "context": context,
        "seconds": seconds,
        "hbm_floor_s": floor,
        "decode_vs_ragged": seconds["ragged"] / seconds["decode"],
        "decode_fraction_of_floor": floor / seconds["decode"],
        "ragged_fraction_of_floor": floor / seconds["ragged"],
        "rel_error_vs_reference": error,
        "argmax_equal_reference": same,
        "ok": all(e <= TOLERANCE[cfg.dtype] for e in error.values()),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| B | context | ragged ms | decode ms | decode / ragged speedup | HBM floor ms | decode of floor "
        "| ragged of floor | rel. error ragged / decode | argmax = reference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, e, a = r["seconds"], r["rel_error_vs_reference"], r["argmax_equal_reference"]
        lines.append(
            f"| {r['batch']} | {r['context']} | {1e3 * s['ragged']:.3f} | {1e3 * s['decode']:.3f} "
            f"| {r['decode_vs_ragged']:.2f}x | {1e3 * r['hbm_floor_s']:.3f} "
            f"| {r['decode_fraction_of_floor']:.2f} "
            f"| {r['ragged_fraction_of_floor']:.2f} | {e['ragged']:.1e} / {e['decode']:.1e} "
            f"| {a['ragged']}, {a['decode']} of {r['batch']} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.config not in CONFIGS:
        raise ValueError(f"config must be among {sorted(CONFIGS)}, got {FLAGS.config!r}")
    if FLAGS.attention not in ("pallas", "pallas_interpret"):
        raise ValueError(f"attention must be pallas or pallas_interpret, got {FLAGS.attention!r}")
    cfg = dataclasses.replace(CONFIGS[FLAGS.config], dtype=FLAGS.dtype)
    params = init_params(cfg, jax.random.key(0))
    variant_args = {
        "ragged": dict(attention=FLAGS.attention),
        "decode": dict(attention=FLAGS.attention, decode_only=True),
        "reference": dict(attention="reference"),
    }
    steps = {}
    for name, kwargs in variant_args.items():
        fn = functools.partial(forward, cfg=cfg, **kwargs)
        steps[name] = jax.jit(
            lambda params, pool, step, fn=fn: fn(
                params,
                token_ids=step["token_ids"],
                positions=step["positions"],
                kv_pool=pool,
                metadata=step["metadata"],
                logits_indices=step["logits_indices"],
            ),
            donate_argnums=1,
        )
    hbm = hbm_bytes_per_s(FLAGS.hbm_gib)
    device = jax.devices()[0].device_kind
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "device": device,
        "jax_version": jax.__version__,
        "config": FLAGS.config,
        "model": dataclasses.asdict(cfg),
        "dtype": FLAGS.dtype,
        "page_size": FLAGS.page_size,
        "calls": FLAGS.calls,
        "hbm_read_bytes_per_s": hbm,
        "rows": [],
    }
    out = Path(FLAGS.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"decode_step_{device.lower().replace(' ', '-')}_{datetime.datetime.now():%Y%m%d-%H%M%S}"
    header = (
        f"# Decode steps, {FLAGS.config} ({FLAGS.dtype}, page {FLAGS.page_size}), {device}, "
        f"JAX {jax.__version__}\n\n"
        f"`{record['command']}`; HBM read {hbm / 1e12:.2f} TB/s; median of {FLAGS.calls} calls.\n\n"
    )
    rows = record["rows"]
    for batch in map(int, FLAGS.batch_sizes):
        for context in map(int, FLAGS.contexts):
            rows.append(run_row(cfg, params, steps, batch, context, hbm))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            # Rewritten after every row, so a run cut short keeps what it measured.
            stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
            stem.with_suffix(".md").write_text(header + table(rows) + "\n")
    print(table(rows))
    print(f"written to {stem}.json")
    if not all(r["ok"] for r in rows):
        print("FAILED: a variant's logits are off the reference", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
