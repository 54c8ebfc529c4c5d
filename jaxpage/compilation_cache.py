"""JAX's persistent compilation cache: compiled step programs survive the process, so warm-up after the first
run loads executables from disk instead of compiling them again.

JAX writes an entry straight to its final name, so a process killed mid-write leaves a truncated entry. JAX
never trusts it (decompression fails its checksum; it warns and compiles again), but never replaces it either:
every later start would warn and recompile that program. So entries that do not decompress are deleted when
the directory is enabled, and JAX writes them afresh.
"""

import logging
import os
import uuid
from pathlib import Path

import jax
from jax._src.compilation_cache import decompress_executable  # JAX's own codec: zstd or zlib, as it wrote
from jax.experimental.compilation_cache import compilation_cache

logger = logging.getLogger(__name__)
_CHECKED = ".jaxpage-checked"  # its mtime: entries older than it were checked by an earlier start


def enable_compilation_cache(cache_dir: str | Path) -> None:
    """Caches every compiled program under `cache_dir`, however small or quick to compile.

    JAX reads the directory once, at the first compilation that consults it; pointing it elsewhere later needs
    a reset so the new directory is read.
    """
    path = str(Path(cache_dir).expanduser().resolve())
    Path(path).mkdir(parents=True, exist_ok=True)
    # Step programs compile in seconds, so the defaults (skip under 1 s or small entries) would skip some.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if jax.config.jax_compilation_cache_dir != path:
        _drop_damaged_entries(Path(path))
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()


def _drop_damaged_entries(cache_dir: Path) -> None:
    """Deletes the entries that do not decompress, checking only those written since the last check."""
    checked = cache_dir / _CHECKED
    checked_since = checked.stat().st_mtime_ns if checked.exists() else 0
    # Stamped before listing, on the filesystem's own clock: whatever is written to an entry after the stamp,
    # seen by this scan or not, makes it newer than the stamp, so the next start checks it.
    stamp = cache_dir / f"{_CHECKED}-{uuid.uuid4().hex[:8]}"
    try:
        stamp.touch()
    except OSError:  # a read-only cache: JAX could not write a replacement for what is deleted either
        return
    for entry in cache_dir.glob("*-cache"):
        try:
            if entry.stat().st_mtime_ns >= checked_since:
                decompress_executable(entry.read_bytes())
        except FileNotFoundError:  # another process removed it meanwhile
            continue
        except Exception as error:
            logger.warning("deleting damaged compilation cache entry %s: %s", entry.name, error)
            entry.unlink(missing_ok=True)
    os.replace(stamp, checked)
