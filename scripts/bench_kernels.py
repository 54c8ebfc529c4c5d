"""Times the Pallas paged-attention kernels against their peers on a GPU; prints a table and writes JSON and
markdown to --output_dir (device, date, JAX version and command included).

Sections (--sections): hbm (jnp.sum over a --hbm_gib array: the read bandwidth to compare with), decode (ours
with the tuned blocks and with num_stages=1 -- what the load/compute overlap buys --, ours through the ragged
kernel, JAX's own Pallas paged_attention at its best k_splits x pages_per_compute_block, and cuDNN dense
attention on the same tokens laid out contiguously), prefill (one chunk with and without a cached prefix, vs
cuDNN dense causal attention over the chunk), mixed (a step of decodes plus one prefill chunk: the ragged
kernel alone vs the decodes sent to the decode kernel), kv_write (the in-place page write), sweep_decode and
sweep_prefill (block sizes around the tuning table's row, on a few shapes).

  python scripts/bench_kernels.py --sections hbm,decode --batch_sizes 1,8,32
  python scripts/bench_kernels.py --smoke --output_dir /tmp/x    # CPU, interpret mode: plumbing only

Every time is device time per call: n calls chained inside one jitted loop, best of 3, so no host dispatch.
The results files are rewritten after every row, so a run cut short keeps what it measured.
"""

import dataclasses
import datetime
import functools
import json
import math
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from device_timing import best_seconds, chained_loop

from pallas_kernels import tuning
from pallas_kernels.kv_write import write_kv
from pallas_kernels.mixed_attention import mixed_paged_attention
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention

flags.DEFINE_string("output_dir", "benchmarks/results", "Where the JSON and markdown results are written.")
flags.DEFINE_bool("smoke", False, "Tiny shapes in interpret mode on CPU: checks the plumbing, times nothing.")
flags.DEFINE_list("sections", ["hbm", "decode", "prefill", "mixed", "kv_write"], "Which parts to run.")
flags.DEFINE_list("batch_sizes", ["1", "8", "32", "64", "128", "256"], "Decode batch sizes.")
flags.DEFINE_list("contexts", ["512", "2048", "8192", "32768"], "Decode context lengths.")
flags.DEFINE_list("page_sizes", ["16", "32", "64"], "Decode page sizes (prefill and kv_write use the first).")
flags.DEFINE_integer("peer_page_size", 16, "The decode page size at which the peers run too.")
flags.DEFINE_list("chunk_lens", ["512", "1024", "2048", "4096", "8192"], "Prefill chunk lengths.")
flags.DEFINE_integer("prefix_len", 4096, "Cached prefix before the chunk in the 'with prefix' prefill rows.")
flags.DEFINE_list("jax_k_splits", ["1", "4", "16"], "k_splits values tried for JAX's paged_attention.")
flags.DEFINE_list("jax_pages_per_block", ["4", "8", "16"], "pages_per_compute_block values tried for it.")
flags.DEFINE_float("hbm_gib", 4.0, "Size of the array summed to measure HBM read bandwidth.")
flags.DEFINE_float("target_seconds", 0.05, "Rough device time per timing trial.")
flags.DEFINE_list("sweep_decode_shapes", ["32x8192", "128x2048", "1x32768"], "Decode sweep: BATCHxCONTEXT.")
flags.DEFINE_list("sweep_prefill_shapes", ["4096+0", "2048+4096"], "Prefill sweep: CHUNK+PREFIX.")
flags.DEFINE_list(
    "mixed_shapes", ["255x512+256", "255x1024+1792", "31x512+2016"], "Mixed steps: DECODESxCONTEXT+CHUNK."
)
flags.DEFINE_multi_string("decode_variant", [], "Decode sweep blocks, 'field=value,...' over the tuned row.")
flags.DEFINE_multi_string("ragged_variant", [], "Prefill sweep blocks, 'field=value,...' over the tuned row.")
flags.DEFINE_integer("compile_threads", 8, "Variants compiled at once.")
FLAGS = flags.FLAGS

HEADS = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)  # Llama-3-8B's attention
SMOKE_HEADS = dict(num_q_heads=4, num_kv_heads=2, head_dim=64)


@dataclasses.dataclass(frozen=True)
class Options:
    sections: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    contexts: tuple[int, ...]
    page_sizes: tuple[int, ...]
    peer_page_size: int
    chunk_lens: tuple[int, ...]
    prefixes: tuple[int, ...]  # cached prefix before each prefill chunk
    jax_configs: tuple[tuple[int, int], ...]  # (k_splits, pages_per_compute_block)
    hbm_gib: float
    target_seconds: float
    sweep_decode_shapes: tuple[tuple[int, int], ...] = ()  # (batch, context)
    sweep_prefill_shapes: tuple[tuple[int, int], ...] = ()  # (chunk, prefix)
    mixed_shapes: tuple[tuple[int, int, int], ...] = ()  # (decodes, context, chunk)
    decode_variants: tuple[str, ...] = ()  # "field=value,..." overrides of the tuned blocks
    ragged_variants: tuple[str, ...] = ()
    compile_threads: int = 8
    smoke: bool = False


def paged_inputs(
    key, *, q_lens, kv_lens, num_q_heads, num_kv_heads, head_dim, page_size, dtype, poison=False
):
    """(q f[T, Hq, d], k_pages, v_pages f[Hkv, N, page_size, d], kv_lens i32[B], page_table i32[B, P],
    cu_q_lens i32[B + 1]) for requests with these lengths; pages in random order, the null page and one spare
    page unowned. With `poison`, every slot no request owns is NaN, as are padding queries."""
    pages = [-(-kv // page_size) for kv in kv_lens]
    num_pages = 2 + sum(pages)
    order = np.random.default_rng(0).permutation(np.arange(1, num_pages))
    page_table = np.zeros((len(kv_lens), max(1, *pages)), np.int32)
    readable = np.zeros((num_pages, page_size), bool)
    start = 0
    for b, kv in enumerate(kv_lens):
        page_table[b, : pages[b]] = order[start : start + pages[b]]
        start += pages[b]
        for i, page in enumerate(page_table[b, : pages[b]]):
            readable[page, : min(page_size, kv - i * page_size)] = True
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    kq, kk, kv_ = jax.random.split(key, 3)
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    q = jax.random.normal(kq, (max(1, cu_q_lens[-1]), num_q_heads, head_dim), dtype)
    k_pages, v_pages = jax.random.normal(kk, shape, dtype), jax.random.normal(kv_, shape, dtype)
    if poison:
        hidden = jnp.asarray(~readable)[None, :, :, None]
        k_pages, v_pages = jnp.where(hidden, jnp.nan, k_pages), jnp.where(hidden, jnp.nan, v_pages)
        q = jnp.where((jnp.arange(q.shape[0]) >= cu_q_lens[-1])[:, None, None], jnp.nan, q)
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    return q, k_pages, v_pages, i32(kv_lens), i32(page_table), i32(cu_q_lens)


def contiguous(pages, page_table):
    """f[B, P * page_size, Hkv, d]: each request's tokens from pages f[Hkv, N, page_size, d], in order."""
    x = pages[:, page_table]  # [Hkv, B, P, page_size, d]
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1]).transpose(1, 2, 0, 3)


def error_text(error: Exception) -> str:
    lines = str(error).strip().splitlines() or [""]
    return f"error: {type(error).__name__}: {lines[0][:160]}"


def time_calls(calls: dict, estimate_s: float, opts: Options) -> dict:
    """{name: (fn, args)} -> {name: device seconds per call of fn(*args), or the error's first line}.

    Everything is compiled first, in threads (compilation, not timing, is most of a sweep's wall time), then
    timed one at a time. A variant that fails to compile or run is a result, not a crash.
    """
    n = 1 if opts.smoke else int(min(1000, max(3, opts.target_seconds / max(estimate_s, 1e-6))))
    device = jax.devices()[0]

    def build(fn, args):
        out = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))
        out = jax.device_put(out, device)
        return jax.jit(chained_loop(fn, n), donate_argnums=0).lower(out, tuple(args)).compile(), out

    with ThreadPoolExecutor(max(1, opts.compile_threads)) as pool:
        futures = {name: pool.submit(build, *call) for name, call in calls.items()}
    out = {}
    for name, future in futures.items():
        try:
            exe, first = future.result()
            out[name] = best_seconds(exe, first, tuple(calls[name][1]), n, 1 if opts.smoke else 3)
        except Exception as error:  # an unsupported shape, out of shared memory, no cuDNN: all are results
            out[name] = error_text(error)
    return out


def bench_hbm(opts: Options, heads, dtype, key):
    n = int(opts.hbm_gib * 2**30) // 4
    x = jax.random.normal(key, (n,), jnp.float32)  # not zeros: real data, as the kernels see
    seconds = time_calls({"sum": (jnp.sum, (x,))}, 4 * n / 2.5e12, opts)["sum"]
    yield dict(section="hbm", bytes=4 * n, seconds=seconds, tb_per_s=4 * n / seconds / 1e12)


def _jax_paged_attention(interpret: bool):
    with warnings.catch_warnings():  # the module warns that it is deprecated on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

    def run(q, k_pages, v_pages, page_table, kv_lens, *, sm_scale, k_splits, pages_per_block):
        # JAX's op applies no softmax scale: callers pre-scale q.
        return jax_paged.paged_attention(
            q * sm_scale, k_pages, v_pages, page_table, kv_lens, k_splits=k_splits,
            pages_per_compute_block=pages_per_block, interpret=interpret,
        )  # fmt: skip

    return run


def _dense(q, k, v, *, causal, implementation, sm_scale):
    return jax.nn.dot_product_attention(
        q, k, v, scale=sm_scale, is_causal=causal, implementation=implementation
    )


def _decode_case(key, heads, dtype, batch, ctx, page_size):
    q, kp, vp, kv_lens, pt, _ = paged_inputs(
        key, q_lens=[1] * batch, kv_lens=[ctx] * batch, page_size=page_size, dtype=dtype, **heads
    )
    kv_bytes = 2 * batch * ctx * heads["num_kv_heads"] * heads["head_dim"] * jnp.dtype(dtype).itemsize
    return (q, kp, vp, kv_lens, pt), kv_bytes


def _too_big(batch, ctx, page_size, heads) -> bool:
    return (batch * ctx + 2 * page_size) * heads["num_kv_heads"] * heads["head_dim"] >= 2**31


def bench_decode(opts: Options, heads: dict, dtype, key):
    interpret, dense_impl = opts.smoke, "xla" if opts.smoke else "cudnn"
    sm_scale = heads["head_dim"] ** -0.5
    tuned = tuning.decode_blocks(heads["head_dim"])
    jax_paged = _jax_paged_attention(interpret)
    for page_size in opts.page_sizes:
        for batch in opts.batch_sizes:
            for ctx in opts.contexts:
                row = dict(section="decode", page_size=page_size, batch=batch, context=ctx)
                if _too_big(batch, ctx, page_size, heads):
                    yield dict(row, skipped="pool of 2**31 elements or more (32-bit kernel offsets)")
                    continue
                args, row["kv_bytes"] = _decode_case(key, heads, dtype, batch, ctx, page_size)
                q, kp, vp, kv_lens, pt = args
                calls = {
                    "ours": (functools.partial(paged_attention, interpret=interpret, blocks=tuned), args),
                    "ours_stages1": (
                        functools.partial(
                            paged_attention,
                            interpret=interpret,
                            blocks=dataclasses.replace(tuned, num_stages=1),
                        ),
                        args,
                    ),
                }
                if page_size == opts.peer_page_size:
                    cu = jnp.arange(batch + 1, dtype=jnp.int32)
                    calls["ours_ragged"] = (
                        functools.partial(ragged_paged_attention, interpret=interpret),
                        (*args, cu),
                    )
                    for k_splits, ppb in opts.jax_configs:
                        pages_per_seq = pt.shape[1]
                        if pages_per_seq % k_splits or (pages_per_seq // k_splits) % min(ppb, pages_per_seq):
                            continue  # JAX's op needs its blocks to divide the page table
                        fn = functools.partial(
                            jax_paged, sm_scale=sm_scale, k_splits=k_splits, pages_per_block=ppb
                        )
                        calls[f"jax:k_splits={k_splits},ppcb={ppb}"] = (fn, (q, kp, vp, pt, kv_lens))
                    k, v = contiguous(kp, pt)[:, :ctx], contiguous(vp, pt)[:, :ctx]
                    fn = functools.partial(_dense, causal=False, implementation=dense_impl, sm_scale=sm_scale)
                    calls["dense"] = (fn, (q[:, None], k, v))
                times = time_calls(calls, row["kv_bytes"] / 2e12 + 5e-6, opts)
                for name, t in times.items():
                    if name.startswith("jax:"):
                        row.setdefault("jax_all", {})[name[4:]] = t
                        if isinstance(t, float) and t < row.get("jax_s", math.inf):
                            row["jax_s"], row["jax_config"] = t, name[4:]
                    else:
                        row[f"{name}_s"] = t
                del calls, args, q, kp, vp
                yield row


def bench_prefill(opts: Options, heads: dict, dtype, key):
    interpret, dense_impl = opts.smoke, "xla" if opts.smoke else "cudnn"
    hq, d = heads["num_q_heads"], heads["head_dim"]
    tuned = tuning.ragged_blocks(d)
    page_size = opts.page_sizes[0]
    for chunk in opts.chunk_lens:
        for prefix in opts.prefixes:
            row = dict(section="prefill", page_size=page_size, chunk=chunk, prefix=prefix)
            args, row["flops"] = _prefill_case(key, heads, dtype, chunk, prefix, page_size)
            q, kp, vp, kv_lens, pt, cu = args
            calls = {
                name: (functools.partial(ragged_paged_attention, interpret=interpret, blocks=blocks), args)
                for name, blocks in (
                    ("ours", tuned),
                    ("ours_stages1", dataclasses.replace(tuned, num_stages=1)),
                )
            }
            # The peer: dense causal attention over the chunk's own tokens, contiguous (no prefix).
            k = contiguous(kp, pt)[:, prefix : prefix + chunk]
            v = contiguous(vp, pt)[:, prefix : prefix + chunk]
            row["dense_flops"] = 4 * hq * d * chunk * (chunk + 1) // 2
            fn = functools.partial(_dense, causal=True, implementation=dense_impl, sm_scale=d**-0.5)
            calls["dense"] = (fn, (q[None], k, v))
            row.update({f"{n}_s": t for n, t in time_calls(calls, row["flops"] / 3e14 + 5e-6, opts).items()})
            del calls, args, q, kp, vp, k, v
            yield row


def _prefill_case(key, heads, dtype, chunk, prefix, page_size):
    args = paged_inputs(
        key, q_lens=[chunk], kv_lens=[prefix + chunk], page_size=page_size, dtype=dtype, **heads
    )
    flops = 4 * heads["num_q_heads"] * heads["head_dim"] * (chunk * prefix + chunk * (chunk + 1) // 2)
    return args, flops


def bench_mixed(opts: Options, heads: dict, dtype, key):
    """A mixed step: `decodes` requests of one new token at `context`, then one fresh prompt chunk."""
    page_size = opts.page_sizes[0]
    for decodes, context, chunk in opts.mixed_shapes:
        row = dict(section="mixed", decodes=decodes, context=context, chunk=chunk)
        args = paged_inputs(
            key, q_lens=[1] * decodes + [chunk], kv_lens=[context] * decodes + [chunk],
            page_size=page_size, dtype=dtype, **heads,
        )  # fmt: skip
        calls = {
            "ragged": (functools.partial(ragged_paged_attention, interpret=opts.smoke), args),
            "mixed": (functools.partial(mixed_paged_attention, interpret=opts.smoke), args),
        }
        row.update({f"{n}_s": t for n, t in time_calls(calls, 1e-4, opts).items()})
        row["mixed_speedup"] = _ratio(row.get("ragged_s"), row.get("mixed_s"))
        del calls, args
        yield row


def bench_kv_write(opts: Options, heads: dict, dtype, key):
    hkv, d, page_size = heads["num_kv_heads"], heads["head_dim"], opts.page_sizes[0]
    # A pool far larger than the write, so a copy of it per step would dominate the time and show.
    num_pages = 64 if opts.smoke else 2**15
    n, trials = (1, 1) if opts.smoke else (200, 3)
    step = lambda c, new: write_kv(new[0], new[1], *c, new[2], interpret=opts.smoke)
    loop = lambda c, consts: jax.lax.fori_loop(0, n, lambda _, c: step(c, consts), c)
    for num_tokens in (16,) if opts.smoke else (256, 8192):
        k, v = jax.random.normal(key, (2, num_tokens, hkv, d), dtype)
        pools = tuple(jnp.zeros((hkv, num_pages, page_size, d), dtype) for _ in range(2))
        slots = np.random.default_rng(0).choice(
            np.arange(page_size, num_pages * page_size), num_tokens, False
        )
        consts = (k, v, jnp.asarray(slots, jnp.int32))
        exe = jax.jit(loop, donate_argnums=0).lower(pools, consts).compile()
        seconds = best_seconds(exe, pools, consts, n, trials)
        written = 2 * num_tokens * hkv * d * jnp.dtype(dtype).itemsize
        pool_bytes = 2 * hkv * num_pages * page_size * d * jnp.dtype(dtype).itemsize
        yield dict(section="kv_write", tokens=num_tokens, seconds=seconds, bytes_written=written,
                   pool_bytes=pool_bytes, gb_per_s=written / seconds / 1e9)  # fmt: skip


# The blocks a sweep tries by default: the tuned row, then each knob moved alone (a coordinate sweep).
DECODE_AXES = dict(
    block_kv=(16, 32, 128, 256),
    num_warps=(2, 8),
    num_stages=(1, 2, 4, 5),
    min_programs=(132, 264, 1056, 2112),
)
RAGGED_AXES = dict(block_m=(64, 256), block_kv=(32, 128), num_warps=(4, 8), num_stages=(1, 2, 4))


def block_variants(tuned, axes: dict, explicit: list[str]) -> dict:
    """{label: blocks}: `tuned`, then each explicit "field=value,..." override of it, or else every value of
    every axis alone."""
    out = {"tuned": tuned}
    if explicit:
        for spec in explicit:
            fields = {k: int(v) for k, v in (item.split("=") for item in spec.split(","))}
            out[spec] = dataclasses.replace(tuned, **fields)
        return out
    for field, values in axes.items():
        for value in values:
            if value != getattr(tuned, field):
                out[f"{field}={value}"] = dataclasses.replace(tuned, **{field: value})
    return out


def _sweep_rows(section, base: dict, variants: dict, times: dict, work: float, unit: str):
    tuned = times["tuned"]
    for label, blocks in variants.items():
        t = times[label]
        row = dict(section=section, **base, variant=label, blocks=str(blocks), seconds=t)
        if isinstance(t, float):
            row[unit] = work / t / 1e12
            row["vs_tuned"] = _ratio(tuned, t)
        yield row


def bench_sweep_decode(opts: Options, heads: dict, dtype, key):
    variants = block_variants(tuning.decode_blocks(heads["head_dim"]), DECODE_AXES, opts.decode_variants)
    page_size = opts.page_sizes[0]
    for batch, ctx in opts.sweep_decode_shapes:
        if _too_big(batch, ctx, page_size, heads):
            continue
        args, kv_bytes = _decode_case(key, heads, dtype, batch, ctx, page_size)
        calls = {
            label: (functools.partial(paged_attention, interpret=opts.smoke, blocks=b), args)
            for label, b in variants.items()
        }
        times = time_calls(calls, kv_bytes / 2e12 + 5e-6, opts)
        base = dict(page_size=page_size, batch=batch, context=ctx)
        yield from _sweep_rows("sweep_decode", base, variants, times, kv_bytes, "tb_per_s")
        del calls, args


def bench_sweep_prefill(opts: Options, heads: dict, dtype, key):
    variants = block_variants(tuning.ragged_blocks(heads["head_dim"]), RAGGED_AXES, opts.ragged_variants)
    page_size = opts.page_sizes[0]
    for chunk, prefix in opts.sweep_prefill_shapes:
        args, flops = _prefill_case(key, heads, dtype, chunk, prefix, page_size)
        calls = {
            label: (functools.partial(ragged_paged_attention, interpret=opts.smoke, blocks=b), args)
            for label, b in variants.items()
        }
        times = time_calls(calls, flops / 3e14 + 5e-6, opts)
        base = dict(page_size=page_size, chunk=chunk, prefix=prefix)
        yield from _sweep_rows("sweep_prefill", base, variants, times, flops, "tflops")
        del calls, args


def _ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def add_derived(rows: list[dict]) -> None:
    """Rates (TB/s, TFLOP/s) and the ratios the targets are stated in, next to the raw times."""
    hbm = next(
        (r["tb_per_s"] for r in rows if r["section"] == "hbm" and isinstance(r["seconds"], float)), None
    )
    for r in rows:
        if r["section"] not in ("decode", "prefill"):
            continue
        work, unit = (
            (r.get("kv_bytes"), "tb_per_s") if r["section"] == "decode" else (r.get("flops"), "tflops")
        )
        for name in ("ours", "ours_stages1", "ours_ragged", "jax", "dense"):
            if isinstance(r.get(f"{name}_s"), float) and work:
                done = r["dense_flops"] if name == "dense" and r["section"] == "prefill" else work
                r[f"{name}_{unit}"] = done / r[f"{name}_s"] / 1e12
        r["overlap_gain"] = _ratio(r.get("ours_stages1_s"), r.get("ours_s"))
        if r["section"] == "decode":
            r["fraction_of_hbm"] = _ratio(r.get("ours_tb_per_s"), hbm)
            r["speedup_vs_jax"] = _ratio(r.get("jax_s"), r.get("ours_s"))
            r["speedup_vs_dense"] = _ratio(r.get("dense_s"), r.get("ours_s"))
            r["ragged_vs_ours"] = _ratio(r.get("ours_ragged_s"), r.get("ours_s"))
        else:
            r["tflops_vs_dense"] = _ratio(r.get("ours_tflops"), r.get("dense_tflops"))


COLUMNS = {
    "hbm": ["bytes", "seconds", "tb_per_s"],
    "decode": ["page_size", "batch", "context", "ours_s", "ours_tb_per_s", "fraction_of_hbm", "overlap_gain",
               "ours_ragged_s", "jax_s", "jax_config", "speedup_vs_jax", "dense_s", "speedup_vs_dense",
               "skipped"],
    "prefill": ["chunk", "prefix", "ours_s", "ours_tflops", "overlap_gain", "dense_s", "dense_tflops",
                "tflops_vs_dense"],
    "mixed": ["decodes", "context", "chunk", "ragged_s", "mixed_s", "mixed_speedup"],
    "kv_write": ["tokens", "seconds", "gb_per_s", "pool_bytes"],
    "sweep_decode": ["batch", "context", "variant", "seconds", "tb_per_s", "vs_tuned"],
    "sweep_prefill": ["chunk", "prefix", "variant", "seconds", "tflops", "vs_tuned"],
}  # fmt: skip

SECTIONS = dict(
    hbm=bench_hbm, decode=bench_decode, prefill=bench_prefill, mixed=bench_mixed, kv_write=bench_kv_write,
    sweep_decode=bench_sweep_decode, sweep_prefill=bench_sweep_prefill,
)  # fmt: skip


def _cell(name, value):
    if value is None:
        return ""
    if isinstance(value, str):
        return "error" if value.startswith("error") else value
    if name.endswith("_s") and not name.endswith("per_s") or name == "seconds":
        return f"{value * 1e6:.1f} us"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def tables(rows: list[dict]) -> str:
    """Markdown tables, one per section (errors in full in the JSON)."""
    out = []
    for section, cols in COLUMNS.items():
        sec = [r for r in rows if r["section"] == section]
        if sec:
            out += [f"\n### {section}\n", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            out += ["| " + " | ".join(_cell(c, r.get(c)) for c in cols) + " |" for r in sec]
    return "\n".join(out) + "\n"


def run(opts: Options, output_dir: Path, command: str) -> tuple[Path, Path]:
    """Runs the chosen sections, prints the tables, writes <stem>.json and <stem>.md; returns their paths."""
    unknown = set(opts.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"sections must be among {sorted(SECTIONS)}, got {sorted(unknown)}")
    heads = SMOKE_HEADS if opts.smoke else HEADS
    dtype, key = jnp.bfloat16, jax.random.key(0)
    device = jax.devices()[0]
    now = datetime.datetime.now(datetime.UTC)
    metadata = dict(
        device=device.device_kind, platform=device.platform, date=now.isoformat(timespec="seconds"),
        jax=jax.__version__, command=command,
        heads=heads, dtype="bfloat16", tuned_blocks=dict(decode=str(tuning.decode_blocks(heads["head_dim"])),
        ragged=str(tuning.ragged_blocks(heads["head_dim"]))), options=dataclasses.asdict(opts),
    )  # fmt: skip
    slug = "".join(c if c.isalnum() else "-" for c in device.device_kind).strip("-").lower()
    stem = f"{'smoke_' if opts.smoke else ''}kernels_{slug}_{now:%Y%m%d-%H%M%S}"
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / f"{stem}.json", output_dir / f"{stem}.md"
    header = "\n".join(f"- {k}: {v}" for k, v in metadata.items() if k != "options")
    rows = []
    for name in opts.sections:
        for row in SECTIONS[name](opts, heads, dtype, key):
            rows.append(row)
            add_derived(rows)
            print(json.dumps({k: v for k, v in row.items() if k != "jax_all"}, default=str), flush=True)
            json_path.write_text(json.dumps(dict(metadata=metadata, rows=rows), indent=1, default=str))
            md_path.write_text(f"# Kernel benchmark\n\n{header}\n{tables(rows)}")
    print(tables(rows))
    return json_path, md_path


def _shapes(specs: list[str], sep: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(x) for x in spec.split(sep)) for spec in specs)


def options_from_flags() -> Options:
    ints = lambda xs: tuple(int(x) for x in xs)
    common = dict(
        sections=tuple(FLAGS.sections),
        decode_variants=tuple(FLAGS.decode_variant),
        ragged_variants=tuple(FLAGS.ragged_variant),
        compile_threads=FLAGS.compile_threads,
    )
    if FLAGS.smoke:
        return Options(
            **common,
            batch_sizes=(3,),
            contexts=(40,),
            page_sizes=(16,),
            peer_page_size=16,
            chunk_lens=(24,),
            prefixes=(20,),
            jax_configs=((1, 2), (1, 3)),
            hbm_gib=2**-10,
            target_seconds=0.0,
            sweep_decode_shapes=((2, 40),),
            sweep_prefill_shapes=((24, 20),),
            mixed_shapes=((3, 40, 24),),
            smoke=True,
        )
    return Options(
        **common,
        batch_sizes=ints(FLAGS.batch_sizes),
        contexts=ints(FLAGS.contexts),
        page_sizes=ints(FLAGS.page_sizes),
        peer_page_size=FLAGS.peer_page_size,
        chunk_lens=ints(FLAGS.chunk_lens),
        prefixes=(0, FLAGS.prefix_len),
        hbm_gib=FLAGS.hbm_gib,
        target_seconds=FLAGS.target_seconds,
        jax_configs=tuple((k, p) for k in ints(FLAGS.jax_k_splits) for p in ints(FLAGS.jax_pages_per_block)),
        sweep_decode_shapes=_shapes(FLAGS.sweep_decode_shapes, "x"),
        sweep_prefill_shapes=_shapes(FLAGS.sweep_prefill_shapes, "+"),
        mixed_shapes=tuple(
            tuple(int(x) for x in spec.replace("+", "x").split("x")) for spec in FLAGS.mixed_shapes
        ),
    )


def main(argv):
    del argv  # absl has taken the flags out of it; the command records them
    command = " ".join(["python scripts/bench_kernels.py", *sys.argv[1:]])
    json_path, md_path = run(options_from_flags(), Path(FLAGS.output_dir), command)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    app.run(main)
