"""scripts/bench_projections.py end to end on the tiny shape: both weight layouts run and compute the same
activations; the timings themselves are not checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_both_layouts_run_and_agree(tmp_path):
    command = [
        sys.executable, str(ROOT / "scripts" / "bench_projections.py"), "--config", "tiny",
        "--dtype", "float32", "--rows", "4,16", "--calls", "1", "--hbm_gib", "0.001",
        "--output_dir", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(
        command, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("projections_*.json")
    record = json.loads(path.read_text())
    assert [(r["rows"], r["layout"]) for r in record["rows"]] == [
        (4, "separate"), (4, "fused"), (16, "separate"), (16, "fused"),
    ]  # fmt: skip
    assert all(r["seconds"] > 0 and r["max_abs_diff_vs_separate"] < 1e-5 for r in record["rows"])
    assert "output_dir" not in record["command"]
