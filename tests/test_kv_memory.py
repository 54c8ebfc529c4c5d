"""KV pool sizing: the CPU default stays modest, kv_cache_gib sits between num_pages and the memory fraction,
and a pool too large for the device is a ValueError before anything is allocated."""

import dataclasses

import jax
import pytest

from jaxpage.config import EngineConfig
from jaxpage.kv_memory import GIB, pool_pages
from jaxpage.runner import Runner, kv_bytes_per_page, kv_pool_pages
from models import llama
from models.config import ModelConfig

# SmolLM2-135M's KV shape: 737,280 bytes a 16-token page in float32.
SMOLLM2 = ModelConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_q_heads=9,
    num_kv_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
)
PAGE_BYTES = kv_bytes_per_page(SMOLLM2, 16)
LONG = EngineConfig(max_num_seqs=64, max_model_len=8192)  # up to 64 x 512 + 1 useful pages
TINY = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_q_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
TINY_CONFIG = EngineConfig(
    page_size=4,
    num_pages=37,
    max_num_seqs=4,
    max_num_batched_tokens=16,
    max_model_len=64,
    token_buckets=(8, 16),
    seq_buckets=(4,),
    page_buckets=(4, 16),
    compilation_cache_dir=None,
)


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def test_cpu_default_pool_is_at_most_1_gib():
    free = 20 * GIB
    assert pool_pages(LONG, 8192, PAGE_BYTES, free, on_cpu=True) == GIB // PAGE_BYTES
    assert pool_pages(LONG, 8192, PAGE_BYTES, free, on_cpu=False) == int(0.9 * free) // PAGE_BYTES
    # Below the cap the fraction still decides.
    assert pool_pages(LONG, 8192, PAGE_BYTES, GIB // 2, on_cpu=True) == int(0.9 * GIB / 2) // PAGE_BYTES


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="sizes the pool of a CPU")
def test_llm_default_on_this_cpu_sizes_the_pool_to_at_most_1_gib():
    # LLM(max_num_seqs=4) on SmolLM2 could use 4 x 512 + 1 pages (1.4 GiB): above the cap, within the host.
    assert _mem_available() > 2 * GIB
    assert kv_pool_pages(SMOLLM2, EngineConfig(max_num_seqs=4), max_model_len=8192) == GIB // PAGE_BYTES


def test_kv_cache_gib_wins_over_the_fraction_and_loses_to_num_pages():
    free = 20 * GIB
    gib = dataclasses.replace(LONG, kv_cache_gib=2.5)
    assert pool_pages(gib, 8192, PAGE_BYTES, free, on_cpu=True) == int(2.5 * GIB) // PAGE_BYTES
    assert pool_pages(gib, 8192, PAGE_BYTES, free, on_cpu=False) == int(2.5 * GIB) // PAGE_BYTES
    both = dataclasses.replace(gib, num_pages=100)
    assert pool_pages(both, 8192, PAGE_BYTES, free, on_cpu=True) == 100


@pytest.mark.parametrize("on_cpu", [True, False])
@pytest.mark.parametrize("kv_cache_gib", [None, 8.0])
def test_pool_never_exceeds_what_max_num_seqs_requests_can_use(on_cpu, kv_cache_gib):
    config = EngineConfig(max_num_seqs=4, max_model_len=2048, kv_cache_gib=kv_cache_gib)
    assert pool_pages(config, 2048, PAGE_BYTES, 20 * GIB, on_cpu) == 4 * 128 + 1


@pytest.mark.parametrize(
    "field, value",
    [("kv_cache_gib", 1e-4), ("kv_cache_memory_fraction", 1e-4)],
)
def test_budget_below_two_pages_names_the_field(field, value):
    config = dataclasses.replace(LONG, **{field: value})
    with pytest.raises(ValueError, match=f"{field}={value} leaves room for 0 KV pages"):
        pool_pages(config, 8192, PAGE_BYTES, GIB, on_cpu=True)


@pytest.mark.parametrize(
    "overrides, named",
    [({"num_pages": 5000}, "num_pages=5000"), ({"kv_cache_gib": 3.0}, "kv_cache_gib=3.0")],
)
def test_pool_larger_than_free_memory_is_refused(overrides, named):
    config = dataclasses.replace(LONG, **overrides)
    free = 2 * GIB  # 2912 pages
    with pytest.raises(
        ValueError, match=f"^{named} asks for a KV pool .* largest num_pages that fits is 2912$"
    ):
        pool_pages(config, 8192, PAGE_BYTES, free, on_cpu=False)
    assert pool_pages(config, 8192, PAGE_BYTES, None, on_cpu=False) > 2912  # unknown free memory: no check


def test_pool_larger_than_host_memory_is_refused_before_allocating(monkeypatch):
    def allocated(*args, **kwargs):
        raise AssertionError("the pool was allocated")

    monkeypatch.setattr(llama, "init_kv_pool", allocated)
    page_bytes = kv_bytes_per_page(TINY, TINY_CONFIG.page_size)
    num_pages = 2 * _mem_available() // page_bytes  # twice what the host has free
    config = dataclasses.replace(TINY_CONFIG, num_pages=num_pages)
    with pytest.raises(ValueError, match=f"^num_pages={num_pages} asks .* largest num_pages that fits is"):
        Runner(TINY, {}, config)  # the pool is sized before the params are needed


def test_running_out_of_device_memory_while_allocating_is_a_value_error(monkeypatch):
    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4736 bytes"
        )

    monkeypatch.setattr(llama, "init_kv_pool", exhausted)
    with pytest.raises(
        ValueError, match="^num_pages=37 asks for a KV pool .* largest num_pages that fits is"
    ):
        Runner(TINY, {}, TINY_CONFIG)

    def other(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(llama, "init_kv_pool", other)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        Runner(TINY, {}, TINY_CONFIG)
