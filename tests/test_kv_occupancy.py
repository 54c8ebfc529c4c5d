"""The KV occupancy count of the benchmarks, against a plain per-page loop over random shared page tables."""

import random
from types import SimpleNamespace

from jaxpage.metrics import kv_occupancy


def per_page(running, page_size):
    fill = {}
    for request in running:
        for i, page in enumerate(request.page_ids):
            held = min(page_size, max(0, request.num_computed_tokens - i * page_size))
            fill[page] = max(fill.get(page, 0), held)
    return len(fill) * page_size, sum(fill.values())


def test_kv_occupancy_counts_each_shared_page_once_at_its_fullest():
    rng = random.Random(0)
    for _ in range(300):
        running = []
        for _ in range(rng.randint(0, 12)):
            pages = [rng.randint(1, 25) for _ in range(rng.randint(0, 6))]
            computed = rng.randint(0, 4 * len(pages))
            running.append(SimpleNamespace(page_ids=pages, num_computed_tokens=computed))
        assert kv_occupancy(running, 4) == per_page(running, 4)
