"""Other engines on the throughput benchmark's requests, each run by its own script in its own side venv.

A side script takes `--requests requests.json --output result.json` (requests: {"requests":
[{"prompt_token_ids": [int], "max_tokens": int}]}) and writes JSON with load_seconds, generate_seconds,
output_tokens, precision, settings, versions and `outputs` (token ids per request): scripts/hf_throughput.py
(HF transformers, .venv-hf) and the peers below (`make peers` builds their venvs).
"""

import json
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Peer engine -> (its script under scripts/, its side venv).
PEERS = {"vllm": ("peer_vllm.py", ".venv-vllm"), "llamacpp": ("peer_llamacpp.py", ".venv-llamacpp")}


def check(names: list[str]) -> None:
    """Before the engine's run: every peer is known and its venv is built (a ValueError naming it if not)."""
    for name in names:
        if name not in PEERS:
            raise ValueError(f"--peers: unknown peer {name!r}; known: {sorted(PEERS)}")
        python = ROOT / PEERS[name][1] / "bin" / "python"
        if not python.exists():
            raise ValueError(f"--peers {name}: {python} does not exist; build it with `make peers`")


def run(name: str, requests: list[dict]) -> dict:
    script, venv = PEERS[name]
    return run_script(ROOT / venv / "bin" / "python", ROOT / "scripts" / script, requests)


def run_script(python: str | Path, script: str | Path, requests: list[dict], args: list[str] = ()) -> dict:
    """Runs `script` with `python` on the requests; returns its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "requests.json").write_text(json.dumps({"requests": requests}))
        command = [
            str(python),
            str(script),
            "--requests",
            f"{tmp}/requests.json",
            "--output",
            f"{tmp}/out.json",
        ]
        subprocess.run([*command, *args], check=True, cwd=ROOT)
        return json.loads((Path(tmp) / "out.json").read_text())


def compare(peer: dict, engine_outputs: list[list[int]], engine_tokens_per_s: float) -> dict:
    """The peer's record: its result without the token ids, its output rate, how many of its outputs equal the
    engine's (whole, and over their first 32 tokens), and the engine's speed relative to it."""
    record = {k: v for k, v in peer.items() if k != "outputs"}
    pairs = list(zip(engine_outputs, peer["outputs"], strict=True))
    record["output_tokens_per_s"] = peer["output_tokens"] / peer["generate_seconds"]
    record["identical_outputs"] = sum(a == b for a, b in pairs)
    record["identical_first_32_tokens"] = sum(a[:32] == b[:32] for a, b in pairs)
    record["engine_speedup"] = engine_tokens_per_s / record["output_tokens_per_s"]
    return record
