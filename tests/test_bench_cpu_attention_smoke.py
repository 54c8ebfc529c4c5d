"""scripts/bench_cpu_attention.py end to end on a small pool: both attentions run and agree with the
reference; the timings themselves are not checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pallas_kernels import cpu_attention

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(cpu_attention.compiler() is None, reason="no C++ compiler on this machine")
def test_both_attentions_run_and_agree(tmp_path):
    command = [
        sys.executable, str(ROOT / "scripts" / "bench_cpu_attention.py"), "--num_pages", "64",
        "--tables", "2", "--calls", "2", "--cases", "2x1x40,1x20x30+2x1x17", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(
        command, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("cpu_attention_*.json")
    record = json.loads(path.read_text())
    assert [r["case"] for r in record["results"]] == ["2x1x40", "1x20x30+2x1x17"]
    for row in record["results"]:
        for name in ("cpu_kernel", "blocked"):
            assert row[name]["ms"] > 0 and row[name]["max_abs_error"] < 1e-5
    assert path.with_suffix(".md").exists()


def test_a_bad_case_is_a_usage_error(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "bench_cpu_attention.py"), "--cases", "2x5x3"]
    done = subprocess.run(
        command, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600
    )
    assert done.returncode != 0 and "'2x5x3' needs rows > 0 and 0 < tokens <= context" in done.stderr
