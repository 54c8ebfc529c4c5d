"""scripts/bench_multiturn.py end to end on the tiny model: both workloads run, the tier modes reuse the
history from the tier they name, and recompute reuses nothing; the timings themselves are not checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path, *flags) -> dict:
    command = [
        sys.executable, str(ROOT / "scripts" / "bench_multiturn.py"), "--gin_file", "configs/tiny_test.gin",
        "--output_tokens", "4", "--num_clients", "2", "--concurrency", "1", "--output_dir", str(tmp_path),
        "--disk_dir", str(tmp_path), *flags,
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("multiturn_*.json")
    return {r["mode"]: r for r in json.loads(path.read_text())["results"]}


def test_synthetic_conversations_reuse_their_history_from_the_named_tier(tmp_path):
    results = run(
        tmp_path, "--workload", "synthetic", "--num_rounds", "3", "--first_tokens", "100",
        "--new_tokens", "10", "--pool_pages", "20", "--modes", "host,host_on_eviction,disk",
        "--disk_host_pages", "2",
    )  # fmt: skip
    for mode, tier in (
        ("host", "host_hit_tokens"),
        ("host_on_eviction", "host_hit_tokens"),
        ("disk", "disk_hit_tokens"),
    ):
        later = results[mode]["by_turn"][1:]
        prompt_tokens = [row["prompt_tokens_mean"] * row["requests"] for row in later]
        # Most of the history reused, some of it from the tier.
        assert all(row[tier] > 0 for row in later), (mode, later)
        assert all(row["computed_tokens"] < n / 2 for row, n in zip(later, prompt_tokens, strict=True))
        assert results[mode]["num_compiles_after_warmup"] == 0
        assert results[mode]["kv_tier_write_through"] == (mode != "host_on_eviction")


def test_sharegpt_conversations_run_through_the_chat_template(tmp_path):
    results = run(tmp_path, "--workload", "sharegpt", "--max_turns", "2", "--modes", "recompute")
    turn2 = results["recompute"]["by_turn"][1]
    assert turn2["turn"] == 2 and turn2["computed_tokens"] == turn2["prompt_tokens_mean"] * turn2["requests"]
