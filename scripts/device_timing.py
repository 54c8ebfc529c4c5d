"""Device time of a call without host dispatch: n calls chained in one jitted loop, best of several runs;
the HBM read bandwidth measured that way; the command line a result records. Shared by the GPU benchmarks."""

import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp


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


def hbm_bytes_per_s(gib: float, calls: int = 20) -> float:
    """Read bandwidth of `jnp.sum` over a random float32 array of `gib` GiB, as bench_kernels.py's hbm
    section measures it: device time of chained calls. Timing single calls from the host would add their
    dispatch and sync: ~20% low on an H100."""
    x = jax.random.normal(jax.random.key(0), (int(gib * 2**30) // 4,), jnp.float32)
    first = jnp.zeros((), jnp.float32)
    loop = jax.jit(chained_loop(jnp.sum, calls), donate_argnums=0).lower(first, (x,)).compile()
    return x.nbytes / best_seconds(loop, first, (x,), calls, trials=3)


def command_line() -> str:
    """The command without --output_dir: where the files went is no part of the measurement."""
    args, skip_value = [], False
    for arg in sys.argv[1:]:
        if skip_value:
            skip_value = False
        elif arg.startswith("--output_dir"):
            skip_value = arg == "--output_dir"
        else:
            args.append(arg)
    return " ".join([Path(sys.argv[0]).name, *args])
