"""Prefix caching on requests that share a long system prompt: hit rate and prefill time saved.

Requests arrive one after another (as turns of separate chats with one system prompt would), each a chat of
the shared system prompt and its own question, greedy, a few output tokens. The same workload runs with
prefix caching off and on; each engine first serves it once with another system prompt of the same length, so
every shape is compiled before timing. Prints, per setting, the hit rate, the prompt tokens actually computed,
the mean time to first token, and the wall time; then the prefill time saved. Results go to --output as JSON
with the device, date, JAX version and command.

  python scripts/bench_prefix_cache.py --num_requests 16 --system_words 300
"""

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
from absl import app, flags

from jaxpage import LLM, SamplingParams, gin_config

ROOT = Path(__file__).resolve().parent.parent

flags.DEFINE_multi_string("gin_file", None, "Gin config file(s); default configs/smollm2_135m.gin.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied after the files.")
flags.DEFINE_integer("num_requests", 16, "Requests sharing the system prompt.")
flags.DEFINE_integer("system_words", 300, "Words of the shared system prompt.")
flags.DEFINE_integer("max_tokens", 4, "Output tokens per request.")
flags.DEFINE_string(
    "output", None, "JSON file for the results; default benchmarks/results/prefix_cache_<device>.json."
)
FLAGS = flags.FLAGS

WORDS = "page cache token prefix model request batch kernel memory device attention layer".split()
QUESTIONS = ["What is {}?", "Explain {} briefly.", "Why does {} matter?", "Give an example of {}."]


def system_prompt(seed: int, num_words: int) -> str:
    words = [WORDS[(seed * 7 + i * 5 + i * i) % len(WORDS)] for i in range(num_words)]
    return "You are an assistant for a team. Background notes: " + " ".join(words) + "."


def conversations(system: str, num_requests: int) -> list[list[dict]]:
    return [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": QUESTIONS[i % 4].format(WORDS[i % len(WORDS)]) + f" (#{i})"},
        ]
        for i in range(num_requests)
    ]


def run(llm: LLM, chats: list[list[dict]], params: SamplingParams) -> dict:
    engine = llm.engine
    before = engine.metrics()
    ttfts, computed, outputs = [], 0, []
    start = time.perf_counter()
    for chat in chats:
        (output,) = llm.generate(chat, params)
        ttfts.append(output.metrics.ttft)
        computed += output.metrics.num_prompt_tokens - output.metrics.num_cached_tokens
        outputs.append(output.outputs[0].token_ids)
    wall = time.perf_counter() - start
    after = engine.metrics()
    query = after.prefix_query_tokens - before.prefix_query_tokens
    hits = after.prefix_hit_tokens - before.prefix_hit_tokens
    return {
        "hit_rate": hits / query,
        "prompt_tokens": query,
        "prompt_tokens_computed": computed,
        "mean_ttft_s": statistics.mean(ttfts),
        "wall_s": wall,
        "outputs": outputs,
    }


def main(argv):
    del argv
    setup = gin_config.parse(
        FLAGS.gin_file or [str(ROOT / "configs" / "smollm2_135m.gin")], FLAGS.gin_bindings
    )
    params = SamplingParams(max_tokens=FLAGS.max_tokens, temperature=0, ignore_eos=True)
    results = {}
    for caching in (False, True):
        config = dataclasses.replace(setup.engine, enable_prefix_caching=caching)
        llm = LLM(config, random_model=setup.random_model, random_weight_scale=setup.random_weight_scale)
        run(llm, conversations(system_prompt(1, FLAGS.system_words), FLAGS.num_requests), params)  # compile
        results["on" if caching else "off"] = run(
            llm, conversations(system_prompt(2, FLAGS.system_words), FLAGS.num_requests), params
        )
    on, off = results["on"], results["off"]
    assert on["outputs"] == off["outputs"], "prefix caching changed a greedy output"
    for result in results.values():
        del result["outputs"]

    device = jax.devices()[0]
    device_name = f"CPU ({os.cpu_count()} cores)" if device.platform == "cpu" else device.device_kind
    record = {
        "benchmark": "prefix_cache",
        "device": device_name,
        "date": datetime.date.today().isoformat(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python", *sys.argv]),
        "num_requests": FLAGS.num_requests,
        "system_words": FLAGS.system_words,
        "max_tokens": FLAGS.max_tokens,
        "caching_off": off,
        "caching_on": on,
        "mean_ttft_saved_s": off["mean_ttft_s"] - on["mean_ttft_s"],
        "wall_saved_fraction": 1 - on["wall_s"] / off["wall_s"],
    }
    print(
        f"{'prefix caching':>15} {'hit rate':>9} {'computed/prompt tokens':>23} {'mean TTFT':>10} {'wall':>8}"
    )
    for name, result in (("off", off), ("on", on)):
        tokens = f"{result['prompt_tokens_computed']}/{result['prompt_tokens']}"
        print(
            f"{name:>15} {result['hit_rate']:>9.1%} {tokens:>23} {result['mean_ttft_s'] * 1e3:>8.1f}ms "
            f"{result['wall_s']:>7.2f}s"
        )
    print(
        f"prefill time saved: {record['mean_ttft_saved_s'] * 1e3:.1f} ms per request (mean TTFT), "
        f"{record['wall_saved_fraction']:.1%} of the wall time"
    )
    output = Path(FLAGS.output or ROOT / "benchmarks" / "results" / f"prefix_cache_{device.platform}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    app.run(main)
