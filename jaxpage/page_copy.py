"""Device-side page moves over the KV pool (a tuple of per-layer `(k_pages, v_pages)`, each
`[num_kv_heads, num_pages, page_size, head_dim]`): copy-on-write copies, and moving pages to host memory and
back (swapping, and the tiers under the prefix cache).

The pool is donated, so XLA updates it in place. Page lists are padded to a power of two with the null page 0
(a copy 0 -> 0, a gather of page 0, a scatter into page 0: all harmless, since no visible position reads page
0), so only a few shapes are ever compiled.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

KVPool = tuple[tuple[jax.Array, jax.Array], ...]


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


def gather_pages_async(kv_pool: KVPool, page_ids: list[int]) -> jax.Array:
    """Like `gather_pages`, but returns at once: the device array (padded past `len(page_ids)` pages), whose
    copy to host memory has been started; reading it waits for the copy."""
    assert page_ids and 0 not in page_ids, page_ids
    gathered = _gather(kv_pool, _padded(page_ids))
    gathered.copy_to_host_async()
    return gathered


def scatter_pages(kv_pool: KVPool, page_ids: list[int], data: np.ndarray) -> KVPool:
    """Writes `data` (what `gather_pages` returned, for as many pages) into `page_ids`; returns the updated
    pool (the argument is donated)."""
    assert page_ids and 0 not in page_ids and data.shape[3] == len(page_ids), (page_ids, data.shape)
    # In pieces of power-of-two sizes (the compiled shapes), largest first, rather than one padded to the next
    # power of two: the data sent to the device is then only the pages' own (65 pages: 64 + 1, not 128).
    start = 0
    for bit in reversed(range(len(page_ids).bit_length())):
        size = 1 << bit
        if len(page_ids) - start >= size:
            piece = np.asarray(page_ids[start : start + size], np.int32)
            kv_pool = _scatter(kv_pool, piece, data[:, :, :, start : start + size])
            start += size
    return kv_pool


def warmup(kv_pool: KVPool, max_copies: int, max_move_pages: int) -> KVPool:
    """Compiles the moves of every padded size a step can ask for (up to `max_copies` copy-on-write copies,
    and gathers and scatters of up to `max_move_pages` pages, for swaps and the tiers; 0: none) by running
    them on the null page, which changes nothing visible. Returns the pool (the argument is donated)."""

    def null_pages(limit: int) -> list[np.ndarray]:  # each size `_padded` gives moves of 1 .. limit pages
        return list({len(p): p for p in (_padded([0] * n) for n in range(1, limit + 1))}.values())

    for null in null_pages(max_copies):
        kv_pool = _copy(kv_pool, null, null)
    for null in null_pages(max_move_pages):
        kv_pool = _scatter(kv_pool, null, _gather(kv_pool, null))
    return kv_pool
