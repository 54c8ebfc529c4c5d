"""Ragged paged attention on XLA:CPU through a small C++ kernel (cpu_attention.cc) called via the XLA FFI:
same signature and semantics as `ragged_paged_attention_reference`, float32 only.

Pallas has no CPU backend, and in plain jnp every block of pages is gathered into a new array before the
products read it again (`blocked_attention.py`); the kernel reads each page in place, once for all the query
heads of its KV head and up to 16 tokens of a request, on XLA's CPU thread pool. `load` compiles it with the
machine's C++ compiler on first use (a few seconds) into a cache directory keyed by the source, the flags,
the compiler, jaxlib and the CPU, and registers it; where no compiler works the engine keeps the jnp path.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from pallas_kernels.ragged_paged_attention import check_ragged_inputs

TARGET = "jaxpage_ragged_paged_attention_f32"
_SOURCE = Path(__file__).with_name("cpu_attention.cc")
# -march=native: the library is built where it runs (the key holds the CPU's feature flags).
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++20", "-shared", "-fPIC")

_log = logging.getLogger(__name__)
_loaded: Path | None = None
_vectorized = False  # the build has the AVX-512 path
_load_lock = threading.Lock()  # data-parallel replicas build their runners in threads
_failed_with: str | None = None  # the compiler whose build failed: every engine would otherwise retry it


def compiler() -> str | None:
    """The C++ compiler `load` uses: $CXX, else the first of c++, g++, clang++ on PATH; None if none."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((found for name in names if (found := shutil.which(name))), None)


def cpu_flags() -> str:
    """The CPU's feature flags, which decide what a program compiled for it may use."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _library_path(cache_dir: Path, cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS), version, jaxlib.__version__, cpu_flags()):
        key.update(part if isinstance(part, bytes) else part.encode())
    return cache_dir / f"cpu_attention-{key.hexdigest()[:16]}.so"


def _build(target: Path, cxx: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place, so a concurrent or interrupted build is never loaded.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        # mkstemp's 0600 would keep other users of a shared cache directory from loading it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # a crash after the rename leaves the whole library, not an empty file
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(cache_dir: str | os.PathLike) -> bool:
    """Builds (once per machine and source) and registers the kernel; True when it can be called. Failures
    (no compiler, a compile error) are logged and give False: callers fall back to the jnp attention."""
    with _load_lock:
        return _load(Path(cache_dir))


def _load(cache_dir: Path) -> bool:
    global _loaded, _vectorized, _failed_with
    if _loaded is not None:
        return True
    cxx = compiler()
    if cxx is None:
        _log.warning("no C++ compiler found (set CXX): the CPU attention kernel is off")
        return False
    if cxx == _failed_with:
        return False
    try:
        path = _library_path(cache_dir, cxx)
        try:
            library = ctypes.cdll.LoadLibrary(str(path)) if path.exists() else None
        except OSError as error:  # damaged or unreadable: built again below
            _log.warning("rebuilding the CPU attention kernel, %s did not load: %s", path, error)
            path.unlink(missing_ok=True)
            library = None
        if library is None:
            try:
                _build(path, cxx)
            except (RuntimeError, subprocess.SubprocessError):
                _failed_with = cxx  # the same compiler would fail the same way for every engine
                raise
            library = ctypes.cdll.LoadLibrary(str(path))
        handler = jax.ffi.pycapsule(library.JaxpageRaggedPagedAttentionF32)
        jax.ffi.register_ffi_target(TARGET, handler, platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _log.warning("the CPU attention kernel is off: %s", error)
        return False
    _loaded = path
    _vectorized = bool(library.JaxpageCpuAttentionVectorized())
    return True


def build_identity() -> str | None:
    """The loaded kernel's file name, which hashes its source, flags, compiler and CPU; None if not loaded."""
    return None if _loaded is None else _loaded.name


def fast_for_prefill(page_size: int, head_dim: int) -> bool:
    """Whether the kernel outruns the blocked jnp attention on prefill chunks too, not only in decode: its
    AVX-512 path (pages of 16, head_dim 64 or 128) does (a 512-token chunk 3.8 against 6.7 ms), the portable
    loops do not (~1.4x slower)."""
    return _vectorized and page_size == 16 and head_dim in (64, 128)


def ragged_paged_attention_cpu(
    q: jax.Array,  # f32[T, num_q_heads, head_dim]
    k_pages: jax.Array,  # f32[num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # f32[num_kv_heads, num_pages, page_size, head_dim]
    kv_lens: jax.Array,  # i32[B]
    page_table: jax.Array,  # i32[B, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[B + 1]
    *,
    sm_scale: float | None = None,
) -> jax.Array:  # f32[T, num_q_heads, head_dim]; rows of padding tokens are 0
    """`ragged_paged_attention_reference` as one kernel call; `load` must have returned True."""
    if _loaded is None:
        raise RuntimeError("the CPU attention kernel is not loaded: call cpu_attention.load first")
    check_ragged_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens)
    for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if x.dtype != jnp.float32:
            raise ValueError(f"the CPU attention kernel takes float32 {name}, got {x.dtype}")
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    as_i32 = (x.astype(jnp.int32) for x in (kv_lens, page_table, cu_q_lens))
    return call(q, k_pages, v_pages, *as_i32, sm_scale=np.float32(sm_scale))
