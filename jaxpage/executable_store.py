"""Compiled step programs kept on disk whole, so that a warm start loads them without tracing or lowering.

JAX's persistent compilation cache (jaxpage.compilation_cache) skips XLA's compile but finds its entry by a
hash of the lowered program, so every start still traces and lowers each program in Python first: 22 s of the
8B's 33 s warm start on an H200. Here an entry is named by what the program is made from instead: the source
of jaxpage, models and pallas_kernels, the versions of the JAX packages and Flax, the devices (and the CPU,
which XLA:CPU compiles for), XLA's flags, JAX's settings, the configs, and the shapes, dtypes and shardings of
the arguments. Anything else a program depended on would load a stale program, so the name errs on the side
of including things; an edit anywhere in those packages makes every name new.

Only programs XLA compiled in this process are stored. On XLA:CPU an executable that JAX loaded from its own
persistent cache fails when it runs after being serialized again ("Function ... not found"), so a program
that came from JAX's cache is used as it is and not stored (its next start traces it again).

An entry is one file, written under a temporary name and renamed (a reader sees all of it or nothing), with a
SHA-256 of its contents: a damaged one is deleted and its program compiled again. Loading one runs native code
it holds, as JAX's own cache does: the directory must be writable only by people trusted to run code here.
The least recently used entries are deleted once the directory holds more than `max_bytes`.
"""

import functools
import hashlib
import importlib
import importlib.metadata
import logging
import os
import pickle
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
from jax.experimental import serialize_executable

from pallas_kernels import cpu_attention

logger = logging.getLogger(__name__)

_MAGIC = b"JXPGEXE1"
_SUFFIX = ".jaxexe"
_PACKAGES = ("jaxpage", "models", "pallas_kernels")
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_local = threading.local()


def _count_cache_hits(event: str, **kwargs) -> None:
    # JAX reports a persistent-cache hit on the thread that compiles: counted per thread, so that a program
    # compiled in one warm-up thread is told apart from its neighbours'.
    if event == _CACHE_HIT:
        _local.cache_hits = getattr(_local, "cache_hits", 0) + 1


jax.monitoring.register_event_listener(_count_cache_hits)


@functools.cache
def _source_digest() -> str:
    digest = hashlib.sha256()
    for package in _PACKAGES:
        root = Path(importlib.import_module(package).__file__).parent
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cc") and p.is_file()):
            digest.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# Read at import, when Python reads the modules (the kernels' lazily imported ones are beside them): a file
# edited during a long warm-up is then not taken for the source this process runs.
_source_digest()


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    # jax, jaxlib and the GPU plugins (jax-cuda13-plugin, ...), the CUDA libraries they load (nvidia-*), and
    # Flax, which traces the model.
    names = {dist.metadata["Name"] for dist in importlib.metadata.distributions()}
    wanted = sorted(
        n for n in names if n and (n.lower().startswith(("jax", "nvidia-")) or n.lower() == "flax")
    )
    return tuple((name, importlib.metadata.version(name)) for name in wanted)


def environment(devices: list) -> dict:
    """What every program of these devices depends on besides its own inputs and configs."""
    client = devices[0].client
    return {
        "format": 1,
        "source": _source_digest(),
        "versions": _versions(),
        "platform": [client.platform, client.platform_version],
        "devices": [[device.id, device.device_kind] for device in devices],
        "cpu": cpu_attention.cpu_flags() if client.platform == "cpu" else None,
        # The C++ kernel's build (source, flags, compiler): whether it has its AVX-512 path decides programs.
        "cpu_kernel": cpu_attention.build_identity(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


class ExecutableStore:
    """Compiled programs under `directory`, named by a digest of `environment` and of each program's
    description; they run on `devices`."""

    def __init__(
        self, directory: str | os.PathLike, environment: dict, devices: list, max_bytes: int = 2**31
    ):
        """Raises OSError if `directory` cannot be made (the caller then goes without a store)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._environment = repr(sorted(environment.items())).encode()
        self._devices = devices
        self._lock = threading.Lock()  # warm-up loads and stores from several threads
        self.num_loaded = 0
        self.num_stored = 0
        self._paths: dict[int, Path] = {}  # id of each program loaded from here -> its entry
        self._prune(max_bytes)

    def _prune(self, max_bytes: int) -> None:
        entries = []
        for path in self.directory.iterdir():
            try:
                stat = path.stat()
                if path.suffix == ".tmp" and stat.st_mtime < time.time() - 3600:
                    path.unlink()  # left by a writer killed an hour ago or more
                elif path.suffix == _SUFFIX:
                    entries.append((stat.st_mtime, stat.st_size, path))
            except OSError:  # deleted by another process meanwhile, or a read-only directory
                continue
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):  # oldest first
            if total <= max_bytes:
                break
            _unlink(path)
            total -= size

    def compiled(self, description: object, lower: Callable[[], jax.stages.Lowered]) -> jax.stages.Compiled:
        """The program `description` names (its repr must say everything that shapes it besides the
        environment): loaded if stored, else `lower().compile()`, stored if XLA compiled it here."""
        # JAX's settings as this thread sees them (with a context the caller set, matmul precision above all)
        # shape the program too.
        settings = sorted((name, repr(value)) for name, value in jax.config.values.items())
        name = repr((description, settings)).encode()
        key = hashlib.sha256(self._environment + name).hexdigest()
        path = self.directory / f"{key}{_SUFFIX}"
        program = self._load(path)
        if program is not None:
            try:
                os.utime(path)  # used now: the last to be pruned
            except OSError:
                pass
            with self._lock:
                self.num_loaded += 1
                self._paths[id(program)] = path
            return program
        hits_before = getattr(_local, "cache_hits", 0)
        program = lower().compile()
        if getattr(_local, "cache_hits", 0) == hits_before:
            self._store(path, program)
        return program

    def discard(self, program: jax.stages.Compiled) -> bool:
        """Deletes the entry `program` was loaded from (it failed to run); False if it was not loaded here."""
        with self._lock:
            path = self._paths.pop(id(program), None)
        if path is None:
            return False
        logger.warning("executable store: deleting %s, which failed to run", path.name)
        _unlink(path)
        return True

    def _load(self, path: Path) -> jax.stages.Compiled | None:
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            logger.warning("executable store: cannot read %s: %s", path.name, error)
            return None
        body = blob[len(_MAGIC) + 32 :]
        try:
            checksum = blob[len(_MAGIC) : len(_MAGIC) + 32]
            if blob[: len(_MAGIC)] != _MAGIC or hashlib.sha256(body).digest() != checksum:
                raise ValueError("damaged (its checksum does not match)")
            payload, in_tree, out_tree = pickle.loads(body)
            return serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, self._devices[0].client, self._devices
            )
        except Exception as error:  # a damaged or foreign entry is compiled again, never fatal
            logger.warning("executable store: deleting %s, which did not load: %s", path.name, error)
            _unlink(path)
            return None

    def _store(self, path: Path, program: jax.stages.Compiled) -> None:
        try:
            body = pickle.dumps(serialize_executable.serialize(program))
        except Exception as error:  # one JAX cannot serialize (a host callback, say) is used unstored
            logger.debug("executable store: %s not stored: %s", path.name, error)
            return
        try:
            fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=self.directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_MAGIC + hashlib.sha256(body).digest() + body)
                # Readable by the directory's other users, as JAX's own entries are (mkstemp's mode is 0600).
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o644 & ~umask)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        except OSError as error:  # a full or read-only disk costs the next start its time, nothing else
            logger.warning("executable store: cannot write %s: %s", path.name, error)
            return
        with self._lock:
            self.num_stored += 1


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as error:  # a read-only directory: the entry stays, and is skipped or pruned later
        logger.warning("executable store: cannot delete %s: %s", path.name, error)
