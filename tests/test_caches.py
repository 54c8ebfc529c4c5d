"""The caches' default home (one user directory, whatever the working directory), and a compilation cache
whose entries were cut short or corrupted: never trusted, and repaired."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jax._src.compilation_cache import compress_executable, decompress_executable

from jaxpage.compilation_cache import _drop_damaged_entries
from jaxpage.config import EngineConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXPAGE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _cache_dirs() -> tuple[str, str]:
    config = EngineConfig()
    return config.compilation_cache_dir, config.checkpoint_cache_dir


def test_cache_defaults_do_not_depend_on_the_working_directory(tmp_path, monkeypatch, home):
    seen = set()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        seen.add(_cache_dirs())
    assert seen == {(str(home / ".cache/jaxpage/jax"), str(home / ".cache/jaxpage/checkpoints"))}


def test_cache_defaults_follow_the_environment(tmp_path, monkeypatch, home):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cache_dirs() == (str(tmp_path / "xdg/jaxpage/jax"), str(tmp_path / "xdg/jaxpage/checkpoints"))
    monkeypatch.setenv("JAXPAGE_CACHE_DIR", str(tmp_path / "mine"))
    assert _cache_dirs() == (str(tmp_path / "mine/jax"), str(tmp_path / "mine/checkpoints"))
    monkeypatch.delenv("JAXPAGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # not absolute: ignored, as the XDG spec says
    assert _cache_dirs() == (str(home / ".cache/jaxpage/jax"), str(home / ".cache/jaxpage/checkpoints"))
    config = EngineConfig(compilation_cache_dir=None, checkpoint_cache_dir=str(tmp_path / "ckpt"))
    assert config.compilation_cache_dir is None and config.checkpoint_cache_dir == str(tmp_path / "ckpt")


_GENERATE = """
import json, sys
import jaxpage
from jaxpage import SamplingParams

binding = f"EngineConfig.compilation_cache_dir = {sys.argv[1]!r}"
llm = jaxpage.LLM.from_gin(["configs/tiny_test.gin"], [binding])
outputs = llm.generate(["Hello there", "The capital of"], SamplingParams(max_tokens=8, temperature=0))
print(json.dumps([output.outputs[0].token_ids for output in outputs]))
"""


def _generate(cache_dir: Path) -> tuple[list, str]:
    """Greedy tokens from a tiny engine built in a fresh process on `cache_dir`, and its stderr."""
    run = subprocess.run(
        [sys.executable, "-c", _GENERATE, str(cache_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1]), run.stderr


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 8]) + data[middle + 8 :]


def test_damaged_compilation_cache_entries_are_recompiled_and_replaced(tmp_path):
    cache = tmp_path / "jax"
    tokens, _ = _generate(cache)
    entries = sorted(cache.glob("*-cache"))
    assert len(entries) >= 3
    for index, entry in enumerate(entries):  # cut short by a killed write, or corrupted on disk
        damage = (_truncate, _flip, lambda data: b"")[index % 3]
        entry.write_bytes(damage(entry.read_bytes()))
    # Without it, the step programs would load from the executable store, never asking JAX's cache.
    shutil.rmtree(cache / "jaxpage-executables")
    again, stderr = _generate(cache)
    assert again == tokens
    # Deleted before JAX read them (it would warn on every start, never replacing them), then written afresh.
    assert "Error reading persistent compilation cache" not in stderr
    assert "deleting damaged compilation cache entry" in stderr
    for entry in entries:
        decompress_executable(entry.read_bytes())


def test_entries_are_checked_once(tmp_path):
    good, cut = tmp_path / "jit_a-1-cache", tmp_path / "jit_b-2-cache"
    good.write_bytes(compress_executable(b"executable a"))
    cut.write_bytes(_truncate(compress_executable(b"executable b" * 100)))
    _drop_damaged_entries(tmp_path)
    assert good.exists() and not cut.exists()
    # Checked before: not read again (every start would otherwise read the whole cache). Written since: read.
    hour_ago = time.time() - 3600
    good.write_bytes(b"not read")
    os.utime(good, (hour_ago, hour_ago))
    cut.write_bytes(b"written since")
    _drop_damaged_entries(tmp_path)
    assert good.exists() and not cut.exists()
