"""The orbax cache of converted params: round trip, key changes, damaged entries rebuilt, never used."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import models.loaders
from models import checkpoint
from models.config import ModelConfig, RopeScaling
from models.loaders import load_model

CFG = ModelConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_q_heads=2,
    num_kv_heads=1,
    head_dim=8,
    qkv_bias=True,
    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
)


def _params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    flat = {k: rng.standard_normal(s).astype(cfg.jnp_dtype) for k, s in checkpoint.param_shapes(cfg).items()}
    return checkpoint.nest(flat)


def _assert_same(a, b):
    fa, fb = checkpoint.flatten(a), checkpoint.flatten(b)
    assert set(fa) == set(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_restore_round_trip(tmp_path, dtype):
    cfg = ModelConfig(**{**CFG.__dict__, "dtype": dtype})
    params = _params(cfg)
    checkpoint.save_cached(tmp_path, "k", cfg, params)
    restored_cfg, restored = checkpoint.restore_cached(tmp_path, "k")
    assert restored_cfg == cfg
    _assert_same(restored, params)
    assert checkpoint.restore_cached(tmp_path, "other") is None


@pytest.fixture
def counting_loader(monkeypatch, tmp_path):
    """An HF-directory source whose loader counts its calls; the params change with every call."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    calls = []

    def fake_load_hf(path, dtype):
        calls.append(dtype)
        cfg = ModelConfig(**{**CFG.__dict__, "dtype": dtype})
        return cfg, _params(cfg, seed=len(calls))

    monkeypatch.setattr(models.loaders, "load_hf", fake_load_hf)
    return source, calls


def test_second_load_comes_from_the_cache(tmp_path, counting_loader):
    source, calls = counting_loader
    cache = tmp_path / "cache"
    cfg1, p1 = load_model(source, cache_dir=cache)
    cfg2, p2 = load_model(source, cache_dir=cache)
    assert len(calls) == 1 and cfg1 == cfg2
    _assert_same(p1, p2)
    load_model(source, dtype="bfloat16", cache_dir=cache)  # the dtype is part of the key
    assert calls == ["float32", "bfloat16"]
    st = (source / "config.json").stat()
    os.utime(source / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # an edited source misses
    _, p3 = load_model(source, cache_dir=cache)
    assert len(calls) == 3
    _assert_same(p3, _params(cfg1, seed=3))


def _entry(cache):
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return entry


def _flip_bytes_in_largest_data_file(entry):
    files = [p for p in (entry / "params").rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    victim.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: (entry / "manifest.json").unlink(),  # a partial entry
        _flip_bytes_in_largest_data_file,  # silent corruption of the array bytes
        lambda entry: (entry / "manifest.json").write_text("{"),
        lambda entry: [p.unlink() for p in (entry / "params").rglob("*") if p.is_file()],
    ],
    ids=["no_manifest", "flipped_bytes", "bad_manifest", "no_arrays"],
)
def test_damaged_entry_is_rebuilt_not_used(tmp_path, counting_loader, damage):
    source, calls = counting_loader
    cache = tmp_path / "cache"
    load_model(source, cache_dir=cache)
    damage(_entry(cache))
    cfg, params = load_model(source, cache_dir=cache)
    assert len(calls) == 2  # rebuilt from the source...
    _assert_same(params, _params(cfg, seed=2))  # ...and what came back is the fresh conversion
    _, again = load_model(source, cache_dir=cache)  # the rebuilt entry is good
    assert len(calls) == 2
    _assert_same(again, params)


def test_manifest_not_matching_config_is_rejected(tmp_path):
    checkpoint.save_cached(tmp_path, "k", CFG, _params(CFG))
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    manifest["config"]["num_layers"] = 3
    (tmp_path / "k" / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint.restore_cached(tmp_path, "k") is None
    assert not (tmp_path / "k").exists()


def test_leftover_temporary_entry_is_ignored(tmp_path, counting_loader):
    source, calls = counting_loader
    cache = tmp_path / "cache"
    key = checkpoint.source_key(source, "float32")
    (cache / f".tmp-{key}-deadbeef" / "params").mkdir(parents=True)  # a crash mid-save
    load_model(source, cache_dir=cache)
    load_model(source, cache_dir=cache)
    assert len(calls) == 1


# Run in a child process: saves seed-99 params under the key, and SIGKILLs itself at the named point.
_KILLED_SAVE = """
import os, pathlib, signal, sys
sys.path.insert(0, "tests")
import test_checkpoint_cache as t
from models import checkpoint

cache, key, point = sys.argv[1:]
die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
if point == "before_manifest":  # the params are saved; the checksums come next
    checkpoint._crc32 = die
elif point == "mid_manifest":
    write_text = pathlib.Path.write_text
    pathlib.Path.write_text = lambda self, text: (write_text(self, text[: len(text) // 2]), die())
elif point == "before_rename":
    rename = os.rename
    os.rename = lambda src, dst: die() if pathlib.Path(dst).name == key else rename(src, dst)
checkpoint.save_cached(cache, key, t.CFG, t._params(t.CFG, seed=99))
"""


@pytest.mark.parametrize("point", ["before_manifest", "mid_manifest", "before_rename"])
def test_save_killed_midway_is_never_used_and_the_next_load_rebuilds(tmp_path, counting_loader, point):
    source, calls = counting_loader
    cache = tmp_path / "cache"
    key = checkpoint.source_key(source, "float32")
    repo = Path(__file__).resolve().parents[1]
    killed = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(cache), key, point], cwd=repo)
    assert killed.returncode == -signal.SIGKILL
    assert any(cache.iterdir())  # it got as far as writing something
    cfg, params = load_model(source, cache_dir=cache)
    assert calls == ["float32"]  # converted, not read from what the killed save left
    _assert_same(params, _params(cfg, seed=1))
    _, again = load_model(source, cache_dir=cache)
    assert len(calls) == 1
    _assert_same(again, params)


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def disk_full(array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_crc32", disk_full)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save_cached(tmp_path, "k", CFG, _params(CFG))
    assert list(tmp_path.iterdir()) == []


def test_temporary_entries_of_killed_saves_are_deleted_by_a_later_start(tmp_path):
    stale, live = tmp_path / ".tmp-a-00000000", tmp_path / ".tmp-b-11111111"
    for tmp in (stale, live):
        (tmp / "params").mkdir(parents=True)
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    assert checkpoint.restore_cached(tmp_path, "k") is None
    assert not stale.exists() and live.exists()  # a save still running is left alone
