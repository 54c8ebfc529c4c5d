"""scripts/bench_decode_step.py end to end on a tiny model in interpret mode: the plumbing and the check of
both decode paths against the reference, not the timings."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_checks_both_paths_and_records_no_output_dir(tmp_path):
    command = [
        sys.executable, str(ROOT / "scripts" / "bench_decode_step.py"), "--attention", "pallas_interpret",
        "--config", "tiny", "--dtype", "float32", "--batch_sizes", "3", "--contexts", "40", "--calls", "1",
        "--hbm_gib", "0.001", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = tmp_path.glob("decode_step_*.json")
    record = json.loads(json_path.read_text())
    (row,) = record["rows"]
    assert (row["batch"], row["context"]) == (3, 40)
    assert row["ok"] and row["argmax_equal_reference"] == {"ragged": 3, "decode": 3}
    assert max(row["rel_error_vs_reference"].values()) < 1e-4  # float32: one path, not just close
    assert set(row["seconds"]) == {"ragged", "decode", "reference"} and row["hbm_floor_s"] > 0
    assert "output_dir" not in record["command"] and "--calls 1" in record["command"]
    assert json_path.with_suffix(".md").read_text().count("| 3 | 40 |") == 1
