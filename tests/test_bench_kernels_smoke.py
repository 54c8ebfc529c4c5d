"""scripts/bench_kernels.py end to end on tiny shapes in interpret mode: the plumbing, not the timings."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from absl import flags

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # as when run: the script imports its sibling modules
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flags.FLAGS(["bench_kernels", "--smoke"])
    return module


def test_smoke_run_writes_every_section(bench, tmp_path):
    json_path, md_path = bench.run(bench.options_from_flags(), tmp_path, "bench_kernels --smoke")
    result = json.loads(json_path.read_text())
    assert result["metadata"]["jax"] and result["metadata"]["device"]
    assert "--smoke" in result["metadata"]["command"]
    rows = {row["section"]: row for row in result["rows"]}
    assert set(rows) == {"hbm", "decode", "prefill", "mixed", "kv_write"}
    # Every variant ran (a string here would be a captured error) and the derived ratios were computed.
    for name in ("ours_s", "ours_stages1_s", "ours_ragged_s", "jax_s", "dense_s"):
        assert isinstance(rows["decode"][name], float), (name, rows["decode"][name])
    assert rows["decode"]["jax_config"] == "k_splits=1,ppcb=3"  # the other configuration does not divide
    assert rows["decode"]["speedup_vs_jax"] > 0 and rows["decode"]["fraction_of_hbm"] > 0
    for name in ("ours_s", "ours_stages1_s", "dense_s"):
        assert isinstance(rows["prefill"][name], float), (name, rows["prefill"][name])
    assert rows["prefill"]["tflops_vs_dense"] > 0 and rows["kv_write"]["gb_per_s"] > 0
    assert rows["mixed"]["mixed_speedup"] > 0, rows["mixed"]
    markdown = md_path.read_text()
    assert "### decode" in markdown and "### prefill" in markdown and "error" not in markdown


def test_unknown_section_raises(bench, tmp_path):
    opts = dataclasses.replace(bench.options_from_flags(), sections=("decode", "bogus"))
    with pytest.raises(ValueError, match="sections must be among .* got \\['bogus'\\]"):
        bench.run(opts, tmp_path, "bench_kernels")


def test_sweep_variants_move_one_knob_or_follow_the_overrides(bench):
    tuned = bench.tuning.DecodeBlocks(block_kv=64, min_programs=264, num_warps=4, num_stages=3)
    axes = dict(block_kv=(32, 64), num_stages=(2,))
    assert bench.block_variants(tuned, axes, []) == {
        "tuned": tuned,
        "block_kv=32": dataclasses.replace(tuned, block_kv=32),
        "num_stages=2": dataclasses.replace(tuned, num_stages=2),
    }
    explicit = bench.block_variants(tuned, axes, ["block_kv=128,num_warps=8"])
    assert explicit == {
        "tuned": tuned,
        "block_kv=128,num_warps=8": dataclasses.replace(tuned, block_kv=128, num_warps=8),
    }
