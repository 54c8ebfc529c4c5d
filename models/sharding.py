"""Tensor parallelism: where every parameter and the KV pool live on a mesh of devices (Megatron-style).

One logical-axis description of the parameter tree (`LOGICAL_AXES`) and one rule per logical axis decide every
`PartitionSpec`; random init, every loader and the runner place parameters with them, so weights go straight
into their shards. Column-parallel Q/K/V, gate and up (their outputs split over heads or the MLP's width),
row-parallel output and down projections (partial sums, one all-reduce each), the embedding and the LM head
split over the vocabulary. Attention is split over heads only when both the query and the KV heads divide
over the devices; otherwise (e.g. SmolLM2's 9 query and 3 KV heads) every device computes all heads and keeps
the whole KV pool, and only the MLP and the vocabulary are split.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.config import ModelConfig

AXIS = "tp"  # the mesh axis tensor parallelism splits over

# Each parameter's dimensions by logical name, keyed by its name in the tree (docs/architecture.md).
LOGICAL_AXES = {
    "embed": ("vocab", "hidden"),
    "attn_norm": ("hidden",),
    "wq": ("hidden", "q_heads"),
    "wk": ("hidden", "kv_heads"),
    "wv": ("hidden", "kv_heads"),
    "bq": ("q_heads",),
    "bk": ("kv_heads",),
    "bv": ("kv_heads",),
    "wo": ("q_heads", "hidden"),
    "mlp_norm": ("hidden",),
    "w_gate": ("hidden", "mlp"),
    "w_up": ("hidden", "mlp"),
    "w_down": ("mlp", "hidden"),
    "final_norm": ("hidden",),
    "lm_head": ("hidden", "vocab"),
}


def check_tensor_parallel(cfg: ModelConfig, size: int) -> None:
    """Raises ValueError naming the field when the model's dimensions that are always split do not divide."""
    if not (isinstance(size, int) and size >= 1):
        raise ValueError(f"tensor_parallel_size must be a positive int, got {size!r}")
    for field in ("intermediate_size", "vocab_size"):
        value = getattr(cfg, field)
        if value % size:
            raise ValueError(
                f"tensor_parallel_size {size} does not divide the model's {field} ({value}): the MLP and the "
                "vocabulary are split evenly over the devices"
            )


def shards_heads(cfg: ModelConfig, size: int) -> bool:
    """Whether attention (Q/K/V/O and the KV pool) is split over heads at this tensor-parallel size."""
    return size > 1 and cfg.num_q_heads % size == 0 and cfg.num_kv_heads % size == 0


def _rules(cfg: ModelConfig, size: int) -> dict[str, str | None]:
    heads = AXIS if shards_heads(cfg, size) else None
    split = AXIS if size > 1 else None
    return {"hidden": None, "q_heads": heads, "kv_heads": heads, "mlp": split, "vocab": split}


def make_mesh(devices) -> Mesh:
    """A one-axis mesh over `devices` (tensor parallelism across them)."""
    return Mesh(np.asarray(devices), (AXIS,))


def tensor_parallel_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    """The mesh of one engine: over `devices` (exactly tensor_parallel_size of them), else over this
    process's first tensor_parallel_size devices; never silently over fewer."""
    if devices is None:
        local = jax.local_devices()
        if len(local) < tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size {tensor_parallel_size} needs that many devices; this process has "
                f"{len(local)} ({local[0].platform})"
            )
        devices = local[:tensor_parallel_size]
    if len(devices) != tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size {tensor_parallel_size} does not match the {len(devices)} devices given"
        )
    return make_mesh(list(devices))


def param_specs(cfg: ModelConfig, size: int, params) -> dict:
    """A PartitionSpec for every leaf of `params` (arrays or shapes) at tensor-parallel size `size`."""
    rules = _rules(cfg, size)

    def spec(path, _leaf):
        return PartitionSpec(*(rules[axis] for axis in LOGICAL_AXES[path[-1].key]))

    return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(cfg: ModelConfig, mesh: Mesh, params) -> dict:
    """Where every leaf of `params` lives on `mesh`."""
    specs = param_specs(cfg, mesh.size, params)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def kv_pool_spec(cfg: ModelConfig, size: int) -> PartitionSpec:
    """The KV pool's pages `[num_kv_heads, num_pages, page_size, head_dim]` split over heads, or whole."""
    return PartitionSpec(AXIS) if shards_heads(cfg, size) else PartitionSpec()


def kv_heads_per_device(cfg: ModelConfig, size: int) -> int:
    """KV heads each device holds: what one device's memory pays per page."""
    return cfg.num_kv_heads // size if shards_heads(cfg, size) else cfg.num_kv_heads


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
