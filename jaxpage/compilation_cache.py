"""JAX's persistent compilation cache: compiled step programs survive the process, so warm-up after the first
run loads executables from disk instead of compiling them again."""

from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache


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
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()
