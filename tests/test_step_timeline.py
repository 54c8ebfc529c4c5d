"""The benchmark's device timeline: idle time between steps is bounded by the launch times, busy time per
step shape adds up (scripts/step_timeline.py)."""

import importlib.util
import time
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp

from jaxpage.batch import Bucket

_path = Path(__file__).resolve().parent.parent / "scripts" / "step_timeline.py"
_spec = importlib.util.spec_from_file_location("step_timeline", _path)
step_timeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_timeline)


class _Runner:
    """Launches take `launch_s` of host time; results are ready when the launch returns."""

    def __init__(self, launch_s: float):
        self.launch_s = launch_s

    def launch(self, inputs, programs=None):
        time.sleep(self.launch_s)
        return SimpleNamespace(sampled=SimpleNamespace(token_ids=jnp.zeros(4, jnp.int32)))


def _inputs(rows: int):
    return SimpleNamespace(bucket=Bucket(16, rows, 2), decode_only=True)


def test_idle_time_is_the_host_gap_between_steps_within_the_launch_bounds():
    runner = _Runner(launch_s=0.01)
    timeline = step_timeline.StepTimeline(runner)
    for rows in (4, 4, 8):
        runner.launch(_inputs(rows))
        time.sleep(0.03)  # host work between steps: the device has nothing queued
    result = timeline.close()
    assert runner.launch.__func__ is _Runner.launch  # unwrapped
    assert result["steps"] == 3
    # Between the first launch and the last result: two gaps of ~30 ms of host work and two launches of
    # ~10 ms, in which the device was idle too (these results are ready the moment a launch returns).
    assert result["gpu_idle_share_low"] < result["gpu_idle_share_high"]
    assert 0.5 < result["gpu_idle_share_high"] <= 1.0
    shapes = {(s["rows"], s["steps"]) for s in result["by_shape"]}
    assert shapes == {(4, 2), (8, 1)}
    assert "GPU idle" in step_timeline.describe(result)
