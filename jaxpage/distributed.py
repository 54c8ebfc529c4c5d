"""Many devices and many processes: which devices each data-parallel engine gets, which share of the work each
process takes, and gathering the processes' results, all on JAX's own machinery (`jax.distributed`, its
collectives; gloo between CPU processes).

A run over several hosts starts the same command once per host (process). Each process runs
`data_parallel_size / process_count` engines on its own devices, `tensor_parallel_size` devices each (tensor
parallelism stays inside a host), on its contiguous share of the inputs; the first process gathers every
process's results, in input order.
"""

import json
import os

import jax
import numpy as np

from jaxpage.config import EngineConfig

# Environment variables a launcher can set instead of passing the arguments of `initialize`.
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAXPAGE_COORDINATOR_ADDRESS",
    "JAXPAGE_NUM_PROCESSES",
    "JAXPAGE_PROCESS_ID",
)


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Joins this process to a multi-process run (`jax.distributed.initialize`), from the arguments or
    else the JAXPAGE_* environment variables. Returns False, doing nothing, when neither names a coordinator.

    Raises:
      ValueError naming the argument, when the process count or id is missing or out of range.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if coordinator_address is None:
        return False
    num_processes = _int_setting("num_processes", num_processes, ENV_NUM_PROCESSES)
    process_id = _int_setting("process_id", process_id, ENV_PROCESS_ID)
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    # CPU processes exchange collectives through gloo (the default, none, refuses multi-process work); the
    # setting touches nothing but the CPU backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def _int_setting(name: str, value: int | None, env: str) -> int:
    if value is not None:
        return value
    text = os.environ.get(env)
    if text is None:
        raise ValueError(f"a multi-process run needs {name} (or ${env})")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"${env} must be an int, got {text!r}") from None


def replica_devices(config: EngineConfig) -> list[list[jax.Device]]:
    """This process's data-parallel engines' devices: `data_parallel_size / process_count` groups of
    `tensor_parallel_size` local devices.

    Raises:
      ValueError naming the fields, when the processes cannot split the replicas evenly or this process has
      too few devices.
    """
    tp, dp, processes = config.tensor_parallel_size, config.data_parallel_size, jax.process_count()
    if dp % processes:
        raise ValueError(
            f"data_parallel_size {dp} must be a multiple of the {processes} processes (each runs as many "
            "engines)"
        )
    local = jax.local_devices()
    replicas = dp // processes
    if replicas * tp > len(local):
        raise ValueError(
            f"data_parallel_size {dp} x tensor_parallel_size {tp} needs {replicas * tp} devices in each of "
            f"the {processes} processes; this one has {len(local)} ({local[0].platform})"
        )
    return [local[i * tp : (i + 1) * tp] for i in range(replicas)]


def share(count: int, index: int, parts: int) -> range:
    """Part `index` of `parts` contiguous, nearly equal parts of `range(count)` (the first ones longer)."""
    size, extra = divmod(count, parts)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


def process_share(count: int) -> range:
    """This process's contiguous share of `count` inputs."""
    return share(count, jax.process_index(), jax.process_count())


def gather_to_first(items: list, chunk_bytes: int = 64 << 20) -> list | None:
    """Every process's `items` (JSON-serialisable), concatenated in process order, on the first process;
    None on the others. Every process must call it (it is a collective).

    The JSON travels through the devices in rounds of `chunk_bytes` per process, so a large output never
    needs more than processes x chunk_bytes of device memory at once.
    """
    if jax.process_count() == 1:
        return list(items)
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(items).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int64)).reshape(-1)
    chunk = int(min(chunk_bytes, max(1, sizes.max())))  # one shape for every round: one compilation
    first, pieces = jax.process_index() == 0, []
    for start in range(0, int(sizes.max()), chunk):
        piece = np.zeros(chunk, np.uint8)
        own = data[start : start + chunk]
        piece[: own.size] = own
        gathered = multihost_utils.process_allgather(piece)  # [processes, chunk]
        if first:
            pieces.append(gathered)
    if not first:
        return None
    merged = []
    for process, size in enumerate(sizes):
        text = b"".join(bytes(round_[process]) for round_ in pieces)[:size]
        merged += json.loads(text)
    return merged
