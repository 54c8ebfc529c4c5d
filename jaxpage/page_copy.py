"""Device-side page moves over the KV pool (a tuple of per-layer `(k_pages, v_pages)`, each
`[num_kv_heads, num_pages, page_size, head_dim]`): copy-on-write copies, moving pages to host memory and
back (swapping, and the tiers under the prefix cache), and moving tokens to new positions (`shift_tokens`,
for a conversation truncated in the middle; see jaxpage.kv_shift).

The pool is donated, so XLA updates it in place. Page lists are padded to a power of two with the null page 0
(a copy 0 -> 0, a gather of page 0, a scatter into page 0: all harmless, since no visible position reads page
0), so only a few shapes are ever compiled.
"""

import concurrent.futures
import ctypes
import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.layers import apply_rope

KVPool = tuple[tuple[jax.Array, jax.Array], ...]
logger = logging.getLogger(__name__)


def _padded(page_ids: list[int]) -> np.ndarray:  # -> i32[next power of two >= len(page_ids)]
    size = 1 << max(0, len(page_ids) - 1).bit_length()
    out = np.zeros(size, np.int32)
    out[: len(page_ids)] = page_ids
    return out


@functools.partial(jax.jit, donate_argnums=0)
def _copy(kv_pool: KVPool, src: jax.Array, dst: jax.Array) -> KVPool:  # src, dst: i32[N]
    # Every read sees the pool as it was before the call, so a page may be both a source and a destination.
    return tuple((k.at[:, dst].set(k[:, src]), v.at[:, dst].set(v[:, src])) for k, v in kv_pool)


@jax.jit
def _gather(kv_pool: KVPool, page_ids: jax.Array) -> jax.Array:  # page_ids: i32[N]
    return jnp.stack([jnp.stack((k[:, page_ids], v[:, page_ids])) for k, v in kv_pool])


@functools.partial(jax.jit, donate_argnums=0)
def _scatter(kv_pool: KVPool, page_ids: jax.Array, data: jax.Array) -> KVPool:
    return tuple(
        (k.at[:, page_ids].set(data[layer, 0]), v.at[:, page_ids].set(data[layer, 1]))
        for layer, (k, v) in enumerate(kv_pool)
    )


@functools.partial(jax.jit, donate_argnums=0)
def _shift(kv_pool: KVPool, moves: jax.Array, inv_freq: jax.Array) -> KVPool:  # moves: i32[5, SHIFT_PIECE]
    src_page, src_slot, dst_page, dst_slot, delta = moves
    out = []
    for k, v in kv_pool:
        # Rotating K by the position delta moves it to its new position (RoPE rotations compose).
        moved_k = apply_rope(k[:, src_page, src_slot].transpose(1, 0, 2), delta, inv_freq).transpose(1, 0, 2)
        out.append(
            (
                k.at[:, dst_page, dst_slot].set(moved_k),
                v.at[:, dst_page, dst_slot].set(v[:, src_page, src_slot]),
            )
        )
    return tuple(out)


# Tokens per call of the shift program, its one compiled shape (the last piece is padded with null moves).
SHIFT_PIECE = 256


def copy_pages(kv_pool: KVPool, copies: list[tuple[int, int]]) -> KVPool:
    """Copies page `src` to page `dst` for every `(src, dst)` in all layers; returns the updated pool (the
    argument is donated and must not be used again)."""
    if not copies:
        return kv_pool
    src = _padded([s for s, _ in copies])
    dst = _padded([d for _, d in copies])
    return _copy(kv_pool, src, dst)


def gather_pages(kv_pool: KVPool, page_ids: list[int]) -> np.ndarray:
    """The K/V of `page_ids` in host memory: f[num_layers, 2, num_kv_heads, len(page_ids), page_size,
    head_dim] in the pool's dtype (2: K then V). The pool is left as it is."""
    assert page_ids and 0 not in page_ids, page_ids
    return np.asarray(jax.device_get(_gather(kv_pool, _padded(page_ids))))[:, :, :, : len(page_ids)]


class _Memories(NamedTuple):
    """Where the tier moves' arguments live: the pool in device memory, the page ids on every device of the
    pool's mesh, and a page (f[num_layers, 2, num_kv_heads, page_size, head_dim], split over KV heads as the
    pool is) in the devices' pinned host memory, which the devices copy to and from by DMA without the host
    staging the bytes."""

    pool: jax.sharding.Sharding
    page_ids: jax.sharding.Sharding
    host_page: jax.sharding.Sharding
    # A load's pages stacked on the devices: f[num_layers, 2, num_kv_heads, N, page_size, head_dim].
    stacked_pages: jax.sharding.Sharding


def _memories(kv_pool: KVPool) -> _Memories:
    pool = kv_pool[0][0].sharding
    if not isinstance(pool, NamedSharding):  # a pool on one device, made outside a mesh
        (device,) = pool.device_set
        pool = NamedSharding(Mesh(np.asarray([device]), ("tp",)), PartitionSpec())
    heads = pool.spec[0] if pool.spec else None
    return _Memories(
        pool.with_memory_kind("device"),
        NamedSharding(pool.mesh, PartitionSpec()),
        NamedSharding(pool.mesh, PartitionSpec(None, None, heads), memory_kind="pinned_host"),
        NamedSharding(pool.mesh, PartitionSpec(None, None, heads), memory_kind="device"),
    )


# The tier moves name every argument's memory: the pool as a step leaves it and as warm-up has it must hit the
# same compiled program.
@functools.lru_cache
def _gather_to_host(num_layers: int, num_pages: int, memories: _Memories):
    def gather(kv_pool: KVPool, page_ids: jax.Array) -> tuple[jax.Array, ...]:  # page_ids: i32[num_pages]
        data = _gather(kv_pool, page_ids)  # [num_layers, 2, num_kv_heads, num_pages, page_size, head_dim]
        return tuple(data[:, :, :, i] for i in range(num_pages))

    pool = ((memories.pool, memories.pool),) * num_layers
    return jax.jit(
        gather, in_shardings=(pool, memories.page_ids), out_shardings=(memories.host_page,) * num_pages
    )


@functools.lru_cache
def _scatter_from_host(num_layers: int, num_pages: int, memories: _Memories):
    def scatter(kv_pool: KVPool, page_ids: jax.Array, pages: tuple[jax.Array, ...]) -> KVPool:
        data = jnp.stack([jax.device_put(page, jax.memory.Space.Device) for page in pages], axis=3)
        return _scatter(kv_pool, page_ids, data)  # inlined into this program

    pool = ((memories.pool, memories.pool),) * num_layers
    in_shardings = (pool, memories.page_ids, (memories.host_page,) * num_pages)
    return jax.jit(scatter, in_shardings=in_shardings, out_shardings=pool, donate_argnums=0)


def uses_pinned_memory(kv_pool: KVPool) -> bool:
    """Whether the tiers keep pages in the devices' pinned host memory (GPUs), or as numpy arrays (the CPU,
    whose host memory is the device's: XLA:CPU took 37 ms to write 64 SmolLM2 pages as outputs of their own,
    where one gather read as numpy and cut into pages there takes 11)."""
    return next(iter(kv_pool[0][0].sharding.device_set)).platform != "cpu"


def retain_freed_host_memory() -> None:
    """Has glibc's malloc keep large freed blocks for reuse rather than return them to the system (a no-op
    elsewhere). XLA:CPU allocates every output afresh, and a block above malloc's mmap threshold (at most
    32 MiB by default) then comes fresh from the system and faults its pages in one by one: moving 64 SmolLM2
    pages (48 MB) between the pool and the host tier took 30-35 ms, 9-11 ms with freed blocks reused. The
    process keeps its peak memory instead (steps measured no faster with it: their blocks are smaller)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    for name, option, value in (
        ("M_MMAP_THRESHOLD", m_mmap_threshold, 1 << 30),
        ("M_TRIM_THRESHOLD", m_trim_threshold, (1 << 31) - 1),
    ):
        if mallopt(option, value) != 1:
            logger.info("glibc refused mallopt(%s, %d); large host-tier moves stay slower", name, value)


def _stacked_pages(kv_pool: KVPool, memories: _Memories) -> jax.sharding.Sharding | None:
    # A pool the engine made is committed to its devices; one that is not (made by hand) stays uncommitted,
    # so that its later moves are the programs compiled for it.
    return memories.stacked_pages if kv_pool[0][0].committed else None


def gather_pages_to_host(
    kv_pool: KVPool, page_ids: list[int], max_piece: int, pinned: bool | None = None
) -> list:
    """The K/V of each of `page_ids` as an array of its own (f[num_layers, 2, num_kv_heads, page_size,
    head_dim]), at most `max_piece` pages a program. The pool is left as it is.

    pinned (default: `uses_pinned_memory`): arrays in pinned host memory, returned at once: the device copies
    them after the work queued before (reading one waits for its copy). Else numpy arrays, once the device
    has read them."""
    assert page_ids and 0 not in page_ids, page_ids
    pinned = uses_pinned_memory(kv_pool) if pinned is None else pinned
    memories, pages = _memories(kv_pool), []
    for start, size in _pieces(len(page_ids), max_piece):
        piece = np.asarray(page_ids[start : start + size], np.int32)
        if pinned:
            pages += _gather_to_host(len(kv_pool), size, memories)(kv_pool, piece)
        else:
            data = np.asarray(_gather(kv_pool, piece))
            pages += [np.ascontiguousarray(data[:, :, :, i]) for i in range(size)]
    return pages


def host_memory(kv_pool: KVPool) -> jax.sharding.Sharding:
    """Where a page read from disk (numpy) is best put ahead of its load: `jax.device_put(page, it)`."""
    return _memories(kv_pool).host_page


def reserve_host_memory(kv_pool: KVPool, num_pages: int) -> None:
    """Has the device's pinned host memory allocator take `num_pages` pages' worth now. It keeps what it took
    and hands it out again, so the host tier's saves never wait for it to grow: pinning fresh memory runs at a
    few GB/s, a stall of hundreds of ms in the middle of a step."""
    k = kv_pool[0][0]
    # In blocks of at most 256 pages, all held until the end (a block freed first would only be taken again),
    # so that the device never needs more than one block's worth if it builds them there.
    block = min(num_pages, 256)
    shape = (block, len(kv_pool), 2, k.shape[0], k.shape[2], k.shape[3])
    where = _memories(kv_pool).host_page
    if isinstance(where, jax.sharding.NamedSharding):  # a block of pages: one more leading axis
        where = jax.sharding.NamedSharding(
            where.mesh, PartitionSpec(None, *where.spec), memory_kind="pinned_host"
        )
    make = jax.jit(lambda: jnp.zeros(shape, k.dtype), out_shardings=where)
    blocks = [make() for _ in range(-(-num_pages // block))]
    jax.block_until_ready(blocks)


def scatter_pages_from_host(
    kv_pool: KVPool, page_ids: list[int], pages: list, max_piece: int, pinned: bool | None = None
) -> KVPool:
    """Writes each of `pages` (what `gather_pages_to_host` returned, or numpy arrays of that shape) into its
    page of `page_ids`, at most `max_piece` pages a program; returns the updated pool (the argument is
    donated). The copies to the device run in the step's stream, after the work queued before; the host does
    not wait for them. pinned (default: `uses_pinned_memory`): the pages go by DMA from pinned host memory;
    else they are stacked in numpy and sent as one array a program."""
    assert page_ids and 0 not in page_ids and len(pages) == len(page_ids), (page_ids, len(pages))
    pinned = uses_pinned_memory(kv_pool) if pinned is None else pinned
    memories = _memories(kv_pool)
    if pinned:
        pages = [p if isinstance(p, jax.Array) else jax.device_put(p, memories.host_page) for p in pages]
    for start, size in _pieces(len(page_ids), max_piece):
        piece = np.asarray(page_ids[start : start + size], np.int32)
        if pinned:
            scatter = _scatter_from_host(len(kv_pool), size, memories)
            kv_pool = scatter(kv_pool, piece, tuple(pages[start : start + size]))
        else:
            kv_pool = _scatter_stacked(kv_pool, piece, pages[start : start + size], memories)
    return kv_pool


def _scatter_stacked(kv_pool: KVPool, page_ids: np.ndarray, pages: list, memories: _Memories) -> KVPool:
    """The numpy way of `scatter_pages_from_host`: the pages stacked in numpy, sent as one array."""
    pages = [np.asarray(page) for page in pages]
    shape = pages[0].shape
    data = _aligned_empty((*shape[:3], len(pages), *shape[3:]), pages[0].dtype)
    np.stack(pages, axis=3, out=data)
    return _scatter(kv_pool, page_ids, jax.device_put(data, _stacked_pages(kv_pool, memories)))


def _aligned_empty(shape: tuple[int, ...], dtype, alignment: int = 64) -> np.ndarray:
    """An empty numpy array whose data starts on an `alignment`-byte boundary: XLA:CPU takes such an array
    without copying it (`jax.device_put` of 64 SmolLM2 pages, 48 MB: 0.04 ms against 2.7 ms for numpy's
    16-byte aligned one)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _pieces(count: int, max_size: int | None = None) -> list[tuple[int, int]]:
    """(start, size) of `count` items in pieces of power-of-two sizes (the compiled shapes) up to `max_size`,
    largest first, rather than one piece padded to the next power of two: only the items themselves move
    (65: 64 + 1)."""
    largest = 1 << ((max_size or count).bit_length() - 1)
    pieces, start = [], 0
    while start < count:
        size = min(largest, 1 << ((count - start).bit_length() - 1))
        pieces.append((start, size))
        start += size
    return pieces


def scatter_pages(kv_pool: KVPool, page_ids: list[int], data: np.ndarray) -> KVPool:
    """Writes `data` (what `gather_pages` returned, for as many pages) into `page_ids`; returns the updated
    pool (the argument is donated)."""
    assert page_ids and 0 not in page_ids and data.shape[3] == len(page_ids), (page_ids, data.shape)
    for start, size in _pieces(len(page_ids), len(page_ids)):
        piece = np.asarray(page_ids[start : start + size], np.int32)
        kv_pool = _scatter(kv_pool, piece, data[:, :, :, start : start + size])
    return kv_pool


def shift_tokens(kv_pool: KVPool, moves: np.ndarray, inv_freq: np.ndarray) -> KVPool:
    """Copies each token's K/V given by `moves` (i32[5, N]: source page, source slot, destination page,
    destination slot, position delta; see `kv_shift.token_moves`), its K rotated by the delta with the
    model's rotary frequencies `inv_freq`. Destinations must not be sources. Returns the updated pool (the
    argument is donated)."""
    inv_freq = np.asarray(inv_freq, np.float32)
    for start in range(0, moves.shape[1], SHIFT_PIECE):
        piece = np.zeros((5, SHIFT_PIECE), np.int32)  # null moves: page 0, slot 0, delta 0
        chunk = moves[:, start : start + SHIFT_PIECE]
        piece[:, : chunk.shape[1]] = chunk
        kv_pool = _shift(kv_pool, piece, inv_freq)
    return kv_pool


def _null_pages(limit: int) -> list[np.ndarray]:  # each size `_padded` gives moves of 1 .. limit pages
    return list({len(p): p for p in (_padded([0] * n) for n in range(1, limit + 1))}.values())


def _abstract(array: jax.Array) -> jax.ShapeDtypeStruct:
    # A committed array's sharding is part of what a call is compiled for; an uncommitted one's is not.
    return jax.ShapeDtypeStruct(
        array.shape, array.dtype, sharding=array.sharding if array.committed else None
    )


def compile_moves(
    kv_pool: KVPool,
    max_copies: int,
    max_swap_pages: int,
    max_tier_pages: int = 0,
    inv_freq: np.ndarray | None = None,
    num_threads: int = 4,
) -> None:
    """Compiles, `num_threads` at a time, the moves `warmup` runs with the same arguments, so that its runs
    find them compiled. It reads only the pool's shapes and shardings, never its buffers, so it may run on
    another thread while steps donate the pool (warm-up compiles these beside the step programs)."""
    pool = jax.tree.map(_abstract, kv_pool)

    def ids(page_ids: np.ndarray) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(page_ids.shape, np.int32)

    jobs = [(_copy, (pool, ids(null), ids(null))) for null in _null_pages(max_copies)]
    for null in _null_pages(max_swap_pages):
        data = jax.eval_shape(_gather, pool, ids(null))
        jobs += [(_gather, (pool, ids(null))), (_scatter, (pool, ids(null), data))]
    memories = _memories(kv_pool)
    for null in _null_pages(max_tier_pages):
        if uses_pinned_memory(kv_pool):
            pages = jax.eval_shape(_gather_to_host(len(pool), len(null), memories), pool, ids(null))
            jobs += [
                (_gather_to_host(len(pool), len(null), memories), (pool, ids(null))),
                (_scatter_from_host(len(pool), len(null), memories), (pool, ids(null), pages)),
            ]
        else:
            data = jax.eval_shape(_gather, pool, ids(null))
            data = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=_stacked_pages(kv_pool, memories))
            jobs += [(_gather, (pool, ids(null))), (_scatter, (pool, ids(null), data))]
    if inv_freq is not None:
        moves = jax.ShapeDtypeStruct((5, SHIFT_PIECE), np.int32)
        jobs.append((_shift, (pool, moves, jax.ShapeDtypeStruct(np.shape(inv_freq), np.float32))))
    # JAX's config contexts are thread-local and part of what a program is compiled for: the caller's matmul
    # precision must reach the threads, or the runs would compile again. A gather shared by swaps and the
    # tiers is compiled once.
    precision = jax.config.jax_default_matmul_precision
    jobs = list({(fn, str(args)): (fn, args) for fn, args in jobs}.values())

    def compile_job(job) -> None:
        with jax.default_matmul_precision(precision):
            job[0].lower(*job[1]).compile()

    with concurrent.futures.ThreadPoolExecutor(num_threads) as threads:
        list(threads.map(compile_job, jobs))


def warmup(
    kv_pool: KVPool,
    max_copies: int,
    max_swap_pages: int,
    max_tier_pages: int = 0,
    inv_freq: np.ndarray | None = None,
) -> KVPool:
    """Compiles the moves of every padded size a step can ask for (up to `max_copies` copy-on-write copies,
    gathers and scatters of up to `max_swap_pages` pages for swaps and of `max_tier_pages` for the tiers; 0:
    none; and, given the model's `inv_freq`, the shift of tokens) by running them on the null page, which
    changes nothing visible (those `compile_moves` compiled already are only run). Returns the pool (the
    argument is donated)."""
    for null in _null_pages(max_copies):
        kv_pool = _copy(kv_pool, null, null)
    for null in _null_pages(max_swap_pages):
        # Swapped-out pages come back from numpy (host swap space), as `scatter_pages` gets them.
        kv_pool = _scatter(kv_pool, null, np.asarray(_gather(kv_pool, null)))
    for null in _null_pages(max_tier_pages):
        memories = _memories(kv_pool)
        if not uses_pinned_memory(kv_pool):
            # As `scatter_pages_from_host` sends numpy pages. The largest stacking buffer's memory, faulted in
            # here and freed (and kept by `retain_freed_host_memory`), is likely what the first load of this
            # thread gets back: a heuristic of glibc's reuse, which measured 36 -> 8.8 ms for that load.
            data = np.asarray(_gather(kv_pool, null))
            kv_pool = _scatter_stacked(kv_pool, null, [data[:, :, :, i] for i in range(len(null))], memories)
            continue
        pages = _gather_to_host(len(kv_pool), len(null), memories)(kv_pool, null)
        scatter = _scatter_from_host(len(kv_pool), len(null), memories)
        kv_pool = scatter(kv_pool, null, pages)
        # Pages read from disk arrive put into pinned memory from numpy; on a GPU their layout may differ
        # from the gather's outputs, which is another program.
        from_disk = tuple(jax.device_put(np.asarray(page), memories.host_page) for page in pages)
        kv_pool = scatter(kv_pool, null, from_disk)
    if inv_freq is not None:
        kv_pool = shift_tokens(kv_pool, np.zeros((5, 1), np.int32), inv_freq)
    return kv_pool
