"""Which kernels a stretch of steps kept the GPU busy with, from a JAX profiler trace.

`profile_steps` wraps a callable in `jax.profiler.trace` and reads back the Perfetto trace JSON it writes:
every complete event of a device process ("/device:GPU:0", one thread per stream) is a kernel or a copy.
The table sums them by name, sorts by device time, and tags each with a kind (attention, matmul, copy, other)
so a step's time can be set against its roofline. Busy time is the union of the device intervals; idle is the
rest of the span from the first device event to the last: the GPU-idle share of the window, measured.
"""

import collections
import gzip
import json
import tempfile
from pathlib import Path

import jax
import numpy as np

# Substrings of kernel names, in the order they are tried: Pallas kernels carry their pallas_call names.
_KINDS = (
    ("attention", ("attention",)),
    ("kv_write", ("write_kv", "kv_write")),
    # Tensor parallelism's all-reduces: NCCL's kernels, or XLA's own one-shot ones.
    ("collective", ("nccl", "all_reduce", "allreduce", "all-reduce", "all_gather", "reduce_scatter")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "dot")),
    ("copy", ("memcpy", "memset", "copy")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in _KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "other"


def device_events(trace: dict) -> list[tuple[str, float, float]]:
    """(name, start µs, duration µs) of every complete event in the trace's device processes."""
    return [event for events in events_by_device(trace).values() for event in events]


def events_by_device(trace: dict) -> dict[int, list[tuple[str, float, float]]]:
    """`device_events`, apart for each device (a tensor-parallel step runs on several)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    device_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and str(e.get("args", {}).get("name", "")).startswith("/device:")
    }
    by_device = {pid: [] for pid in sorted(device_pids)}
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e:
            by_device[e["pid"]].append((e["name"], float(e["ts"]), float(e["dur"])))
    return {pid: device for pid, device in by_device.items() if device}


def busy_microseconds(events: list[tuple[str, float, float]]) -> float:
    """Length of the union of the events' intervals (streams overlap; one busy device counts once)."""
    busy, end = 0.0, -np.inf
    for _, start, duration in sorted(events, key=lambda e: e[1]):
        stop = start + duration
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def summarize(
    events: list[tuple[str, float, float]], num_steps: int, top: int = 25, devices: list[list] | None = None
) -> dict:
    """Per-step device milliseconds by kind and for the `top` costliest kernels, busy and idle share.
    `devices`: the same events apart for each device, when there are several (tensor parallelism); the
    figures are then each device's average (busy time being each device's own union of intervals)."""
    if not events:
        return {"steps": num_steps, "kernels": [], "by_kind_ms": {}, "busy_ms": 0.0, "idle_share": None}
    devices = devices or [events]
    per = num_steps * len(devices)  # divides a sum over steps and devices
    total = collections.defaultdict(float)
    count = collections.Counter()
    for name, _, duration in events:
        total[name] += duration
        count[name] += 1
    by_kind = collections.defaultdict(float)
    for name, us in total.items():
        by_kind[kernel_kind(name)] += us / 1e3 / per
    span = max(s + d for _, s, d in events) - min(s for _, s, _ in events)
    busy = sum(map(busy_microseconds, devices)) / len(devices)
    ranked = sorted(total, key=total.get, reverse=True)[:top]
    return {
        "steps": num_steps,
        "devices": len(devices),
        "busy_ms": busy / 1e3 / num_steps,
        "span_ms": span / 1e3 / num_steps,
        "idle_share": 1 - busy / span if span else 0.0,
        "launches_per_step": sum(count.values()) / per,
        "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "kernels": [
            {
                "name": name,
                "kind": kernel_kind(name),
                "ms_per_step": total[name] / 1e3 / per,
                "calls_per_step": count[name] / per,
            }
            for name in ranked
        ],
    }


def profile_steps(run_steps, top: int = 25) -> dict:
    """Runs `run_steps()`, which runs some steps and returns how many, under the profiler and summarizes
    its device events per step (and per device)."""
    # No Python tracing (a call to every function the engine runs): the host then keeps nearly its own pace,
    # so the window's idle share is the device's, not the profiler's.
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=options):
            num_steps = run_steps()
        (path,) = Path(trace_dir).glob("**/perfetto_trace.json.gz")
        with gzip.open(path, "rt") as f:
            trace = json.load(f)
    devices = list(events_by_device(trace).values())
    events = [event for device in devices for event in device]
    return summarize(events, max(num_steps, 1), top, devices)


def _per_device(profile: dict) -> str:
    devices = profile.get("devices", 1)
    return f" (each of {devices} devices)" if devices > 1 else ""


def describe(profile: dict) -> str:
    if not profile.get("kernels"):
        return "device profile: no device events (a CPU run traces host threads only)"
    kinds = ", ".join(f"{kind} {ms:.2f}" for kind, ms in profile["by_kind_ms"].items())
    lines = [
        f"device profile over {profile['steps']} steps{_per_device(profile)}: "
        f"busy {profile['busy_ms']:.2f} ms per step of a "
        f"{profile['span_ms']:.2f} ms span (idle {100 * profile['idle_share']:.1f}%), "
        f"{profile['launches_per_step']:.0f} kernels per step; ms per step by kind: {kinds}",
        "| kernel | kind | ms per step | calls per step |",
        "|---|---|---|---|",
    ]
    for k in profile["kernels"]:
        name = k["name"] if len(k["name"]) <= 70 else k["name"][:67] + "..."
        lines.append(f"| {name} | {k['kind']} | {k['ms_per_step']:.3f} | {k['calls_per_step']:.1f} |")
    return "\n".join(lines)
