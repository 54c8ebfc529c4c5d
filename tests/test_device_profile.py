"""The benchmark's kernel table from a profiler trace: device events only, busy time as a union of
intervals, per-step sums by name and kind (scripts/device_profile.py)."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

_path = Path(__file__).resolve().parent.parent / "scripts" / "device_profile.py"
_spec = importlib.util.spec_from_file_location("device_profile", _path)
device_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_profile)


def _trace():
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
    ]
    kernels = [  # two streams; the copy overlaps the first gemm
        ("sm90_xmma_gemm_bf16", 0.0, 10.0, 7),
        ("MemcpyH2D", 5.0, 10.0, 8),
        ("paged_decode_attention", 20.0, 4.0, 7),
        ("write_kv", 30.0, 2.0, 7),
        ("sm90_xmma_gemm_bf16", 40.0, 10.0, 7),
    ]
    events = [{"ph": "X", "pid": 2, "tid": t, "ts": s, "dur": d, "name": n} for n, s, d, t in kernels]
    host = [{"ph": "X", "pid": 1, "tid": 1, "ts": 0.0, "dur": 100.0, "name": "PjitFunction(step)"}]
    return {"traceEvents": meta + events + host}


def test_only_device_events_are_counted():
    names = {name for name, _, _ in device_profile.device_events(_trace())}
    assert names == {"sm90_xmma_gemm_bf16", "MemcpyH2D", "paged_decode_attention", "write_kv"}


def test_summary_per_step_by_name_and_kind():
    summary = device_profile.summarize(device_profile.device_events(_trace()), num_steps=2)
    # Busy: [0, 15) + [20, 24) + [30, 32) + [40, 50) = 31 µs over a 50 µs span, for 2 steps.
    assert summary["busy_ms"] == pytest.approx(31 / 1e3 / 2)
    assert summary["span_ms"] == pytest.approx(50 / 1e3 / 2)
    assert summary["idle_share"] == pytest.approx(1 - 31 / 50)
    assert summary["launches_per_step"] == 2.5
    top = summary["kernels"][0]
    assert (top["name"], top["kind"], top["calls_per_step"]) == ("sm90_xmma_gemm_bf16", "matmul", 1.0)
    assert top["ms_per_step"] == pytest.approx(20 / 1e3 / 2)
    assert summary["by_kind_ms"] == pytest.approx(
        {"matmul": 0.01, "copy": 0.005, "attention": 0.002, "kv_write": 0.001}
    )
    assert "paged_decode_attention" in device_profile.describe(summary)


def test_a_cpu_trace_has_no_device_events():
    f = jax.jit(lambda x: x * 2)
    f(jnp.ones(4)).block_until_ready()

    def run():
        f(jnp.ones(4)).block_until_ready()
        return 1

    profile = device_profile.profile_steps(run)
    assert profile["kernels"] == [] and "no device events" in device_profile.describe(profile)


def test_two_devices_are_averaged_and_all_reduces_have_their_kind():
    meta = [
        {"ph": "M", "pid": p, "name": "process_name", "args": {"name": f"/device:GPU:{p}"}} for p in (0, 1)
    ]
    kernels = [  # each GPU: a gemm, then an all-reduce; GPU 1 a little later
        (0, "sm90_xmma_gemm_bf16", 0.0, 10.0),
        (0, "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 10.0, 2.0),
        (1, "sm90_xmma_gemm_bf16", 1.0, 10.0),
        (1, "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 11.0, 4.0),
    ]
    events = [{"ph": "X", "pid": p, "tid": 7, "ts": s, "dur": d, "name": n} for p, n, s, d in kernels]
    trace = {"traceEvents": meta + events}
    devices = list(device_profile.events_by_device(trace).values())
    summary = device_profile.summarize(device_profile.device_events(trace), 1, devices=devices)
    assert summary["devices"] == 2
    assert summary["by_kind_ms"] == pytest.approx({"matmul": 0.010, "collective": 0.003})
    assert summary["busy_ms"] == pytest.approx((12 + 14) / 2 / 1e3)
    assert "each of 2 devices" in device_profile.describe(summary)
