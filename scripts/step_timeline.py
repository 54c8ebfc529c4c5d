"""When the device was busy with the engine's steps, measured from the host: for the GPU-idle share of a run.

A thread waits, in launch order, for each step's samples (the step's last program) to be ready and notes the
time. The device runs steps in launch order, so step i occupies it from max(its launch, step i-1 done) to its
own done time, and between step i-1's done time and step i's launch it had nothing queued. Launch times are
taken both when `Runner.launch` is entered and when it returns (the forward program is queued somewhere in
between), which bounds the idle time from both sides. Done times are late by the waiting thread's wake-up
(tens of microseconds), which makes the idle time, if anything, smaller than it was.
"""

import collections
import queue
import threading
import time

import numpy as np


class StepTimeline:
    """Wraps `runner.launch` to time every step until `close`."""

    def __init__(self, runner):
        self.launch_start: list[float] = []
        self.launch_end: list[float] = []
        self.done: list[float] = []
        self.shapes: list[tuple] = []  # (T, B, P, decode-only) of each step
        self._queue: queue.Queue = queue.Queue()
        self._runner = runner
        self._launch = runner.launch
        runner.launch = self._timed_launch
        self._thread = threading.Thread(target=self._wait_for_steps, daemon=True)
        self._thread.start()

    def _timed_launch(self, inputs, programs=None):
        start = time.perf_counter()
        step = self._launch(inputs, programs)
        self.launch_start.append(start)
        self.launch_end.append(time.perf_counter())
        b = inputs.bucket
        self.shapes.append((b.num_tokens, b.num_rows, b.pages_per_row, inputs.decode_only))
        self._queue.put(step.sampled.token_ids)
        return step

    def _wait_for_steps(self):
        while (token_ids := self._queue.get()) is not None:
            token_ids.block_until_ready()
            self.done.append(time.perf_counter())

    def close(self) -> dict:
        """Stops timing; returns the idle share of the wall time from the first launch to the last done time,
        and per step shape the count and mean device milliseconds."""
        self._queue.put(None)
        self._thread.join()
        self._runner.launch = self._launch
        start, end, done = (np.array(x) for x in (self.launch_start, self.launch_end, self.done))
        if not len(done):
            return {}
        wall = done[-1] - start[0]
        previous_done = np.concatenate([[start[0]], done[:-1]])
        busy_from = np.maximum(start, previous_done)
        device_ms = 1e3 * (done - busy_from)
        by_shape = collections.defaultdict(list)
        for shape, ms in zip(self.shapes, device_ms.tolist(), strict=True):
            by_shape[shape].append(ms)
        return {
            "steps": len(done),
            "wall_s": float(wall),
            # Nothing queued between a step's end and the next launch: bounded by the two launch times.
            "gpu_idle_share_low": float(np.maximum(start - previous_done, 0).sum() / wall),
            "gpu_idle_share_high": float(np.maximum(end - previous_done, 0).sum() / wall),
            "mean_step_wall_ms": float(1e3 * wall / len(done)),
            "by_shape": [
                {
                    "tokens": t,
                    "rows": b,
                    "pages": p,
                    "decode_only": d,
                    "steps": len(ms),
                    "mean_device_ms": float(np.mean(ms)),
                    "total_device_s": float(np.sum(ms) / 1e3),
                }
                for (t, b, p, d), ms in sorted(by_shape.items(), key=lambda kv: -np.sum(kv[1]))
            ],  # fmt: skip
        }


def describe(timeline: dict) -> str:
    low, high = 100 * timeline["gpu_idle_share_low"], 100 * timeline["gpu_idle_share_high"]
    lines = [
        f"GPU idle {low:.1f}-{high:.1f}% of {timeline['wall_s']:.1f} s ({timeline['steps']} steps, "
        f"{timeline['mean_step_wall_ms']:.1f} ms each)",
        "  step shape (T, B, P, decode kernel): steps, mean device ms, total device s",
    ]
    for s in timeline["by_shape"][:8]:
        lines.append(
            f"  ({s['tokens']}, {s['rows']}, {s['pages']}, {s['decode_only']}): {s['steps']}, "
            f"{s['mean_device_ms']:.2f}, {s['total_device_s']:.2f}"
        )
    return "\n".join(lines)
