"""The param tree's layout, and an orbax cache of converted params so a second start skips conversion.

A cache entry is a directory `<cache_dir>/<key>/` holding `params/` (an orbax checkpoint) and `manifest.json`
(config, and every leaf's shape, dtype and CRC-32). Entries are built under a temporary name and renamed into
place, so a crash never leaves a half-written entry under a real key; an entry whose manifest is missing or
whose arrays do not match it is deleted and rebuilt, never used. A temporary entry is never read: a failed
save deletes its own, and one left by a killed process is deleted by a later start.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from models.config import ModelConfig, RopeScaling

_log = logging.getLogger(__name__)
_CACHE_VERSION = 1  # bump when the param layout or the entry format changes: old entries are then never hit
# A temporary entry untouched this long belongs to a killed save (a live one finishes in minutes).
_STALE_TMP_SECONDS = 3600
# Param kinds stored [in, out] (HF's `weight.T`); everything else keeps the source layout.
LINEAR_WEIGHTS = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head"})


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat param key ("layers_3/wq") -> shape, exactly the leaves of the tree in docs/architecture.md."""
    hidden, q_dim, kv_dim = cfg.hidden_size, cfg.num_q_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    inter = cfg.intermediate_size
    shapes = {"embed": (cfg.vocab_size, hidden)}
    for i in range(cfg.num_layers):
        layer = {
            "attn_norm": (hidden,),
            "wq": (hidden, q_dim),
            "wk": (hidden, kv_dim),
            "wv": (hidden, kv_dim),
            "wo": (q_dim, hidden),
            "mlp_norm": (hidden,),
            "w_gate": (hidden, inter),
            "w_up": (hidden, inter),
            "w_down": (inter, hidden),
        }
        if cfg.qkv_bias:
            layer.update(bq=(q_dim,), bk=(kv_dim,), bv=(kv_dim,))
        shapes.update({f"layers_{i}/{k}": v for k, v in layer.items()})
    shapes["final_norm"] = (hidden,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (hidden, cfg.vocab_size)
    return shapes


def nest(flat: dict) -> dict:
    """{"layers_0/wq": a} -> {"layers_0": {"wq": a}}."""
    tree = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict:
    """Inverse of `nest`."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _source_files(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.suffix in (".json", ".safetensors"))
    return [source]


def source_key(source: str | Path, dtype: str) -> str:
    """Cache key of a checkpoint: its files' identity (path, size, mtime) and the target dtype.

    A re-downloaded or edited checkpoint changes size or mtime, so it misses the cache instead of hitting a
    stale entry; hashing the contents would cost as much as converting.
    """
    source = Path(source).resolve()
    ident = [_CACHE_VERSION, dtype]
    for f in _source_files(source):
        st = f.stat()
        ident.append([str(f), st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", source.stem if source.is_file() else source.name)
    return f"{stem}-{dtype}-{digest}"


def _checkpointer() -> ocp.PyTreeCheckpointer:
    # Uncompressed: zstd saves a third of the disk but costs more time to decode than reading the bytes does,
    # and the cache exists to save time.
    return ocp.PyTreeCheckpointer(use_compression=False, use_zarr3=True)


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _config_from_json(d: dict) -> ModelConfig:
    scaling = d.pop("rope_scaling")
    return ModelConfig(**d, rope_scaling=RopeScaling(**scaling) if scaling else None)


def save_cached(cache_dir: str | Path, key: str, cfg: ModelConfig, params: dict) -> Path:
    """Writes one cache entry (numpy or jax leaves) and returns its directory."""
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    try:
        with _checkpointer() as ckptr:
            ckptr.save(tmp / "params", nest(flat))
        leaves = {
            k: {"shape": list(v.shape), "dtype": str(v.dtype), "crc32": _crc32(v)} for k, v in flat.items()
        }
        manifest = {"version": _CACHE_VERSION, "config": dataclasses.asdict(cfg), "leaves": leaves}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    except BaseException:  # a full disk or a Ctrl-C would otherwise leave a model-sized directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entry = cache_dir / key
    if entry.exists():  # a corrupt entry, or another process finished the same key first
        shutil.rmtree(entry, ignore_errors=True)
    try:
        os.rename(tmp, entry)
    except OSError:  # lost a race to an identical entry: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _restore_verified(entry: Path) -> tuple[ModelConfig, dict]:
    """Restores an entry; raises ValueError if anything does not match its manifest."""
    manifest_path = entry / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError("manifest.json is missing (partial entry)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") != _CACHE_VERSION:
        raise ValueError(f"entry version {manifest.get('version')} != {_CACHE_VERSION}")
    cfg = _config_from_json(manifest["config"])
    leaves = manifest["leaves"]
    if set(leaves) != set(param_shapes(cfg)):
        raise ValueError("manifest leaves do not match the config's param tree")
    with _checkpointer() as ckptr:
        flat = flatten(ckptr.restore(entry / "params"))
    if set(flat) != set(leaves):
        raise ValueError(f"restored leaves {sorted(set(flat) ^ set(leaves))} differ from the manifest")
    for key, want in leaves.items():
        a = np.asarray(flat[key])
        got = {"shape": list(a.shape), "dtype": str(a.dtype), "crc32": _crc32(a)}
        if got != want:
            raise ValueError(f"leaf {key} is {got}, manifest says {want}")
        flat[key] = a
    return cfg, nest(flat)


def restore_cached(cache_dir: str | Path, key: str) -> tuple[ModelConfig, dict] | None:
    """Returns (config, params as numpy) from the cache, or None on a miss.

    A damaged entry (partial, unreadable, or not matching its checksums) is deleted and reported as a miss;
    temporary entries left by killed saves are deleted too.
    """
    cache_dir = Path(cache_dir).resolve()
    for tmp in cache_dir.glob(".tmp-*"):
        with contextlib.suppress(FileNotFoundError):  # another start may remove it first
            if time.time() - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
    entry = cache_dir / key
    if not entry.exists():
        return None
    try:
        return _restore_verified(entry)
    except Exception as e:  # any failure to read means the entry cannot be trusted; rebuild it
        _log.warning("discarding damaged checkpoint cache entry %s: %s", entry, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None
