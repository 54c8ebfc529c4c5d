"""Device time of a call without host dispatch: n calls chained in one jitted loop, best of several runs.
Shared by scripts/bench_kernels.py and scripts/bench_decode_step.py."""

import math
import time

import jax


def best_seconds(exe, carry, consts, n: int, trials: int) -> float:
    """Seconds per step of a compiled `(carry, consts) -> carry` loop of n steps, best of `trials` runs."""
    carry = jax.block_until_ready(exe(carry, consts))  # warm-up: first-run allocations stay out
    best = math.inf
    for _ in range(trials):
        start = time.perf_counter()
        carry = jax.block_until_ready(exe(carry, consts))
        best = min(best, (time.perf_counter() - start) / n)
    return best


def chained_loop(fn, n: int):
    """n calls of fn inside one fori_loop, carrying fn's output. An optimization barrier ties each call's
    arguments to the previous call's output, so XLA can neither hoist the call out of the loop nor merge
    calls, at no cost on the device (no extra kernel per call); the args are loop arguments, not
    closed-over constants that would be baked into the executable."""

    def step(out, args):
        _, args = jax.lax.optimization_barrier((out, args))
        return fn(*args)

    return lambda out, args: jax.lax.fori_loop(0, n, lambda _, out: step(out, args), out)
