"""Checks on a GPU that warm-up compiles every program the tiers' page moves run: after `page_copy.warmup`,
moving pages to pinned host memory and back, also pages that come from numpy (the disk tier's), compiles
nothing. Prints the compilations counted and the sizes tried.

  python scripts/check_tier_moves_gpu.py
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxpage import compile_watch, page_copy


def main():
    pool = tuple(
        (jnp.zeros((8, 64, 16, 128), jnp.bfloat16), jnp.zeros((8, 64, 16, 128), jnp.bfloat16))
        for _ in range(4)
    )
    pool = page_copy.warmup(pool, 4, 0, 32)
    with compile_watch.counting() as compiles:
        for count in (1, 3, 17, 32):
            pages = page_copy.gather_pages_to_host(pool, list(range(1, count + 1)), 32)
            from_disk = [np.asarray(page) for page in pages]
            pool = page_copy.scatter_pages_from_host(pool, list(range(1, count + 1)), pages, 32)
            pool = page_copy.scatter_pages_from_host(pool, list(range(1, count + 1)), from_disk, 32)
        jax.block_until_ready(pool)
    print(f"{jax.devices()[0].device_kind}: {len(compiles)} compilations after warm-up")
    raise SystemExit(1 if compiles else 0)


if __name__ == "__main__":
    main()
