"""Times the Pallas paged-attention kernels against their peers on a GPU; prints a table and writes JSON and
markdown to --output_dir (device, date, JAX version and command included).

Sections (--sections): hbm (jnp.sum over a --hbm_gib array: the read bandwidth to compare with), decode (ours
with the tuned blocks and with num_stages=1 -- what the load/compute overlap buys --, ours through the ragged
kernel, JAX's own Pallas paged_attention at its best k_splits x pages_per_compute_block, and cuDNN dense
attention on the same tokens laid out contiguously), prefill (one chunk with and without a cached prefix, vs
cuDNN dense causal attention over the chunk), kv_write (the in-place page write).

  python scripts/bench_kernels.py --sections hbm,decode --batch_sizes 1,8,32
  python scripts/bench_kernels.py --smoke --output_dir /tmp/x    # CPU, interpret mode: plumbing only

Every time is device time per call: n calls chained inside one jitted loop, best of 3, so no host dispatch.
"""

import dataclasses
import datetime
import functools
import json
import math
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels import tuning
from pallas_kernels.kv_write import write_kv
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention

flags.DEFINE_string("output_dir", "benchmarks/results", "Where the JSON and markdown results are written.")
flags.DEFINE_bool("smoke", False, "Tiny shapes in interpret mode on CPU: checks the plumbing, times nothing.")
flags.DEFINE_list("sections", ["hbm", "decode", "prefill", "kv_write"], "Which parts to run.")
flags.DEFINE_list("batch_sizes", ["1", "8", "32", "64", "128", "256"], "Decode batch sizes.")
flags.DEFINE_list("contexts", ["512", "2048", "8192", "32768"], "Decode context lengths.")
flags.DEFINE_list("page_sizes", ["16", "32", "64"], "Decode page sizes (prefill and kv_write use the first).")
flags.DEFINE_integer("peer_page_size", 16, "The decode page size at which the peers run too.")
flags.DEFINE_list("chunk_lens", ["512", "1024", "2048", "4096", "8192"], "Prefill chunk lengths.")
flags.DEFINE_integer("prefix_len", 4096, "Cached prefix before the chunk in the 'with prefix' prefill rows.")
flags.DEFINE_list("jax_k_splits", ["4", "16"], "k_splits values tried for JAX's paged_attention.")
flags.DEFINE_list("jax_pages_per_block", ["4", "8", "16"], "pages_per_compute_block values tried for it.")
flags.DEFINE_float("hbm_gib", 4.0, "Size of the array summed to measure HBM read bandwidth.")
flags.DEFINE_float("target_seconds", 0.05, "Rough device time per timing trial.")
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


def device_seconds(step, carry, consts, n: int, trials: int = 3) -> float:
    """Seconds per `step(carry, consts) -> carry`: n steps inside one jitted loop (no host dispatch per step),
    best of `trials`. The carry chains each step to the last, so XLA can neither hoist nor merge them; the
    consts are arguments, not closed-over values that would be baked into the executable."""
    loop = lambda c, consts: jax.lax.fori_loop(0, n, lambda _, c: step(c, consts), c)
    run = jax.jit(loop, donate_argnums=0)
    # Committed to the device like the loop's outputs, so the timed calls hit the warm-up's compilation.
    carry = jax.device_put(carry, jax.devices()[0])
    # Warm up twice: the first Pallas lowering in a process registers a config value, so the second call
    # compiles again once.
    for _ in range(2):
        carry = jax.block_until_ready(run(carry, consts))
    best = math.inf
    for _ in range(trials):
        start = time.perf_counter()
        carry = jax.block_until_ready(run(carry, consts))
        best = min(best, (time.perf_counter() - start) / n)
    return best


def time_call(fn, args, vary: int, estimate_s: float, opts: Options) -> float:
    """device_seconds of fn(*args), args[vary] made to depend on the previous call (an exact no-op add)."""

    def step(acc, args):
        a = list(args)
        a[vary] = a[vary] + (acc > 3e38).astype(a[vary].dtype)
        return acc + jax.tree.leaves(fn(*a))[0].reshape(-1)[0].astype(jnp.float32)

    if opts.smoke:
        return device_seconds(step, jnp.float32(0), tuple(args), 1, trials=1)
    n = int(min(1000, max(3, opts.target_seconds / max(estimate_s, 1e-6))))
    return device_seconds(step, jnp.float32(0), tuple(args), n)


def attempt(fn, *args):
    """fn(*args) or the error's first line: a peer that cannot run a shape is reported, not fatal."""
    try:
        return fn(*args)
    except Exception as error:  # any failure of a peer (an unsupported shape, no cuDNN) is a result
        return f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}"


def bench_hbm(opts: Options) -> list[dict]:
    n = int(opts.hbm_gib * 2**30) // 4
    x = jnp.ones((n,), jnp.float32)
    seconds = time_call(jnp.sum, (x,), 0, 4 * n / 2.5e12, opts)
    return [dict(section="hbm", bytes=4 * n, seconds=seconds, tb_per_s=4 * n / seconds / 1e12)]


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


def bench_decode(opts: Options, heads: dict, dtype, key) -> list[dict]:
    interpret, dense_impl = opts.smoke, "xla" if opts.smoke else "cudnn"
    hkv, d = heads["num_kv_heads"], heads["head_dim"]
    sm_scale = d**-0.5
    tuned = tuning.decode_blocks(d)
    jax_paged = _jax_paged_attention(interpret)
    rows = []
    for page_size in opts.page_sizes:
        peers = page_size == opts.peer_page_size
        for batch in opts.batch_sizes:
            for ctx in opts.contexts:
                row = dict(section="decode", page_size=page_size, batch=batch, context=ctx)
                rows.append(row)
                if (batch * ctx + 2 * page_size) * hkv * d >= 2**31:
                    row["skipped"] = "pool of 2**31 elements or more (32-bit kernel offsets)"
                    continue
                q, kp, vp, kv_lens, pt, _ = paged_inputs(
                    key, q_lens=[1] * batch, kv_lens=[ctx] * batch, page_size=page_size, dtype=dtype, **heads
                )
                row["kv_bytes"] = kv_bytes = 2 * batch * ctx * hkv * d * jnp.dtype(dtype).itemsize
                est = kv_bytes / 2e12 + 5e-6
                args = (q, kp, vp, kv_lens, pt)
                for name, blocks in (
                    ("ours", tuned),
                    ("ours_stages1", dataclasses.replace(tuned, num_stages=1)),
                ):
                    fn = functools.partial(paged_attention, interpret=interpret, blocks=blocks)
                    row[f"{name}_s"] = attempt(time_call, fn, args, 3, est, opts)
                if peers:
                    fn = functools.partial(ragged_paged_attention, interpret=interpret)
                    cu = jnp.arange(batch + 1, dtype=jnp.int32)
                    row["ours_ragged_s"] = attempt(time_call, fn, (*args, cu), 3, est, opts)
                    for k_splits, ppb in opts.jax_configs:
                        pages_per_seq = pt.shape[1]
                        if pages_per_seq % k_splits or (pages_per_seq // k_splits) % min(ppb, pages_per_seq):
                            continue  # JAX's op needs its blocks to divide the page table
                        fn = functools.partial(
                            jax_paged, sm_scale=sm_scale, k_splits=k_splits, pages_per_block=ppb
                        )
                        t = attempt(time_call, fn, (q, kp, vp, pt, kv_lens), 4, est, opts)
                        row.setdefault("jax_all", {})[f"k_splits={k_splits},ppcb={ppb}"] = t
                        if isinstance(t, float) and t < row.get("jax_s", math.inf):
                            row["jax_s"], row["jax_config"] = t, f"k_splits={k_splits},ppcb={ppb}"
                    k, v = contiguous(kp, pt)[:, :ctx], contiguous(vp, pt)[:, :ctx]
                    fn = functools.partial(_dense, causal=False, implementation=dense_impl, sm_scale=sm_scale)
                    row["dense_s"] = attempt(time_call, fn, (q[:, None], k, v), 0, est, opts)
                    del k, v
                del q, kp, vp, args
    return rows


def bench_prefill(opts: Options, heads: dict, dtype, key) -> list[dict]:
    interpret, dense_impl = opts.smoke, "xla" if opts.smoke else "cudnn"
    hq, d = heads["num_q_heads"], heads["head_dim"]
    tuned = tuning.ragged_blocks(d)
    rows = []
    for chunk in opts.chunk_lens:
        for prefix in opts.prefixes:
            row = dict(section="prefill", page_size=opts.page_sizes[0], chunk=chunk, prefix=prefix)
            rows.append(row)
            q, kp, vp, kv_lens, pt, cu = paged_inputs(
                key,
                q_lens=[chunk],
                kv_lens=[prefix + chunk],
                page_size=opts.page_sizes[0],
                dtype=dtype,
                **heads,
            )
            row["flops"] = flops = 4 * hq * d * (chunk * prefix + chunk * (chunk + 1) // 2)
            args = (q, kp, vp, kv_lens, pt, cu)
            for name, blocks in (("ours", tuned), ("ours_stages1", dataclasses.replace(tuned, num_stages=1))):
                fn = functools.partial(ragged_paged_attention, interpret=interpret, blocks=blocks)
                row[f"{name}_s"] = attempt(time_call, fn, args, 3, flops / 3e14 + 5e-6, opts)
            # The peer: dense causal attention over the chunk's own tokens, contiguous (no prefix).
            k, v = (
                contiguous(kp, pt)[:, prefix : prefix + chunk],
                contiguous(vp, pt)[:, prefix : prefix + chunk],
            )
            row["dense_flops"] = dense_flops = 4 * hq * d * chunk * (chunk + 1) // 2
            fn = functools.partial(_dense, causal=True, implementation=dense_impl, sm_scale=d**-0.5)
            row["dense_s"] = attempt(time_call, fn, (q[None], k, v), 0, dense_flops / 3e14, opts)
            del q, kp, vp, k, v, args
    return rows


def bench_kv_write(opts: Options, heads: dict, dtype, key) -> list[dict]:
    hkv, d, page_size = heads["num_kv_heads"], heads["head_dim"], opts.page_sizes[0]
    # A pool far larger than the write, so a copy of it per step would dominate the time and show.
    num_pages = 64 if opts.smoke else 2**15
    rows = []
    for num_tokens in (16,) if opts.smoke else (256, 8192):
        k, v = jax.random.normal(key, (2, num_tokens, hkv, d), dtype)
        pools = tuple(jnp.zeros((hkv, num_pages, page_size, d), dtype) for _ in range(2))
        slots = np.random.default_rng(0).choice(
            np.arange(page_size, num_pages * page_size), num_tokens, False
        )
        slots = jnp.asarray(slots, jnp.int32)
        step = lambda c, new: write_kv(new[0], new[1], *c, new[2], interpret=opts.smoke)
        n, trials = (1, 1) if opts.smoke else (200, 3)
        seconds = device_seconds(step, pools, (k, v, slots), n, trials=trials)
        written = 2 * num_tokens * hkv * d * jnp.dtype(dtype).itemsize
        pool_bytes = 2 * hkv * num_pages * page_size * d * jnp.dtype(dtype).itemsize
        rows.append(dict(section="kv_write", tokens=num_tokens, seconds=seconds, bytes_written=written,
                         pool_bytes=pool_bytes, gb_per_s=written / seconds / 1e9))  # fmt: skip
    return rows


def _ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def add_derived(rows: list[dict]) -> None:
    """Rates (TB/s, TFLOP/s) and the ratios the targets are stated in, next to the raw times."""
    hbm = next((r["tb_per_s"] for r in rows if r["section"] == "hbm"), None)
    for r in rows:
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
        if r["section"] == "prefill":
            r["tflops_vs_dense"] = _ratio(r.get("ours_tflops"), r.get("dense_tflops"))


COLUMNS = {
    "hbm": ["bytes", "seconds", "tb_per_s"],
    "decode": ["page_size", "batch", "context", "ours_s", "ours_tb_per_s", "fraction_of_hbm", "overlap_gain",
               "ours_ragged_s", "jax_s", "jax_config", "speedup_vs_jax", "dense_s", "speedup_vs_dense",
               "skipped"],
    "prefill": ["chunk", "prefix", "ours_s", "ours_tflops", "overlap_gain", "dense_s", "dense_tflops",
                "tflops_vs_dense"],
    "kv_write": ["tokens", "seconds", "gb_per_s", "pool_bytes"],
}  # fmt: skip


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
    heads = SMOKE_HEADS if opts.smoke else HEADS
    dtype, key = jnp.bfloat16, jax.random.key(0)
    sections = dict(hbm=bench_hbm, decode=bench_decode, prefill=bench_prefill, kv_write=bench_kv_write)
    unknown = set(opts.sections) - set(sections)
    if unknown:
        raise ValueError(f"sections must be among {sorted(sections)}, got {sorted(unknown)}")
    rows = []
    for name in opts.sections:
        rows += sections[name](opts) if name == "hbm" else sections[name](opts, heads, dtype, key)
    add_derived(rows)
    device = jax.devices()[0]
    now = datetime.datetime.now(datetime.UTC)
    metadata = dict(
        device=device.device_kind, platform=device.platform, date=now.isoformat(timespec="seconds"),
        jax=jax.__version__, command=command,
        heads=heads, dtype="bfloat16", tuned_blocks=dict(decode=str(tuning.decode_blocks(heads["head_dim"])),
        ragged=str(tuning.ragged_blocks(heads["head_dim"]))), options=dataclasses.asdict(opts),
    )  # fmt: skip
    text = tables(rows)
    print(text)
    slug = "".join(c if c.isalnum() else "-" for c in device.device_kind).strip("-").lower()
    stem = f"{'smoke_' if opts.smoke else ''}kernels_{slug}_{now:%Y%m%d-%H%M%S}"
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / f"{stem}.json", output_dir / f"{stem}.md"
    json_path.write_text(json.dumps(dict(metadata=metadata, rows=rows), indent=1, default=str))
    header = "\n".join(f"- {k}: {v}" for k, v in metadata.items() if k != "options")
    md_path.write_text(f"# Kernel benchmark\n\n{header}\n{text}")
    return json_path, md_path


def options_from_flags() -> Options:
    ints = lambda xs: tuple(int(x) for x in xs)
    if FLAGS.smoke:
        return Options(
            sections=tuple(FLAGS.sections),
            batch_sizes=(3,),
            contexts=(40,),
            page_sizes=(16,),
            peer_page_size=16,
            chunk_lens=(24,),
            prefixes=(20,),
            jax_configs=((1, 2), (1, 3)),
            hbm_gib=2**-10,
            target_seconds=0.0,
            smoke=True,
        )
    return Options(
        sections=tuple(FLAGS.sections),
        batch_sizes=ints(FLAGS.batch_sizes),
        contexts=ints(FLAGS.contexts),
        page_sizes=ints(FLAGS.page_sizes),
        peer_page_size=FLAGS.peer_page_size,
        chunk_lens=ints(FLAGS.chunk_lens),
        prefixes=(0, FLAGS.prefix_len),
        hbm_gib=FLAGS.hbm_gib,
        target_seconds=FLAGS.target_seconds,
        jax_configs=tuple((k, p) for k in ints(FLAGS.jax_k_splits) for p in ints(FLAGS.jax_pages_per_block)),
    )


def main(argv):
    command = " ".join(["python scripts/bench_kernels.py", *argv[1:]])
    json_path, md_path = run(options_from_flags(), Path(FLAGS.output_dir), command)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    app.run(main)
