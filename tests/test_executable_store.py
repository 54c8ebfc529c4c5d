"""Whole compiled programs on disk (jaxpage.executable_store): a warm start loads every step program without
tracing it and generates the same tokens; a damaged entry, or one from another source or config, is never
loaded; programs JAX itself loaded from its cache are never stored (XLA:CPU cannot run them once serialized
again)."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from jaxpage import executable_store
from jaxpage.config import EngineConfig
from jaxpage.executable_store import ExecutableStore
from jaxpage.runner import Runner
from models.config import ModelConfig
from models.llama import init_params

REPO = Path(__file__).resolve().parents[1]

_GENERATE = """
import json, sys
import jaxpage
from jaxpage import SamplingParams

bindings = [
    f"EngineConfig.compilation_cache_dir = {sys.argv[1]!r}",
    "EngineConfig.attention_backend = 'auto'",  # the C++ kernel where it builds: registered before a load
]
llm = jaxpage.LLM.from_gin(["configs/tiny_test.gin"], bindings)
llm.engine.warmup()
# Greedy, seeded sampling and penalties: every sampler variant's program runs.
params = [
    SamplingParams(max_tokens=8, temperature=0),
    SamplingParams(max_tokens=8, temperature=0.8, seed=3),
    SamplingParams(max_tokens=8, temperature=0.8, seed=4, repetition_penalty=1.3),
]
outputs = llm.generate(["Hello there", "The capital of", "Once upon"], params)
store = llm.engine.runner.executable_store
print(json.dumps([[o.outputs[0].token_ids for o in outputs], store.num_loaded, store.num_stored]))
"""


def _generate(cache_dir: Path) -> tuple[list, int, int, str]:
    """Greedy tokens of a tiny engine warmed up in a fresh process on `cache_dir`, the programs its store
    loaded and stored, and its stderr."""
    run = subprocess.run(
        [sys.executable, "-c", _GENERATE, str(cache_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    tokens, loaded, stored = json.loads(run.stdout.splitlines()[-1])
    return tokens, loaded, stored, run.stderr


def test_a_warm_start_loads_every_step_program_and_generates_the_same(tmp_path):
    cache = tmp_path / "jax"
    tokens, loaded, stored, _ = _generate(cache)
    assert loaded == 0 and stored > 0
    entries = sorted((cache / "jaxpage-executables").iterdir())
    assert len(entries) == stored

    again, loaded, stored_again, _ = _generate(cache)
    assert again == tokens
    assert (loaded, stored_again) == (stored, 0)

    # A damaged entry is deleted and its program compiled again (from JAX's cache: so not stored again).
    entries[0].write_bytes(entries[0].read_bytes()[:-100])
    again, loaded, _, stderr = _generate(cache)
    assert again == tokens and loaded == stored - 1
    assert "did not load" in stderr and not entries[0].exists()

    # Every program then comes from JAX's cache, and none is stored.
    shutil.rmtree(cache / "jaxpage-executables")
    again, loaded, stored_again, _ = _generate(cache)
    assert again == tokens and (loaded, stored_again) == (0, 0)


def _fresh_program() -> tuple[jax.stages.Lowered, jax.Array]:
    """A program no cache has seen (a constant of its own), lowered, and an argument for it."""
    scale = random.random()
    x = jnp.arange(4.0)
    return jax.jit(lambda v: v * scale + 1).lower(x), x


def test_the_name_covers_the_source_the_environment_and_the_description(tmp_path, monkeypatch):
    devices = jax.devices()[:1]
    lowered, x = _fresh_program()
    calls = []

    def lower():
        calls.append(1)
        return lowered

    store = ExecutableStore(tmp_path, executable_store.environment(devices), devices)
    first = store.compiled(("program", 1), lower)
    assert store.num_stored == 1 and len(calls) == 1
    loaded = ExecutableStore(tmp_path, executable_store.environment(devices), devices)
    assert jnp.array_equal(loaded.compiled(("program", 1), lower)(x), first(x))
    assert loaded.num_loaded == 1 and len(calls) == 1

    loaded.compiled(("program", 2), lower)  # another description
    monkeypatch.setattr(executable_store, "_source_digest", lambda: "edited")
    ExecutableStore(tmp_path, executable_store.environment(devices), devices).compiled(("program", 1), lower)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/nowhere")
    ExecutableStore(tmp_path, executable_store.environment(devices), devices).compiled(("program", 1), lower)
    monkeypatch.undo()
    with jax.default_matmul_precision("highest"):  # a setting of this thread's
        loaded.compiled(("program", 1), lower)
    assert len(calls) == 5
    loaded.compiled(("program", 1), lower)
    assert len(calls) == 5


TINY = ModelConfig(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_q_heads=4, num_kv_heads=2,
    head_dim=8, max_position_embeddings=64,
)  # fmt: skip


@pytest.fixture
def cache_dir(tmp_path):
    """A compilation cache of the test's own, and JAX's as it was afterwards."""
    previous = jax.config.jax_compilation_cache_dir
    yield tmp_path / "jax"
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()


def _runner(cache_dir) -> Runner:
    config = EngineConfig(
        page_size=4, num_pages=16, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=32,
        token_buckets=(8,), seq_buckets=(4,), page_buckets=(8,), attention_backend="reference",
        compilation_cache_dir=str(cache_dir),
    )  # fmt: skip
    return Runner(TINY, init_params(TINY, jax.random.key(0)), config)


def test_a_stored_program_that_fails_to_run_is_deleted_and_compiled_again(cache_dir):
    _runner(cache_dir).warmup()
    runner = _runner(cache_dir)
    runner.warmup()
    store = runner.executable_store
    assert store.num_loaded > 0
    key, loaded = next(iter(runner._forward_programs.items()))
    entry = store._paths[id(loaded)]

    def broken(*args):  # as an executable whose code is missing fails
        raise RuntimeError("Function fusion not found")

    store._paths[id(broken)] = entry
    runner._forward_programs[key] = broken
    runner._run_once(key, runner._forward_programs, runner._compile_forward, runner._run_forward_on_padding)
    assert not entry.exists()
    assert runner._forward_programs[key] is not broken
    assert not any(page.is_deleted() for layer in runner.kv_pool for page in layer)


def test_a_cache_directory_it_cannot_write_leaves_the_runner_without_a_store(cache_dir, caplog):
    cache_dir.mkdir(parents=True)
    (cache_dir / "jaxpage-executables").write_text("a file where the store's directory would go")
    runner = _runner(cache_dir)
    assert runner.executable_store is None and "no executable store" in caplog.text
    runner.warmup()


@pytest.mark.parametrize("damage", [lambda b: b[:10], lambda b: b[:-1] + bytes([b[-1] ^ 1]), lambda b: b""])
def test_a_damaged_entry_is_a_miss(tmp_path, damage, caplog):
    devices = jax.devices()[:1]
    lowered, x = _fresh_program()
    store = ExecutableStore(tmp_path, executable_store.environment(devices), devices)
    store.compiled("p", lambda: lowered)
    (entry,) = tmp_path.iterdir()
    entry.write_bytes(damage(entry.read_bytes()))
    again = ExecutableStore(tmp_path, executable_store.environment(devices), devices)
    assert again.compiled("p", lambda: lowered)(x).shape == x.shape
    assert again.num_loaded == 0 and "did not load" in caplog.text


def test_least_recently_used_entries_go_first_past_the_size(tmp_path):
    devices = jax.devices()[:1]
    for age, name in enumerate(["new", "middle", "old"]):
        path = tmp_path / f"{name}.jaxexe"
        path.write_bytes(b"x" * 100)
        os.utime(path, (1e9 - age * 1000, 1e9 - age * 1000))
    ExecutableStore(tmp_path, {}, devices, max_bytes=250)
    assert sorted(p.stem for p in tmp_path.iterdir()) == ["middle", "new"]
