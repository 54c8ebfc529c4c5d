"""scripts/peers.py: the plumbing that runs other engines on the benchmark's requests (their venvs are not
built in CI; a stand-in script takes their place)."""

import importlib.util
import sys
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parent.parent / "scripts" / "peers.py"
_spec = importlib.util.spec_from_file_location("peers", _path)
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)

# A peer that answers each request with its prompt's first token repeated, except request 1's last token.
STAND_IN = """
import argparse, json
parser = argparse.ArgumentParser()
parser.add_argument("--requests"); parser.add_argument("--output"); parser.add_argument("--flag")
args = parser.parse_args()
requests = json.load(open(args.requests))["requests"]
outputs = [[r["prompt_token_ids"][0]] * r["max_tokens"] for r in requests]
outputs[1][-1] = -1
json.dump(dict(load_seconds=1.0, generate_seconds=2.0, output_tokens=sum(r["max_tokens"] for r in requests),
               flag=args.flag, outputs=outputs), open(args.output, "w"))
"""


def test_a_side_script_serves_the_requests_and_is_compared_with_the_engine(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    requests = [{"prompt_token_ids": [5, 6], "max_tokens": 40}, {"prompt_token_ids": [7], "max_tokens": 40}]
    result = peers.run_script(sys.executable, script, requests, ["--flag", "x"])
    assert result["flag"] == "x" and result["outputs"][0] == [5] * 40
    engine_outputs = [[5] * 40, [7] * 40]  # request 1 differs at its last token only
    record = peers.compare(result, engine_outputs, engine_tokens_per_s=80.0)
    assert "outputs" not in record
    assert record["output_tokens_per_s"] == 40.0 and record["engine_speedup"] == 2.0
    assert record["identical_outputs"] == 1 and record["identical_first_32_tokens"] == 2


def test_an_unknown_peer_or_an_unbuilt_venv_is_named_before_anything_runs(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown peer 'sglang'; known: \['llamacpp', 'vllm'\]"):
        peers.check(["sglang"])
    monkeypatch.setattr(peers, "ROOT", tmp_path)
    with pytest.raises(
        ValueError, match=r"--peers vllm: .*\.venv-vllm/bin/python does not exist; .*make peers"
    ):
        peers.check(["vllm"])
