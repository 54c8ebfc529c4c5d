"""Block sizes for the Pallas kernels, per device and head size, in one table.

Every entry is a starting point chosen from the kernel's arithmetic (below), not a measurement;
scripts/bench_kernels.py sweeps the knobs on a GPU and the winners replace these rows, with the result file
that justifies them named in the comment.

Why the defaults look the way they do (H100: 132 SMs, 228 KiB shared memory per SM):
- Decode reads each K/V byte once and does ~2 * rows FLOPs per byte: it is bandwidth-bound, so the blocks only
  need to keep enough bytes in flight. A 64-token bf16 block of K plus V at head_dim 128 is 32 KiB; three
  pipeline stages keep ~96 KiB per program in flight, far above the ~15 KiB per SM that 3.35 TB/s x ~600 ns of
  latency needs. `min_programs` ~ 4 waves of SMs, so batch 1 with a long context is split over the KV length.
- Ragged/prefill is compute-bound at long chunks: 128 query rows x 64 KV tokens per step with 8 warps is the
  classic flash-attention tile for head_dim 128 on Hopper and Ampere; head_dim 64 halves the operand bytes, so
  4 warps suffice.
"""

import dataclasses

import jax


def _check(blocks, positive: tuple[str, ...], tiles: tuple[str, ...]) -> None:
    for name in positive:
        if getattr(blocks, name) < 1:
            raise ValueError(f"{type(blocks).__name__}.{name} must be >= 1, got {getattr(blocks, name)}")
    for name in tiles:  # Triton tiles have power-of-2 sizes, and an MMA tile is at least 16 on a side
        value = getattr(blocks, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{type(blocks).__name__}.{name} must be a power of 2 >= 16, got {value}")


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    """Blocking of the decode kernel (one query token per request)."""

    # KV tokens per inner-loop step, raised to one page when pages are larger.
    block_kv: int
    min_programs: int  # split the KV length until batch * kv_heads * splits reaches this
    num_warps: int
    num_stages: int  # >= 2 keeps the next block's pages in flight while this one is computed

    def __post_init__(self):
        _check(self, ("min_programs", "num_warps", "num_stages"), ("block_kv",))


@dataclasses.dataclass(frozen=True)
class RaggedBlocks:
    """Blocking of the ragged (prefill + decode) kernel."""

    block_m: int  # query rows per program: tokens x (query heads of one KV head, rounded up to a power of 2)
    block_kv: int  # KV tokens per inner-loop step, as in DecodeBlocks
    num_warps: int
    num_stages: int

    def __post_init__(self):
        _check(self, ("num_warps", "num_stages"), ("block_m", "block_kv"))


@dataclasses.dataclass(frozen=True)
class KvWriteBlocks:
    block_tokens: int  # new tokens per program (power of 2); each program writes one KV head
    num_warps: int

    def __post_init__(self):
        if self.block_tokens < 1 or self.block_tokens & (self.block_tokens - 1):
            raise ValueError(f"KvWriteBlocks.block_tokens must be a power of 2, got {self.block_tokens}")
        if self.num_warps < 1:
            raise ValueError(f"KvWriteBlocks.num_warps must be >= 1, got {self.num_warps}")


# (device family, head_dim) -> blocks. "default" serves every other device, the CPU interpreter included,
# where larger blocks simply mean fewer interpreted loop steps.
_DECODE = {
    ("H100", 128): DecodeBlocks(block_kv=64, min_programs=528, num_warps=4, num_stages=3),
    ("H100", 64): DecodeBlocks(block_kv=128, min_programs=528, num_warps=4, num_stages=3),
    ("default", 128): DecodeBlocks(block_kv=64, min_programs=256, num_warps=4, num_stages=2),
    ("default", 64): DecodeBlocks(block_kv=64, min_programs=256, num_warps=4, num_stages=2),
}
_RAGGED = {
    ("H100", 128): RaggedBlocks(block_m=128, block_kv=64, num_warps=8, num_stages=3),
    ("H100", 64): RaggedBlocks(block_m=128, block_kv=64, num_warps=4, num_stages=3),
    ("default", 128): RaggedBlocks(block_m=64, block_kv=64, num_warps=4, num_stages=2),
    ("default", 64): RaggedBlocks(block_m=64, block_kv=64, num_warps=4, num_stages=2),
}
_KV_WRITE = {"default": KvWriteBlocks(block_tokens=16, num_warps=4)}

# H200 has the H100's SMs and shared memory with faster HBM: the same blocks are the right first guess.
_FAMILIES = (("H100", "H100"), ("H200", "H100"), ("GH200", "H100"))


def device_family(device_kind: str | None = None) -> str:
    """Maps a `jax.Device.device_kind` (default: the first device's) to a row family of the tables."""
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    for needle, family in _FAMILIES:
        if needle in device_kind:
            return family
    return "default"


def _lookup(table: dict, head_dim: int, device_kind: str | None):
    family = device_family(device_kind)
    # A head size without a row takes the largest smaller row's blocks (smaller tiles fit), else the smallest.
    dims = sorted(d for f, d in table if f == family)
    fitting = [d for d in dims if d <= head_dim]
    return table[(family, fitting[-1] if fitting else dims[0])]


def decode_blocks(head_dim: int, device_kind: str | None = None) -> DecodeBlocks:
    return _lookup(_DECODE, head_dim, device_kind)


def ragged_blocks(head_dim: int, device_kind: str | None = None) -> RaggedBlocks:
    return _lookup(_RAGGED, head_dim, device_kind)


def kv_write_blocks(device_kind: str | None = None) -> KvWriteBlocks:
    return _KV_WRITE.get(device_family(device_kind), _KV_WRITE["default"])
