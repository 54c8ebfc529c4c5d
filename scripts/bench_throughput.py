"""Offline throughput: N requests arrive at once and the engine serves them to the end.

Prompts are synthetic (random token ids of random lengths) or ShareGPT first turns (the first user message,
rendered with the chat template; the output length is that of the recorded reply). Every request generates
exactly its output length, greedy, with EOS held back until then (min_tokens, as HF's min_new_tokens), so two
systems do the same work and should pick the same tokens. Prints requests/s, output
tokens/s, mean TTFT and TPOT, compile time, and KV memory waste: the slots of the pages in running requests'
page tables that hold no token, summed over steps, relative to the tokens held (a shared page counts once).
On CPU it also runs HF transformers `generate` on the same prompts in the same run (scripts/hf_throughput.py
in the HF side venv) and prints the speed ratio; elsewhere with --hf on (a random model's HF twin gets random
weights of its shape, so only speed compares). Results go to --output_dir as JSON with the device, date,
versions and command. HF's static batches run each batch to its longest output, which is the waste that
continuous batching removes; --max_output_tokens hides it by making most outputs equally long.

  python scripts/bench_throughput.py --dataset sharegpt --num_prompts 32
"""

import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np
import peers
import sharegpt
from absl import app, flags
from device_profile import describe as describe_profile
from device_profile import profile_steps
from step_timeline import StepTimeline, describe

from jaxpage import SamplingParams, gin_config
from jaxpage.engine import LLMEngine
from jaxpage.metrics import kv_occupancy
from jaxpage.page_pool import PagePool
from jaxpage.request import Request
from jaxpage.scheduler import Scheduler

ROOT = Path(__file__).resolve().parent.parent

flags.DEFINE_multi_string("gin_file", None, "Gin config file(s); default configs/smollm2_135m.gin.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied after the files.")
flags.DEFINE_enum("dataset", "sharegpt", ["sharegpt", "synthetic"], "Where prompts come from.")
flags.DEFINE_integer("num_prompts", 32, "Requests in the run.")
flags.DEFINE_integer("max_output_tokens", 0, "Cap on each request's output length; 0 = no cap.")
flags.DEFINE_integer("synthetic_input_len", 128, "Mean prompt length of synthetic requests.")
flags.DEFINE_integer("synthetic_output_len", 64, "Mean output length of synthetic requests.")
flags.DEFINE_float("synthetic_range", 0.5, "Synthetic lengths are uniform in mean * [1 - range, 1 + range].")
flags.DEFINE_integer("seed", 0, "Seed of the prompt selection and the synthetic lengths.")
flags.DEFINE_enum("hf", "auto", ["auto", "on", "off"], "Run HF generate on the same prompts (auto: on CPU).")
flags.DEFINE_integer("hf_batch_size", 32, "Static batch size of HF generate.")
flags.DEFINE_string("hf_python", None, "Python of the HF side venv; default $JAXPAGE_HF_PYTHON or .venv-hf.")
flags.DEFINE_list(
    "peers",
    [],
    "Other engines run after this one on the same requests, each in its side venv (`make peers`): vllm, "
    "llamacpp.",
)
flags.DEFINE_integer(
    "kv_replay_prompts",
    1000,
    "ShareGPT requests whose full lengths are replayed through the scheduler alone.",
)
flags.DEFINE_list(
    "profile_steps",
    [],
    "START,COUNT: trace COUNT engine steps from step START with the JAX profiler and print the device "
    "kernels they ran (the profiler slows the host: the run's throughput is then not a result).",
)
flags.register_validator(
    "profile_steps",
    lambda v: not v or (len(v) == 2 and all(x.isdigit() for x in v) and int(v[1]) > 0),
    "--profile_steps takes START,COUNT: two integers, COUNT > 0",
)
flags.DEFINE_bool("warmup", True, "Compile every bucket before the timed run.")
flags.DEFINE_string("output_dir", str(ROOT / "benchmarks" / "results"), "Where the result JSON goes.")
FLAGS = flags.FLAGS


@dataclasses.dataclass
class Workload:
    prompt_token_ids: list[list[int]]
    output_lens: list[int]


def sharegpt_first_turns():
    """Yields (first user message, recorded reply) of each whole conversation."""
    for pairs in sharegpt.conversations():
        yield pairs[0]


def sharegpt_workload(engine: LLMEngine, num_prompts: int, rng: np.random.Generator) -> Workload:
    # vLLM's benchmark filters: drop very short turns and any that would not fit the context.
    limit = engine.max_model_len
    pairs = list(sharegpt_first_turns())
    prompts, lens = [], []
    for index in rng.permutation(len(pairs)):
        question, answer = pairs[index]
        if not question.strip() or not answer.strip():
            continue
        prompt = engine.tokenizer.encode_chat([{"role": "user", "content": question}])
        output_len = len(engine.tokenizer.encode(answer))
        if len(prompt) < 4 or output_len < 4 or len(prompt) > limit // 2 or len(prompt) + output_len > limit:
            continue
        prompts.append(prompt)
        lens.append(output_len)
        if len(prompts) == num_prompts:
            break
    return Workload(prompts, lens)


def synthetic_workload(vocab_size: int, num_prompts: int, rng: np.random.Generator) -> Workload:
    def lengths(mean):
        low, high = max(1, int(mean * (1 - FLAGS.synthetic_range))), int(mean * (1 + FLAGS.synthetic_range))
        return rng.integers(low, high + 1, size=num_prompts).tolist()

    prompts = [rng.integers(1, vocab_size, size=n).tolist() for n in lengths(FLAGS.synthetic_input_len)]
    return Workload(prompts, lengths(FLAGS.synthetic_output_len))


def run_engine(engine: LLMEngine, workload: Workload) -> dict:
    """Serves the workload; returns its timings, KV page statistics and output token ids."""
    page_size = engine.config.page_size
    timeline = StepTimeline(engine.runner)
    start = time.perf_counter()
    ids = []
    for prompt, output_len in zip(workload.prompt_token_ids, workload.output_lens, strict=True):
        params = SamplingParams(
            max_tokens=output_len, min_tokens=output_len, temperature=0.0, output_kind="final_only"
        )
        ids.append(engine.add_request(prompt, params))
    metrics, outputs = {}, {}
    slots = stored = peak_pages = peak_running = steps = 0

    def serve_step():
        nonlocal slots, stored, peak_pages, peak_running, steps
        for output in engine.step():
            metrics[output.request_id] = output.metrics  # final only: every output is a finished one
            outputs[output.request_id] = output.outputs[0].token_ids
        step_slots, step_stored = kv_occupancy(engine.scheduler.running, page_size)
        slots += step_slots
        stored += step_stored
        peak_pages = max(peak_pages, engine.pool.num_used_pages)
        peak_running = max(peak_running, len(engine.scheduler.running))
        steps += 1

    def serve_steps(count: int) -> int:
        for done in range(count):
            if not engine.has_unfinished_requests():
                return done
            serve_step()
        return count

    profile_start, profile_count = map(int, FLAGS.profile_steps) if FLAGS.profile_steps else (-1, 0)
    profile = None
    while engine.has_unfinished_requests():
        if steps == profile_start:
            profile = profile_steps(lambda: serve_steps(profile_count))
        else:
            serve_step()
    seconds = time.perf_counter() - start
    steps_on_device = timeline.close()
    assert engine.pool.num_free_pages == engine.pool.num_usable_pages, "pages leaked"
    compiles = engine.metrics().num_compiles_after_warmup

    num_out = sum(workload.output_lens)
    ttft = [metrics[i].ttft for i in ids]
    tpot = [metrics[i].tpot for i in ids if metrics[i].tpot is not None]
    return {
        "seconds": seconds,
        "steps": steps,
        "requests_per_s": len(ids) / seconds,
        "output_tokens_per_s": num_out / seconds,
        "total_tokens_per_s": (num_out + sum(map(len, workload.prompt_token_ids))) / seconds,
        **_summary("ttft_s", ttft),
        "first_ttft_s": min(ttft, default=None),
        **_summary("tpot_s", tpot),
        "kv_waste": (slots - stored) / stored if stored else 0.0,
        "kv_slots_allocated": slots,
        "kv_tokens_stored": stored,
        "kv_peak_pages": peak_pages,
        "peak_running_requests": peak_running,
        "kv_pool_pages": engine.pool.num_usable_pages,
        "device_timeline": steps_on_device,
        "compiles_after_warmup": compiles,
        "device_profile": profile,
        "outputs": [outputs[i] for i in ids],
    }


def _summary(name: str, values: list[float]) -> dict:
    """Mean, p50 and p99 of a latency (None without values)."""
    if not values:
        return {f"{stat}_{name}": None for stat in ("mean", "p50", "p99")}
    return {
        f"mean_{name}": float(np.mean(values)),
        f"p50_{name}": float(np.percentile(values, 50)),
        f"p99_{name}": float(np.percentile(values, 99)),
    }


class _NoSamples:
    """Stands in for the device's samples: page allocation does not depend on token values."""

    def __init__(self, num_rows: int):
        self.token_ids = np.ones(num_rows, np.int32)
        self.logprobs = np.zeros(num_rows, np.float32)


def replay_kv_waste(engine: LLMEngine, workload: Workload) -> dict:
    """KV waste of the workload's full lengths, served by the engine's scheduler and page pool with no model.

    Which pages a request holds depends only on its token counts (no EOS before the end), so this gives the
    exact waste of a long run in seconds, over more requests than the device could serve here."""
    config = engine.config
    pool = PagePool(engine.pool.num_pages, enable_prefix_caching=engine.pool.enable_prefix_caching)
    scheduler = Scheduler(
        pool,
        page_size=config.page_size,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=engine.max_model_len,
        reserve_max_tokens=config.kv_allocation == "reserved",
    )
    for i, (prompt, n) in enumerate(zip(workload.prompt_token_ids, workload.output_lens, strict=True)):
        params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0)
        scheduler.add_request(Request(f"replay-{i}", prompt, params))
    slots = stored = 0
    while scheduler.has_unfinished_requests:
        output = scheduler.schedule()
        scheduler.advance(output)
        scheduler.update_from_output(output, _NoSamples(len(output.scheduled)))
        step_slots, step_stored = kv_occupancy(scheduler.running, config.page_size)
        slots += step_slots
        stored += step_stored
    assert pool.num_free_pages == pool.num_usable_pages
    return {
        "requests": len(workload.output_lens),
        "page_size": config.page_size,
        "mean_prompt_tokens": float(np.mean([len(p) for p in workload.prompt_token_ids])),
        "mean_output_tokens": float(np.mean(workload.output_lens)),
        "kv_waste": (slots - stored) / stored,
    }


def hf_model_args(random_model, dtype: str) -> list[str]:
    """hf_throughput.py's model flags: the embedded SmolLM2, or random weights of a random model's shape (its
    values differ from the engine's, so only speed compares)."""
    if random_model is None:
        return []
    return ["--random_model", json.dumps(dataclasses.asdict(random_model)), "--dtype", dtype]


def requests_of(workload: Workload) -> list[dict]:
    """The workload as a side script's requests (scripts/peers.py)."""
    pairs = zip(workload.prompt_token_ids, workload.output_lens, strict=True)
    return [{"prompt_token_ids": p, "max_tokens": n} for p, n in pairs]


def run_hf(workload: Workload, batch_size: int, model_args: list[str]) -> dict:
    python = (
        FLAGS.hf_python or os.environ.get("JAXPAGE_HF_PYTHON") or str(ROOT / ".venv-hf" / "bin" / "python")
    )
    if not Path(python).exists():
        raise ValueError(
            f"--hf_python {python!r} does not exist; build the HF venv with `make test` or --hf=off"
        )
    script = ROOT / "scripts" / "hf_throughput.py"
    return peers.run_script(
        python, script, requests_of(workload), ["--batch_size", str(batch_size), *model_args]
    )


def main(argv):
    del argv
    if FLAGS.hf == "on":
        # HF runs in a second process while the engine holds its memory: by default JAX takes 75% of a GPU
        # up front, which would leave HF's 8B weights and KV cache too little. Half, before JAX starts.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    try:  # before the engine is built: a mistake costs nothing
        peers.check(FLAGS.peers)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    gin_files = FLAGS.gin_file or [str(ROOT / "configs" / "smollm2_135m.gin")]
    setup = gin_config.parse(gin_files, FLAGS.gin_bindings)
    start = time.perf_counter()
    engine = LLMEngine(
        setup.engine, random_model=setup.random_model, random_weight_scale=setup.random_weight_scale
    )
    engine_seconds = time.perf_counter() - start
    rng = np.random.default_rng(FLAGS.seed)
    replay = None
    if FLAGS.dataset == "sharegpt":
        full = sharegpt_workload(engine, max(FLAGS.num_prompts, FLAGS.kv_replay_prompts), rng)
        replay = replay_kv_waste(engine, full)
        n = FLAGS.num_prompts
        workload = Workload(full.prompt_token_ids[:n], full.output_lens[:n])
    else:
        # Token ids of the tokenizer: a model's vocabulary may be padded past it (ids no request may name).
        workload = synthetic_workload(engine.tokenizer.vocab_size, FLAGS.num_prompts, rng)
    if FLAGS.max_output_tokens > 0:
        workload.output_lens = [min(n, FLAGS.max_output_tokens) for n in workload.output_lens]

    start = time.perf_counter()
    compile_seconds = engine.warmup() if FLAGS.warmup else {}
    warmup_seconds = time.perf_counter() - start
    result = run_engine(engine, workload)
    print(f"jaxpage done in {result['seconds']:.1f} s", flush=True)
    on_cpu = jax.default_backend() == "cpu"
    hf = (
        run_hf(workload, FLAGS.hf_batch_size, hf_model_args(setup.random_model, engine.config.dtype))
        if FLAGS.hf == "on" or (FLAGS.hf == "auto" and on_cpu)
        else None
    )

    peer_records = {
        name: peers.compare(
            peers.run(name, requests_of(workload)), result["outputs"], result["output_tokens_per_s"]
        )
        for name in FLAGS.peers
    }

    prompt_lens = [len(p) for p in workload.prompt_token_ids]
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),  # quoted: it can be pasted and rerun
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "gin_config": gin_config.operative_config(),
        "dataset": FLAGS.dataset,
        "num_requests": len(prompt_lens),
        "prompt_tokens": {
            "total": sum(prompt_lens),
            "mean": float(np.mean(prompt_lens)),
            "max": max(prompt_lens),
        },
        "output_tokens": {"total": sum(workload.output_lens), "mean": float(np.mean(workload.output_lens))},
        "warmup": {
            "buckets": len(compile_seconds),
            "compile_seconds": sum(compile_seconds.values()),
            # Wall times of building the engine (tokenizer, weights, pool) and of its warm-up (every program
            # compiled or loaded from the persistent cache: cold when the cache was empty, warm when full).
            "engine_seconds": engine_seconds,
            "wall_seconds": warmup_seconds,
        },
        "engine": {k: v for k, v in result.items() if k != "outputs"},
        "kv_replay_full_sharegpt_lengths": replay,
    }
    if hf is not None:
        same = sum(a == b for a, b in zip(result["outputs"], hf["outputs"], strict=True))
        record["hf"] = {k: v for k, v in hf.items() if k != "outputs"}
        record["hf"]["output_tokens_per_s"] = hf["output_tokens"] / hf["generate_seconds"]
        # Random weights differ between the two: their outputs are not comparable.
        record["hf"]["identical_outputs"] = None if hf.get("random_model") else same
        record["speedup_vs_hf"] = result["seconds"] and hf["generate_seconds"] / result["seconds"]
    if peer_records:
        record["peers"] = peer_records

    out_dir = Path(FLAGS.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"throughput_{FLAGS.dataset}_{record['backend']}_{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(summary(record))
    print(f"written to {path}")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def summary(record: dict) -> str:
    e = record["engine"]
    lines = [
        f"{record['num_requests']} requests ({record['dataset']}), prompt tokens mean "
        f"{record['prompt_tokens']['mean']:.0f}, output tokens mean {record['output_tokens']['mean']:.0f}, "
        f"on {record['device']} ({record['backend']})",
        f"warm-up: {record['warmup']['buckets']} buckets compiled in "
        f"{record['warmup']['compile_seconds']:.1f} s (thread seconds); engine built in "
        f"{record['warmup']['engine_seconds']:.1f} s, warm-up {record['warmup']['wall_seconds']:.1f} s wall; "
        f"{e['compiles_after_warmup']} compilations while serving",
        f"jaxpage: {e['seconds']:.1f} s, {e['requests_per_s']:.2f} req/s, "
        f"{e['output_tokens_per_s']:.1f} output tok/s, {e['total_tokens_per_s']:.1f} total tok/s, "
        f"TTFT mean/p50/p99 {e['mean_ttft_s']:.2f}/{e['p50_ttft_s']:.2f}/{e['p99_ttft_s']:.2f} s, "
        f"TPOT mean/p50/p99 {_ms(e['mean_tpot_s'])}/{_ms(e['p50_tpot_s'])}/{_ms(e['p99_tpot_s'])} ms, "
        f"{e['steps']} steps, "
        f"peak {e.get('peak_running_requests', '?')} requests running at once",
        describe(e["device_timeline"]),
        *([describe_profile(e["device_profile"])] if e.get("device_profile") else []),
        f"KV pages: peak {e['kv_peak_pages']} of {e['kv_pool_pages']}; waste {100 * e['kv_waste']:.2f}% "
        f"({e['kv_slots_allocated'] - e['kv_tokens_stored']} idle slots per {e['kv_tokens_stored']} "
        "stored tokens, summed over steps)",
    ]
    replay = record["kv_replay_full_sharegpt_lengths"]
    if replay is not None:
        lines.append(
            f"KV waste on full ShareGPT lengths ({replay['requests']} requests, prompt mean "
            f"{replay['mean_prompt_tokens']:.0f}, output mean {replay['mean_output_tokens']:.0f}, page size "
            f"{replay['page_size']}; scheduler and pool replayed without the model): "
            f"{100 * replay['kv_waste']:.2f}%"
        )
    if "hf" in record:
        hf = record["hf"]
        lines.append(
            f"HF generate (batch {hf['batch_size']}, {hf.get('device', 'cpu')}, "
            f"{hf['torch_threads']} threads): "
            f"{hf['generate_seconds']:.1f} s, {hf['output_tokens_per_s']:.1f} output tok/s; "
            + (
                "random weights unlike the engine's: outputs not compared"
                if hf["identical_outputs"] is None
                else f"identical greedy outputs {hf['identical_outputs']}/{record['num_requests']}"
            )
        )
        lines.append(f"jaxpage / HF throughput: {record['speedup_vs_hf']:.2f}x")
    # From the start of building the engine (warm-up included) to the first and to the last token: a start
    # (cold or warm, as the compilation cache was), and what a small batch costs.
    ready = record["warmup"]["engine_seconds"] + record["warmup"]["wall_seconds"]
    if e.get("first_ttft_s") is not None:
        first = ready + e["first_ttft_s"]
        lines.append(f"jaxpage: {first:.1f} s from building the engine to the first token")
    lines.append(f"jaxpage: {ready + e['seconds']:.1f} s from building the engine to the last token")
    for name, peer in record.get("peers", {}).items():
        lines.append(
            f"{name} ({', '.join(f'{k} {v}' for k, v in peer['versions'].items())}; {peer['precision']}): "
            f"{peer['generate_seconds']:.1f} s, {peer['output_tokens_per_s']:.1f} output tok/s, "
            f"{peer['load_seconds'] + peer['generate_seconds']:.1f} s from loading to the last token; "
            f"identical outputs {peer['identical_outputs']}/{record['num_requests']} "
            f"({peer['identical_first_32_tokens']} on their first 32 tokens); "
            f"jaxpage / {name}: {peer['engine_speedup']:.2f}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
