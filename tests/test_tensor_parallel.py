"""Tensor parallelism (models.sharding) on 8 CPU devices: every split gives the tokens of one device, the
parameters and the pool are split as documented, and a step's program holds the expected collectives."""

import importlib.util
import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxpage import LLM, SamplingParams
from jaxpage.runner import kv_bytes_per_page
from models import llama, sharding
from models.attention import AttentionMetadata
from models.config import ModelConfig

TINY = ["configs/tiny_test.gin"]
_check = Path(__file__).resolve().parent.parent / "scripts" / "check_tensor_parallel_gpu.py"
sys.path.insert(0, str(_check.parent))  # as when run: the script imports its sibling modules
_spec = importlib.util.spec_from_file_location("check_tensor_parallel_gpu", _check)
check_tensor_parallel_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_tensor_parallel_gpu)
collectives = check_tensor_parallel_gpu.collectives
LONG = list(range(1000, 1061))  # 61 tokens: 8 pages of 8
PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog. " * 4, LONG, "1 2 3 4 5 6 7", "Paging is"]
PARAMS = [
    SamplingParams(max_tokens=12, temperature=0),
    SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, logprobs=3),
    SamplingParams(max_tokens=12, temperature=0.7, repetition_penalty=1.3, seed=3),
    SamplingParams(max_tokens=12, temperature=0, n=2, best_of=3, seed=5),
    SamplingParams(max_tokens=12, temperature=1.0, seed=11, prompt_logprobs=2),
]


def outputs(llm: LLM, prompts=PROMPTS, params=PARAMS) -> list:
    return [
        [(c.token_ids, None if c.logprobs is None else [sorted(d) for d in c.logprobs]) for c in o.outputs]
        for o in llm.generate(prompts, params)
    ]


@pytest.fixture(scope="module")
def one_device():
    return outputs(LLM.from_gin(TINY))


@pytest.mark.parametrize("size", [2, 4, 8])
def test_every_split_of_the_tiny_model_gives_the_tokens_of_one_device(one_device, size):
    llm = LLM.from_gin(TINY, [f"EngineConfig.tensor_parallel_size = {size}"])
    assert outputs(llm) == one_device


def test_swapping_and_the_tiers_move_pages_of_the_split_pool(one_device, tmp_path):
    """Preempted requests swapped out and back in, and a conversation whose history comes back from host
    memory and disk, through a pool split over KV heads."""
    split = ["EngineConfig.tensor_parallel_size = 2"]
    swapping = LLM.from_gin(
        TINY, split + ["EngineConfig.num_pages = 14", "EngineConfig.preemption_mode = 'swap'"]
    )
    assert outputs(swapping) == one_device
    assert swapping.engine.metrics().num_swap_outs > 0
    tiers = ["EngineConfig.num_pages = 34", "EngineConfig.kv_host_cache_gib = 1e-4"]
    replies = {}
    for size in (1, 2):  # each its own directory: the pages one split leaves on disk are the other's hits
        (tmp_path / str(size)).mkdir()
        directory = [f"EngineConfig.kv_disk_cache_dir = '{tmp_path / str(size)}'"]
        replies[size] = converse(
            LLM.from_gin(TINY, tiers + directory + [f"EngineConfig.tensor_parallel_size = {size}"])
        )
    assert [tokens for tokens, _ in replies[2]] == [tokens for tokens, _ in replies[1]]
    # The same history found in the tiers; which tier serves a page depends on when the look-ahead's disk
    # reads finish, so the split between host memory and disk may differ from run to run.
    found = {size: [hits["host"] + hits["disk"] for _, hits in replies[size]] for size in (1, 2)}
    assert found[2] == found[1] and sum(found[2]) > 0


def converse(llm: LLM, turns: int = 3) -> list[tuple[list[int], dict]]:
    """Replies and tier hits of a conversation whose turns extend the last prompt and reply, with a filler
    request between turns that evicts the history from the pool."""
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompt, replies = list(range(200, 240)), []
    for turn in range(turns):
        out = llm.generate(prompt, greedy)[0]
        replies.append((out.outputs[0].token_ids, out.metrics.tier_hit_tokens))
        llm.generate(list(range(1000, 1250)), SamplingParams(max_tokens=1))
        prompt = prompt + out.outputs[0].token_ids + list(range(300 + 10 * turn, 310 + 10 * turn))
    llm.engine.close()
    return replies


def test_smollm2_greedy_is_the_same_at_every_split():
    bindings = [
        "EngineConfig.max_model_len = 256",
        "EngineConfig.max_num_seqs = 4",
        "EngineConfig.token_buckets = (64,)",
        "EngineConfig.seq_buckets = (4,)",
        "EngineConfig.page_buckets = (16,)",
        "EngineConfig.max_num_batched_tokens = 64",
    ]
    greedy = SamplingParams(max_tokens=10, temperature=0)
    prompts = ["What is the capital of France?", LONG]
    results = {}
    for size in (1, 2, 4, 8):
        llm = LLM.from_gin(
            ["configs/smollm2_135m.gin"], bindings + [f"EngineConfig.tensor_parallel_size = {size}"]
        )
        results[size] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert results[2] == results[4] == results[8] == results[1]


@pytest.mark.parametrize("size, heads_split", [(1, False), (2, True), (4, False)])
def test_the_pool_is_split_over_kv_heads_where_they_divide(size, heads_split):
    llm = LLM.from_gin(TINY, [f"EngineConfig.tensor_parallel_size = {size}"])  # 4 query heads, 2 KV heads
    runner = llm.engine.runner
    k_pages = runner.kv_pool[0][0]
    assert len(k_pages.devices()) == size
    assert k_pages.sharding.spec == (
        jax.sharding.PartitionSpec("tp") if heads_split else jax.sharding.PartitionSpec()
    )
    shard_heads = k_pages.addressable_shards[0].data.shape[0]
    assert shard_heads == (2 // size if heads_split else 2)
    cfg = llm.engine.model_config
    assert kv_bytes_per_page(cfg, 8, size) * (size if heads_split else 1) == kv_bytes_per_page(cfg, 8)
    # Every weight matrix is split (the MLP and the vocabulary always; attention with the heads).
    layer = runner.params["layers_0"]
    assert layer["w_up"].addressable_shards[0].data.shape == (64, 128 // size)
    assert layer["wq"].addressable_shards[0].data.shape == (64, 64 // size if heads_split else 64)
    assert runner.params["embed"].addressable_shards[0].data.shape == (49152 // size, 64)


@pytest.mark.parametrize("size, per_layer", [(2, 2), (4, 1)])
def test_a_split_step_has_the_expected_collectives_and_no_parameter_gathers(size, per_layer):
    """Two all-reduces per layer (attention's output and the MLP's down projection) where heads are split,
    one (the MLP's) where attention is replicated, one for the embedding; nothing gathers parameters. The
    greedy sampler gathers only each device's best token per row, never the logits."""
    llm = LLM.from_gin(TINY, [f"EngineConfig.tensor_parallel_size = {size}"])
    llm.generate(["Hello there"], SamplingParams(max_tokens=2, temperature=0))
    runner = llm.engine.runner
    num_layers = llm.engine.model_config.num_layers
    ((_, forward),) = [(k, p) for k, p in runner._forward_programs.items()]
    assert collectives(forward.as_text()) == {
        "all-reduce": per_layer * num_layers + 1,
        "all-gather": 0,
        "reduce-scatter": 0,
        "all-to-all": 0,
        "collective-permute": 0,
    }
    ((key, sampler),) = runner._sample_programs.items()
    assert key[1] == "greedy"
    rows = key[0]
    for shape in re.findall(r"= \w+\[([\d,]+)\]\{[\d,]+\} all-gather\(", sampler.as_text()):
        assert np.prod([int(d) for d in shape.split(",")]) <= rows * size, shape


PREFILL = dict(  # one row of 20 tokens
    token_ids=np.arange(3, 23, dtype=np.int32),
    positions=np.arange(20, dtype=np.int32),
    metadata=AttentionMetadata(
        np.arange(8, 28, dtype=np.int32), np.array([0, 20], np.int32), np.array([20], np.int32),
        np.array([[1, 2, 3, 0]], np.int32),
    ),
    logits_indices=np.array([19], np.int32),
)  # fmt: skip
DECODE = dict(  # two rows of one token each, in a bucket of four tokens (two of padding)
    token_ids=np.array([5, 9, 0, 0], np.int32),
    positions=np.array([4, 8, 0, 0], np.int32),
    metadata=AttentionMetadata(
        np.array([12, 24, 0, 0], np.int32), np.array([0, 1, 2], np.int32), np.array([5, 9], np.int32),
        np.array([[1, 0], [2, 3]], np.int32),
    ),
    logits_indices=np.array([0, 1], np.int32),
)  # fmt: skip


@pytest.mark.parametrize(
    "backend, step, decode_only",
    [("blocked", PREFILL, False), ("pallas_interpret", PREFILL, False), ("pallas_interpret", DECODE, True)],
    ids=["blocked", "pallas_interpret", "pallas_interpret_decode"],
)
def test_the_kernels_run_per_device_on_their_heads(backend, step, decode_only):
    cfg = ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_q_heads=4, num_kv_heads=2,
        head_dim=16,
    )  # fmt: skip
    params = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, llama.init_params(cfg, jax.random.key(1)))
    pages = jax.random.normal(jax.random.key(2), (cfg.num_kv_heads, 8, 8, cfg.head_dim))  # some history

    def run(mesh):
        pool = llama.init_kv_pool(cfg, 8, 8, mesh=mesh)
        pool = tuple((k + pages, v - pages) for k, v in pool)
        placed = (
            params if mesh is None else jax.device_put(params, sharding.param_shardings(cfg, mesh, params))
        )

        def f(p, pool, token_ids, positions, metadata, logits_indices):
            return llama.forward(
                p, cfg, token_ids, positions, pool, metadata, logits_indices, attention=backend,
                decode_only=decode_only, mesh=mesh,
            )  # fmt: skip

        logits, pool = jax.jit(f)(placed, pool, **step)
        return np.asarray(logits), np.asarray(pool[0][0])

    logits, pages_after = run(None)
    split_logits, split_pages = run(sharding.make_mesh(jax.devices()[:2]))
    np.testing.assert_allclose(split_logits, logits, atol=1e-4, rtol=1e-5)
    # The K written is a projection whose column-split matmul XLA:CPU may block differently (last bits).
    np.testing.assert_allclose(split_pages, pages_after, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "binding, message",
    [
        (
            "EngineConfig.tensor_parallel_size = 3",
            r"tensor_parallel_size 3 does not divide the model's intermediate_size \(128\)",
        ),
        (
            "EngineConfig.tensor_parallel_size = 16",
            r"tensor_parallel_size 16 needs 16 devices in each of the 1 processes; this one has 8",
        ),
        ("EngineConfig.tensor_parallel_size = 0", "tensor_parallel_size must be a positive int, got 0"),
        ("EngineConfig.data_parallel_size = -1", "data_parallel_size must be a positive int, got -1"),
    ],
)
def test_a_split_that_cannot_be_made_names_the_field(binding, message):
    with pytest.raises(ValueError, match=message):
        LLM.from_gin(TINY, [binding])


def test_a_mesh_is_never_made_over_fewer_devices_than_asked():
    with pytest.raises(ValueError, match="tensor_parallel_size 16 needs that many devices; this process has"):
        sharding.tensor_parallel_mesh(16)
    with pytest.raises(ValueError, match="tensor_parallel_size 2 does not match the 3 devices given"):
        sharding.tensor_parallel_mesh(2, jax.devices()[:3])
    assert sharding.tensor_parallel_mesh(4).devices.tolist() == jax.local_devices()[:4]


def test_host_memory_counts_every_devices_copy_of_a_page():
    """kv_host_cache_gib and swap_space_gib are host memory: a split page is the whole page once, a replicated
    one (the tiny model's 2 KV heads over 4 devices) a whole page per device."""
    sizes = ["EngineConfig.kv_host_cache_gib = 1e-3", "EngineConfig.preemption_mode = 'swap'"]
    sizes += ["EngineConfig.swap_space_gib = 1e-3"]
    pages = {}
    for size in (1, 2, 4):
        engine = LLM.from_gin(TINY, sizes + [f"EngineConfig.tensor_parallel_size = {size}"]).engine
        pages[size] = (engine.store.host_capacity_pages, engine.scheduler.kv_cache.num_swap_pages)
        engine.close()
    assert pages[2] == pages[1]
    assert pages[4] == (pages[1][0] // 4, pages[1][1] // 4)


def test_a_checkpoint_that_cannot_be_split_fails_before_its_weights_load(monkeypatch):
    from jaxpage import engine

    def load_model(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(engine, "load_model", load_model)
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size 5 does not divide the model's intermediate_size"
    ):
        LLM(tensor_parallel_size=5)  # the embedded SmolLM2 GGUF: 1,536
