"""How many pages the KV pool gets, and a clear error instead of a crash when a pool cannot fit.

A pool too large for the device must fail before it is allocated: on the CPU, XLA's allocation does not fail
at all (the host overcommits, and zeroing the pool then gets the process OOM-killed), so the pool's bytes are
compared with the free memory first; an out-of-memory error while allocating becomes the same ValueError.
"""

import jax

from jaxpage.config import EngineConfig
from models import llama
from models.config import ModelConfig

GIB = 2**30
# A CPU pool lives in the host's memory beside everything else there and is zeroed up front, so its default
# is modest: 1 GiB holds about 23k tokens of SmolLM2-135M in float32.
CPU_DEFAULT_KV_BYTES = GIB


def free_device_bytes(device: jax.Device) -> int | None:
    """Bytes the device can still allocate; None where that cannot be told."""
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    # The CPU client reports no memory statistics; its memory is the host's.
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _does_not_fit(what: str, num_pages: int, bytes_per_page: int, free_bytes: int) -> ValueError:
    return ValueError(
        f"{what} asks for a KV pool of {num_pages} pages ({num_pages * bytes_per_page / GIB:.2f} GiB), more "
        f"than the {free_bytes / GIB:.2f} GiB of device memory free; the largest num_pages that fits is "
        f"{free_bytes // bytes_per_page}"
    )


def pool_pages(
    engine_config: EngineConfig,
    max_model_len: int,
    bytes_per_page: int,
    free_bytes: int | None,
    on_cpu: bool,
) -> int:
    """Pages of the KV pool, page 0 included: `num_pages` when set; else `kv_cache_gib`, else the configured
    fraction of `free_bytes` (at most 1 GiB on the CPU), never more than `max_num_seqs` full-length requests
    can use.

    Raises:
      ValueError naming the field, when the pool holds fewer than 2 pages or needs more than `free_bytes`.
    """
    if engine_config.num_pages is not None:
        num_pages, what = engine_config.num_pages, f"num_pages={engine_config.num_pages}"
    else:
        if engine_config.kv_cache_gib is not None:
            budget, what = engine_config.kv_cache_gib * GIB, f"kv_cache_gib={engine_config.kv_cache_gib}"
        elif free_bytes is None:
            raise ValueError("cannot tell the free device memory here; set kv_cache_gib or num_pages")
        else:
            budget = engine_config.kv_cache_memory_fraction * free_bytes
            what = f"kv_cache_memory_fraction={engine_config.kv_cache_memory_fraction}"
            if on_cpu and budget > CPU_DEFAULT_KV_BYTES:
                budget, what = CPU_DEFAULT_KV_BYTES, f"{what} (capped at 1 GiB on the CPU)"
        most_useful = engine_config.max_num_seqs * engine_config.pages_per_seq(max_model_len) + 1
        num_pages = min(int(budget // bytes_per_page), most_useful)
        if num_pages < 2:
            raise ValueError(
                f"{what} leaves room for {num_pages} KV pages of {bytes_per_page} bytes; at least 2 are "
                "needed (set num_pages or kv_cache_gib)"
            )
    if free_bytes is not None and num_pages * bytes_per_page > free_bytes:
        raise _does_not_fit(what, num_pages, bytes_per_page, free_bytes)
    return num_pages


def allocate_kv_pool(
    cfg: ModelConfig, num_pages: int, page_size: int, bytes_per_page: int, mesh: jax.sharding.Mesh
) -> llama.KVPool:
    """`llama.init_kv_pool` on the mesh, with running out of device memory reported as a ValueError naming
    num_pages (bytes_per_page: one device's share)."""
    try:
        return llama.init_kv_pool(cfg, num_pages, page_size, mesh=mesh)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        free_bytes = free_device_bytes(jax.devices()[0]) or 0
        raise _does_not_fit(f"num_pages={num_pages}", num_pages, bytes_per_page, free_bytes) from error
