"""CPU attention: the C++ kernel (`pallas_kernels/cpu_attention.py`) against the blocked jnp attention, on
decode steps and a prefill chunk of SmolLM2's heads (9 query, 3 KV, head_dim 64), float32.

The pool is far larger than the caches and every call gets page tables of its own (a cycle of --tables random
ones), as in a model whose 30 layers each have their pages: the K/V come from memory, not from cache. Each
case is checked against the reference first. Prints milliseconds per call and GB/s of K/V read; writes JSON
and markdown to --output_dir.

  python scripts/bench_cpu_attention.py --output_dir benchmarks/results
"""

import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from device_timing import command_line

from jaxpage.config import user_cache_dir
from pallas_kernels import cpu_attention
from pallas_kernels.blocked_attention import ragged_paged_attention_blocked
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

flags.DEFINE_string("output_dir", "benchmarks/results", "Where the JSON and markdown results are written.")
flags.DEFINE_integer("num_pages", 16000, "Pages in the pool (3 KV heads x 16 slots x 64 floats, K and V).")
flags.DEFINE_integer("tables", 8, "Page tables cycled through, one per call.")
flags.DEFINE_integer("calls", 40, "Timed calls per case.")
flags.DEFINE_list(
    "cases", ["4x1x900", "8x1x900", "32x1x400", "1x512x700+15x1x300"], "ROWSxTOKENSxCONTEXT[+...]."
)
FLAGS = flags.FLAGS

HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE = 9, 3, 64, 16


def parse_case(text: str) -> list[tuple[int, int]]:
    """'8x1x900+2x16x300' -> [(1, 900)] * 8 + [(16, 300)] * 2: (new tokens, context) per request."""
    rows = []
    for part in text.split("+"):
        count, tokens, context = (int(x) for x in part.split("x"))
        if not (count > 0 and 0 < tokens <= context):
            raise ValueError(f"--cases: {part!r} needs rows > 0 and 0 < tokens <= context")
        rows += [(tokens, context)] * count
    return rows


def page_tables(rng, rows, num_pages, count):
    q_lens, kv_lens = zip(*rows, strict=True)
    need = [-(-kv // PAGE_SIZE) for kv in kv_lens]
    if sum(need) >= num_pages:
        raise ValueError(f"--num_pages {num_pages} is too small for a case of {sum(need)} pages")
    tables = []
    for _ in range(count):
        ids = iter(rng.permutation(np.arange(1, num_pages)))
        table = np.zeros((len(rows), max(need)), np.int32)
        for b, n in enumerate(need):
            table[b, :n] = [next(ids) for _ in range(n)]
        tables.append(jnp.asarray(table))
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32))
    return tables, jnp.asarray(np.array(kv_lens, np.int32)), cu


def time_calls(fn, args_list, calls):
    for args in args_list:
        jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for i in range(calls):
        out = fn(*args_list[i % len(args_list)])
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls * 1e3


def main(argv):
    del argv
    if not cpu_attention.load(user_cache_dir() / "kernels"):
        raise SystemExit("the CPU attention kernel did not build (see the log)")
    rng = np.random.default_rng(0)
    shape = (KV_HEADS, FLAGS.num_pages, PAGE_SIZE, HEAD_DIM)
    k_pages = jnp.asarray(rng.standard_normal(shape, np.float32))
    v_pages = jnp.asarray(rng.standard_normal(shape, np.float32))
    impls = {
        "cpu_kernel": jax.jit(cpu_attention.ragged_paged_attention_cpu),
        "blocked": jax.jit(ragged_paged_attention_blocked),
    }
    results = []
    for text in FLAGS.cases:
        rows = parse_case(text)
        tables, kv_lens, cu = page_tables(rng, rows, FLAGS.num_pages, FLAGS.tables)
        q = jnp.asarray(rng.standard_normal((int(cu[-1]), HEADS, HEAD_DIM), np.float32))
        args_list = [(q, k_pages, v_pages, kv_lens, table, cu) for table in tables]
        expected = np.asarray(jax.jit(ragged_paged_attention_reference)(*args_list[0]))
        kv_gb = sum(kv for _, kv in rows) * KV_HEADS * HEAD_DIM * 4 * 2 / 1e9
        row = {"case": text, "kv_gb": kv_gb}
        for name, fn in impls.items():
            error = float(np.max(np.abs(np.asarray(fn(*args_list[0])) - expected)))
            if not error < 1e-4:  # NaN included
                raise SystemExit(f"{name} differs from the reference by {error} on case {text!r}")
            ms = time_calls(fn, args_list, FLAGS.calls)
            row[name] = {"ms": ms, "gb_per_s": kv_gb / ms * 1e3, "max_abs_error": error}
        results.append(row)
        kernel, blocked = row["cpu_kernel"], row["blocked"]
        print(
            f"{text:>22}: cpu_kernel {kernel['ms']:.3f} ms ({kernel['gb_per_s']:.1f} GB/s),"
            f" blocked {blocked['ms']:.3f} ms: {blocked['ms'] / kernel['ms']:.2f}x",
            flush=True,
        )
    now = datetime.datetime.now(datetime.UTC)
    record = {
        "date": now.isoformat(timespec="seconds"),
        "command": command_line(),
        "host": platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "vectorized": cpu_attention.fast_for_prefill(PAGE_SIZE, HEAD_DIM),
        "num_pages": FLAGS.num_pages,
        "results": results,
    }
    out = Path(FLAGS.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cpu_attention_{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    lines = ["| case (rows x tokens x context) | cpu_kernel | blocked | ratio |", "|---|---|---|---|"]
    lines += [
        f"| {r['case']} | {r['cpu_kernel']['ms']:.3f} ms ({r['cpu_kernel']['gb_per_s']:.1f} GB/s) | "
        f"{r['blocked']['ms']:.3f} ms | {r['blocked']['ms'] / r['cpu_kernel']['ms']:.2f}x |"
        for r in results
    ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    app.run(main)
