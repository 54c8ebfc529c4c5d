"""Data parallelism: several engines on disjoint devices of 8 CPU devices, in one process (`LLM`,
scripts/generate.py) and across processes (`jax.distributed` on localhost, gloo collectives); every split
gives the outputs of one engine, in input order."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxpage import LLM, SamplingParams, distributed

ROOT = Path(__file__).resolve().parent.parent
TINY = [str(ROOT / "configs" / "tiny_test.gin")]
SPLIT = ["EngineConfig.tensor_parallel_size = 2", "EngineConfig.data_parallel_size = 2"]
PROMPTS = [list(range(100 + i, 106 + i + 3 * i)) for i in range(32)]  # 6 to 99 tokens
PARAMS = [
    SamplingParams(max_tokens=10, temperature=0)
    if i % 2
    else SamplingParams(max_tokens=10, temperature=0.9, seed=i)
    for i in range(32)
]

TEXTS = [" ".join(f"page {j}" for j in range(i % 9 + 1)) for i in range(32)]


def _load_generate_script():
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_script = _load_generate_script()


def tokens(outputs) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in outputs]


@pytest.fixture(scope="module")
def one_engine():
    return LLM.from_gin(TINY)


@pytest.fixture(scope="module")
def replicas():
    return LLM.from_gin(TINY, SPLIT)


def test_two_replicas_of_two_devices_give_the_outputs_of_one_engine(one_engine, replicas):
    assert [sorted(r.engine.runner.mesh.device_ids.flat) for r in replicas.replicas] == [[0, 1], [2, 3]]
    expected = tokens(one_engine.generate(PROMPTS, PARAMS))
    outputs = replicas.generate(PROMPTS, PARAMS)
    assert tokens(outputs) == expected
    assert [o.prompt_token_ids for o in outputs] == PROMPTS
    assert len({o.request_id for o in outputs}) == len(PROMPTS)  # the replicas share one count of ids
    # Both replicas served their half.
    assert all(r.engine.metrics().num_steps > 0 for r in replicas.replicas)


def test_a_bad_prompt_in_any_share_fails_the_call_before_anything_runs(replicas):
    prompts = PROMPTS[:6] + [[10**9]]  # the last prompt falls in the second replica's share
    with pytest.raises(ValueError, match=r"prompt 6: .*1000000000"):
        replicas.generate(prompts, SamplingParams(max_tokens=4))
    for replica in replicas.replicas:
        assert not replica.engine.has_unfinished_requests()
        assert replica.engine.pool.num_free_pages == replica.engine.pool.num_usable_pages


def test_the_batch_script_serves_each_share_on_its_replica(one_engine, replicas):
    lines = [json.dumps({"prompt": TEXTS[i], "max_tokens": 10, "temperature": 0}) for i in range(12)]
    lines.insert(5, json.dumps({"prompt": "x", "temperature": -1}))
    rows = generate_script.serve(replicas, lines)
    expected = generate_script.serve(one_engine, lines)
    assert [row["line"] for row in rows] == list(range(1, 14))
    assert "temperature" in rows[5]["error"]
    assert [served(row) for row in rows] == [served(row) for row in expected]


def served(row: dict):
    """What a row says was generated (logprobs differ in the last bits across splits; metrics are times)."""
    if "error" in row:
        return row["id"], row["error"]
    return row["id"], [(o["token_ids"], o["text"], o["finish_reason"]) for o in row["outputs"]]


@pytest.mark.parametrize("count, parts", [(10, 3), (3, 4), (0, 2), (7, 1)])
def test_shares_are_contiguous_and_cover_everything_once(count, parts):
    shares = [distributed.share(count, i, parts) for i in range(parts)]
    assert [i for share in shares for i in share] == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_more_replicas_than_devices_or_a_missing_process_setting_is_named(monkeypatch):
    with pytest.raises(ValueError, match="data_parallel_size 8 x tensor_parallel_size 2 needs 16 devices"):
        LLM.from_gin(TINY, ["EngineConfig.tensor_parallel_size = 2", "EngineConfig.data_parallel_size = 8"])
    monkeypatch.delenv(distributed.ENV_PROCESS_ID, raising=False)
    with pytest.raises(ValueError, match=r"needs process_id \(or \$JAXPAGE_PROCESS_ID\)"):
        distributed.initialize("localhost:1", num_processes=2)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), got 2"):
        distributed.initialize("localhost:1", num_processes=2, process_id=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed_give_the_single_process_result(one_engine, tmp_path):
    """The same command in two processes on localhost (4 CPU devices each: two replicas of two devices per
    process); the first writes every line's row, in input order."""
    lines = [
        json.dumps({"id": f"r{i}", "prompt": p, "max_tokens": 8, "temperature": 0})
        for i, p in enumerate(PROMPTS[:20])
    ]
    input_path, output_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_path.write_text("\n".join(lines) + "\n")
    port = _free_port()
    command = [
        sys.executable, str(ROOT / "scripts" / "generate.py"), f"--gin_file={TINY[0]}",
        "--gin_bindings=EngineConfig.tensor_parallel_size = 2",
        "--gin_bindings=EngineConfig.data_parallel_size = 4",
        f"--input={input_path}", f"--output={output_path}", f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
    ]  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    processes = [
        subprocess.Popen(command + [f"--process_id={k}"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for k in range(2)
    ]  # fmt: skip
    logs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], logs
    rows = [json.loads(row) for row in output_path.read_text().splitlines()]
    expected = generate_script.serve(one_engine, lines)
    assert [row["id"] for row in rows] == [f"r{i}" for i in range(20)]
    assert [served(row) for row in rows] == [served(row) for row in expected]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.config.gin", "out.jsonl"]
    assert [log.count("engine: steps") for log in logs] == [2, 2]  # two replicas in each process


def test_a_stream_on_the_first_replica_keeps_its_outputs_across_a_data_parallel_generate(
    one_engine, replicas
):
    stream = replicas.generate_stream(PROMPTS[3], SamplingParams(max_tokens=10, temperature=0))
    first = next(stream)
    replicas.generate(PROMPTS[:8], PARAMS[:8])  # steps the first replica too
    outputs = [first, *stream]
    expected = one_engine.generate(PROMPTS[3], SamplingParams(max_tokens=10, temperature=0))[0]
    assert outputs[-1].finished and outputs[-1].outputs[0].token_ids == expected.outputs[0].token_ids


def test_a_failing_replica_stops_the_others_at_once_and_nothing_leaks(replicas, monkeypatch):
    first, second = replicas.replicas
    steps_before = first.engine.metrics().num_steps

    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(second.engine, "step", broken_step)
    # The first share would take ~150 steps: the failure must not wait for it (nor for a final output).
    long = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)
    with pytest.raises(RuntimeError, match="device lost"):
        replicas.generate(PROMPTS[:4], long)
    assert first.engine.metrics().num_steps - steps_before < 50
    monkeypatch.undo()
    for replica in replicas.replicas:
        replica.engine.step()  # a step the overlap left in flight is read
        assert not replica.engine.has_unfinished_requests()
        assert replica.engine.pool.num_free_pages == replica.engine.pool.num_usable_pages


def test_the_gather_to_the_first_process_goes_in_rounds_of_bounded_size(monkeypatch):
    """Two processes simulated: each allgather returns this process's array and another's (here: [x, x + 0],
    so both processes hold the same rows); rounds of 7 bytes split the JSON mid-token."""
    from jax.experimental import multihost_utils

    shapes = []

    def allgather(x):
        shapes.append(x.shape)
        return np.stack([x, x])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    rows = [{"line": i, "text": "é" * i} for i in range(5)]
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert distributed.gather_to_first(rows, chunk_bytes=7) == rows + rows
    assert set(shapes[1:]) == {(7,)} and len(shapes) > 10
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert distributed.gather_to_first(rows, chunk_bytes=7) is None
