"""Counts the XLA compilations a thread runs, so serving can tell when a step compiled something after
warm-up (a stall of seconds, or minutes for a large model, in the middle of a run)."""

import contextlib
import threading

import jax

# JAX reports every backend compilation (not a persistent-cache hit) as a duration event on the thread that
# compiles; the listener counts it for that thread while `counting` is active there.
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_local = threading.local()


def _listener(event: str, duration: float, **kwargs) -> None:
    counts = getattr(_local, "counts", None)
    if counts is not None and event == _BACKEND_COMPILE:
        counts.append(duration)


jax.monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def counting():
    """Yields a list that gets the seconds of each compilation this thread runs inside the block."""
    outer = getattr(_local, "counts", None)
    _local.counts = counts = []
    try:
        yield counts
    finally:
        _local.counts = outer
        if outer is not None:
            outer.extend(counts)
