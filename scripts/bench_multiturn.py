"""Multi-turn conversations: time to first token by turn, with the history's K/V reused or recomputed.

Two workloads, as the field measures them:
- synthetic (SGLang's bench_multiturn): --num_clients clients, --num_rounds rounds each; a client's first
  prompt is --first_tokens random token ids, each later round appends its last reply and --new_tokens more,
  and every reply is --output_tokens long.
- sharegpt (the AttentionStore paper's): ShareGPT conversations with at least two user turns, replayed turn by
  turn through `Conversation` (the chat template; each reply as long as the recorded one, at most
  --output_tokens), up to --max_turns turns or until a turn would outgrow max_model_len.

Clients run concurrently, at most --concurrency turns in flight, the clients furthest behind first: a client's
next turn arrives an exponential think time (mean --think_time s) after its last reply, so turns of different
clients interleave and a small device pool (--pool_pages) evicts the sessions of clients that wait. With
--concurrency 1 the turns go round the clients one at a time, and TTFT is the prefill alone (no queueing).
Modes (--modes):
- recompute: no prefix cache; every turn computes its whole prompt.
- gpu: the prefix cache in the device pool only.
- host: tiers under the pool: host memory of --host_pages pages, each page saved as the engine's
  kv_tier_write_through says (by default when it fills; --gin_bindings may say otherwise).
- host_sync: the same, with every save and load waiting for its copy (what the asynchronous copies buy).
- host_on_eviction: the same as host, pages saved only when the pool evicts them.
- disk: a host tier of --disk_host_pages pages over a disk tier (a fresh directory under --disk_dir), with the
  look-ahead (queued requests' pages read from disk and loaded from host memory while they wait, and every
  tier evicting the pages they want last); pages saved as in host.
- disk_lru: the same without the look-ahead: plain LRU, tier reads when a request is admitted.

Per mode and turn index it prints and records mean and p90 TTFT, prompt tokens computed and where the
history's K/V came from (device, host, disk, miss), and the mode's output throughput; the JSON goes to
--output_dir with a PNG of TTFT by turn (when matplotlib is installed).

  python scripts/bench_multiturn.py --workload synthetic --num_clients 4 --num_rounds 4
"""

import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import sharegpt
from absl import app, flags

from jaxpage import SamplingParams, gin_config
from jaxpage.conversation import Turn
from jaxpage.llm import LLM
from jaxpage.runner import kv_bytes_per_page

ROOT = Path(__file__).resolve().parent.parent
MODES = ("recompute", "gpu", "host", "host_sync", "host_on_eviction", "disk", "disk_lru")

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", None, "Gin config file(s); default configs/smollm2_135m.gin.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied after the files.")
flags.DEFINE_enum("workload", "synthetic", ["synthetic", "sharegpt"], "Where conversations come from.")
flags.DEFINE_integer("num_clients", 4, "Conversations served at once.")
flags.DEFINE_integer("num_rounds", 4, "synthetic: turns per client.")
flags.DEFINE_integer("first_tokens", 1024, "synthetic: tokens of a client's first prompt.")
flags.DEFINE_integer("new_tokens", 64, "synthetic: tokens a later round adds after the last reply.")
flags.DEFINE_integer("output_tokens", 32, "synthetic: tokens of every reply; sharegpt: the most of one.")
flags.DEFINE_integer("max_turns", 6, "sharegpt: the most turns replayed of a conversation.")
flags.DEFINE_integer("concurrency", 1000, "The most clients with a turn in flight at once.")
flags.DEFINE_float("think_time", 0.0, "Mean seconds between a client's reply and its next turn.")
flags.DEFINE_list("modes", ["recompute", "host", "disk"], f"Any of {MODES}.")
flags.DEFINE_integer("pool_pages", 256, "Pages of the device pool (with the null page).")
flags.DEFINE_integer("host_pages", 4096, "Host tier pages of mode host.")
flags.DEFINE_integer("disk_host_pages", 8, "Host tier pages of mode disk (the rest spills to disk).")
flags.DEFINE_integer("disk_pages", 8192, "Disk tier pages of mode disk.")
flags.DEFINE_string("disk_dir", None, "Where mode disk makes its directory; default the system's temp dir.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic tokens, conversation choice and think times.")
flags.DEFINE_string("output_dir", str(ROOT / "benchmarks" / "results"), "Where the JSON and PNG go.")


class Client:
    """One conversation: its turns, what it has run so far, and when its next turn arrives."""

    def __init__(self, index: int, turns: list, llm: LLM, rng: np.random.Generator):
        self.index, self.turns, self.rng = index, turns, rng
        self.chat = llm.conversation() if FLAGS.workload == "sharegpt" else None
        self.token_ids: list[int] = []  # synthetic: the history so far
        self.turn = 0
        self.ready_at = 0.0

    def next_prompt(self) -> tuple[list[int], int, Turn | None]:
        """(prompt token ids, output length, the conversation's `Turn` or None) of the next turn."""
        turn = self.turns[self.turn]
        if self.chat is None:
            return self.token_ids + turn, FLAGS.output_tokens, None
        text, reply_len = turn
        out_len = min(reply_len, FLAGS.output_tokens)
        turn = self.chat.next_turn(text, out_len)
        return turn.prompt_token_ids, out_len, turn

    def finished(self, prompt, turn: Turn | None, output, now: float) -> None:
        if self.chat is None:
            self.token_ids = prompt + list(output.outputs[0].token_ids)
        else:
            self.chat.add_reply(turn, output)
        self.turn += 1
        self.ready_at = now + self.rng.exponential(FLAGS.think_time) if FLAGS.think_time else now


def conversations(llm: LLM, rng: np.random.Generator) -> list[list]:
    if FLAGS.workload == "synthetic":
        vocab = llm.tokenizer.vocab_size

        def tokens(n):
            return rng.integers(1, vocab, n).tolist()

        first = [tokens(FLAGS.first_tokens) for _ in range(FLAGS.num_clients)]
        return [[f] + [tokens(FLAGS.new_tokens) for _ in range(FLAGS.num_rounds - 1)] for f in first]
    chosen = []
    everything = list(sharegpt.conversations())
    for index in rng.permutation(len(everything)):
        turns = [(q, len(llm.tokenizer.encode(a))) for q, a in everything[index][: FLAGS.max_turns]]
        if len(turns) >= 2 and all(q.strip() and n > 0 for q, n in turns):
            chosen.append(turns)
        if len(chosen) == FLAGS.num_clients:
            return chosen
    raise ValueError(f"only {len(chosen)} ShareGPT conversations have two user turns or more")


def mode_bindings(mode: str, bytes_per_page: int) -> list[str]:
    def gib(num_pages: int) -> str:
        return repr(num_pages * bytes_per_page / 2**30)

    bindings = [f"EngineConfig.num_pages = {FLAGS.pool_pages}"]
    if mode == "recompute":
        return bindings + ["EngineConfig.enable_prefix_caching = False"]
    if mode in ("host", "host_sync", "host_on_eviction"):
        bindings += [
            f"EngineConfig.kv_host_cache_gib = {gib(FLAGS.host_pages)}",
            f"EngineConfig.kv_tier_sync_transfers = {mode == 'host_sync'}",
        ]
        if mode == "host_on_eviction":
            bindings.append("EngineConfig.kv_tier_write_through = False")
        return bindings
    if mode in ("disk", "disk_lru"):
        directory = tempfile.mkdtemp(prefix="jaxpage-kv-", dir=FLAGS.disk_dir)
        return bindings + [
            f"EngineConfig.kv_host_cache_gib = {gib(FLAGS.disk_host_pages)}",
            f"EngineConfig.kv_disk_cache_dir = '{directory}'",
            f"EngineConfig.kv_disk_cache_gib = {gib(FLAGS.disk_pages)}",
            f"EngineConfig.kv_tier_lookahead = {mode == 'disk'}",
        ]
    return bindings


def run_mode(mode: str, gin_files: list[str], bytes_per_page: int) -> dict:
    rng = np.random.default_rng(FLAGS.seed)
    llm = LLM.from_gin(gin_files, FLAGS.gin_bindings + mode_bindings(mode, bytes_per_page))
    start = time.perf_counter()
    llm.engine.warmup()
    warmup_seconds = time.perf_counter() - start
    clients = [Client(i, turns, llm, np.random.default_rng([FLAGS.seed, i])) for i, turns in enumerate(
        conversations(llm, rng))]  # fmt: skip
    engine, records, in_flight = llm.engine, [], {}
    start = time.monotonic()
    output_tokens = 0
    while any(c.turn < len(c.turns) for c in clients) or in_flight:
        now = time.monotonic()
        ready = [
            c for c in clients if c.turn < len(c.turns) and c.index not in in_flight and c.ready_at <= now
        ]
        # The clients furthest behind go first, so with --concurrency 1 the turns go round the clients.
        for client in sorted(ready, key=lambda c: (c.turn, c.ready_at, c.index)):
            if len(in_flight) < FLAGS.concurrency:
                prompt, out_len, turn = client.next_prompt()
                if len(prompt) + out_len > engine.max_model_len:
                    client.turn = len(client.turns)  # the conversation outgrew the context: it ends here
                    continue
                params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
                options = turn.request_options if turn is not None else {}
                in_flight[client.index] = (engine.add_request(prompt, params, **options), prompt, turn)
        if not engine.has_unfinished_requests():
            time.sleep(0.001)  # every client is thinking
            continue
        for output in engine.step():
            if not output.finished:
                continue
            client = next(c for c in clients if in_flight.get(c.index, (None,))[0] == output.request_id)
            _, prompt, turn = in_flight.pop(client.index)
            m = output.metrics
            host, disk = m.tier_hit_tokens["host"], m.tier_hit_tokens["disk"]
            records.append({
                "client": client.index, "turn": client.turn, "ttft": m.ttft, "prompt_tokens": len(prompt),
                "cached_tokens": m.num_cached_tokens, "gpu_hit_tokens": m.num_cached_tokens - host - disk,
                "host_hit_tokens": host, "disk_hit_tokens": disk,
                "computed_tokens": len(prompt) - m.num_cached_tokens,
            })  # fmt: skip
            output_tokens += len(output.outputs[0].token_ids)
            client.finished(prompt, turn, output, time.monotonic())
    seconds = time.monotonic() - start
    metrics = engine.metrics()
    result = {
        "mode": mode,
        "warmup_seconds": warmup_seconds,
        "seconds": seconds,
        "output_tokens_per_s": output_tokens / seconds,
        "num_compiles_after_warmup": metrics.num_compiles_after_warmup,
        "by_turn": by_turn(records),
        "requests": records,
    }
    if engine.store is not None:
        # The file's gin_config is the last mode's: each tier mode records how its pages were saved.
        result["kv_tier_write_through"] = engine.config.kv_tier_write_through
        result["prefetched_pages"] = engine.store.num_prefetched
        result["host_prefetched_pages"] = metrics.host_prefetched_pages
    if engine.store is not None and engine.store.disk is not None:
        result["disk_bad_files"] = engine.store.disk.num_bad_files
    engine.close()
    return result


def by_turn(records: list[dict]) -> list[dict]:
    rows = []
    for turn in sorted({r["turn"] for r in records}):
        group = [r for r in records if r["turn"] == turn]
        ttft = np.array([r["ttft"] for r in group])
        rows.append({
            "turn": turn + 1, "requests": len(group), "ttft_mean": float(ttft.mean()),
            "ttft_p90": float(np.percentile(ttft, 90)),
            "prompt_tokens_mean": float(np.mean([r["prompt_tokens"] for r in group])),
            **{k: int(sum(r[k] for r in group)) for k in (
                "computed_tokens", "gpu_hit_tokens", "host_hit_tokens", "disk_hit_tokens")},
        })  # fmt: skip
    return rows


def table(results: list[dict]) -> str:
    lines = ["mode               turn  reqs  prompt  TTFT mean   p90     computed  device   host    disk"]
    for result in results:
        mode = result["mode"]
        for row in result["by_turn"]:
            lines.append(
                f"{mode:<18} {row['turn']:>4} {row['requests']:>5} {row['prompt_tokens_mean']:>7.0f}"
                f" {row['ttft_mean'] * 1e3:>8.0f} ms {row['ttft_p90'] * 1e3:>6.0f} ms"
                f" {row['computed_tokens']:>8} {row['gpu_hit_tokens']:>7} {row['host_hit_tokens']:>7}"
                f" {row['disk_hit_tokens']:>7}"
            )
        lines.append(
            f"{mode:<18} {result['seconds']:.1f} s, {result['output_tokens_per_s']:.1f} output tok/s, "
            f"{result['num_compiles_after_warmup']} compilations after warm-up"
            + (
                f", look-ahead: {result['prefetched_pages']} pages read from disk, "
                f"{result['host_prefetched_pages']} loaded from host memory"
                if "host_prefetched_pages" in result
                else ""
            )
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for result in results:
        rows = result["by_turn"]
        ax.plot(
            [r["turn"] for r in rows], [r["ttft_mean"] * 1e3 for r in rows], marker="o", label=result["mode"]
        )
    ax.set_xticks([row["turn"] for row in results[0]["by_turn"]])
    ax.set_xlabel("turn")
    ax.set_ylabel("mean TTFT (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{FLAGS.workload}: TTFT by turn ({jax.devices()[0].device_kind})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv):
    del argv
    for mode in FLAGS.modes:
        if mode not in MODES:
            raise app.UsageError(f"--modes: {mode!r} is not one of {MODES}")
    gin_files = FLAGS.gin_file or [str(ROOT / "configs" / "smollm2_135m.gin")]
    # Tier sizes are given in pages; the engine takes GiB, and a page's bytes depend on the model (which only
    # an engine loads, unless its weights are random).
    setup = gin_config.parse(gin_files, FLAGS.gin_bindings)
    model_config = setup.random_model
    if model_config is None:
        probe = LLM.from_gin(gin_files, FLAGS.gin_bindings + [f"EngineConfig.num_pages = {FLAGS.pool_pages}"])
        model_config = probe.engine.model_config
        del probe
    model_config = dataclasses.replace(model_config, dtype=setup.engine.dtype)
    bytes_per_page = kv_bytes_per_page(model_config, setup.engine.page_size)
    results = []
    for mode in FLAGS.modes:
        results.append(run_mode(mode, gin_files, bytes_per_page))
        print(table(results[-1:]), flush=True)
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "gin_config": gin_config.operative_config(),
        "workload": FLAGS.workload,
        "results": results,
    }
    baseline = next((r for r in results if r["mode"] == "recompute"), None)
    if baseline is not None:
        # TTFT saved at turns >= 2, per mode, against recompute.
        base = {row["turn"]: row["ttft_mean"] for row in baseline["by_turn"]}
        record["ttft_reduction_vs_recompute"] = {
            r["mode"]: {row["turn"]: 1 - row["ttft_mean"] / base[row["turn"]] for row in r["by_turn"][1:]}
            for r in results
            if r is not baseline
        }
    out_dir = Path(FLAGS.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"multiturn_{FLAGS.workload}_{record['backend']}_{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(table(results))
    for mode, reduction in record.get("ttft_reduction_vs_recompute", {}).items():
        print(f"{mode}: mean TTFT lower than recompute by " + ", ".join(
            f"turn {t} {v:.1%}" for t, v in reduction.items()))  # fmt: skip
    png = path.with_suffix(".png")
    print(f"written to {path}" + (f" and {png}" if plot(results, png) else " (no plot: matplotlib missing)"))


if __name__ == "__main__":
    app.run(main)
