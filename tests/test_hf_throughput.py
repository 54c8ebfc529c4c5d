"""scripts/hf_throughput.py with random weights of a given shape (the GPU benchmark's HF baseline, here on the
CPU): the model has that shape, and every request gets exactly the tokens it asked for."""

import dataclasses
import json
import subprocess
from pathlib import Path

from hf_referee import hf_python

from models.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent


def test_random_model_of_the_engines_shape_serves_every_request(tmp_path):
    shape = ModelConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_q_heads=4, num_kv_heads=2,
        head_dim=16,
    )  # fmt: skip
    requests = [{"prompt_token_ids": [5, 6, 7], "max_tokens": 4}, {"prompt_token_ids": [9], "max_tokens": 2}]
    (tmp_path / "requests.json").write_text(json.dumps({"requests": requests}))
    args = ["--random_model", json.dumps(dataclasses.asdict(shape)), "--dtype", "float32"]  # as the benchmark
    command = [
        str(hf_python()), str(ROOT / "scripts" / "hf_throughput.py"),
        "--requests", str(tmp_path / "requests.json"), "--batch_size", "2",
        "--output", str(tmp_path / "hf.json"), *args,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "hf.json").read_text())
    assert result["random_model"] and result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["model_shape"] == {
        "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "head_dim": 16,
    }  # fmt: skip
    assert [len(o) for o in result["outputs"]] == [4, 2]
    assert all(0 <= t < 300 for o in result["outputs"] for t in o)
    assert result["output_tokens"] == 6 and result["generated_tokens"] == 2 * 4
