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
    # min_programs 264 (2 waves): 528 was 9-12% slower at B=32 (more splits, more combine), equal at B >= 128,
    # and within 2% at B = 1, 8; after the single-split path, 132 lost 4% at B=32 and 10% at B=1. Sweeps:
    # benchmarks/results/kernels_nvidia-h100-80gb-hbm3_20261123-153733.json, -153821.json, -154614.json.
    ("H100", 128): DecodeBlocks(block_kv=64, min_programs=264, num_warps=4, num_stages=3),
    ("H100", 64): DecodeBlocks(block_kv=128, min_programs=264, num_warps=4, num_stages=3),
    ("default", 128): DecodeBlocks(block_kv=64, min_programs=256, num_warps=4, num_stages=2),
    ("default", 64): DecodeBlocks(block_kv=64, min_programs=256, num_warps=4, num_stages=2),
}
_RAGGED = {
    # block_kv 128: 11-15% more TFLOP/s than 64 at chunks 2048 and 8192, with or without a prefix; block_m 64
    # or 256, 4 warps, fewer stages all lose. Sweeps:
    # benchmarks/results/kernels_nvidia-h100-80gb-hbm3_20261123-153753.json and -153841.json. Since the
    # page-id prefetch, block_kv 64 and 128 are within 3% and 4 stages of 128 no longer fit (-160454.json).
    ("H100", 128): RaggedBlocks(block_m=128, block_kv=128, num_warps=8, num_stages=3),
    ("H100", 64): RaggedBlocks(block_m=128, block_kv=64, num_warps=4, num_stages=3),
    ("default", 128): RaggedBlocks(block_m=64, block_kv=64, num_warps=4, num_stages=2),
    ("default", 64): RaggedBlocks(block_m=64, block_kv=64, num_warps=4, num_stages=2),
}
_KV_WRITE = {"default": KvWriteBlocks(block_tokens=16, num_warps=4)}

# H200 has the H100's SMs and shared memory with faster HBM: the same blocks are the right first guess.
_FAMILIES = (("H100", "H100"), ("H200", "H100"), ("GH200", "H100"))


# Shared memory one program may take (the per-block opt-in maximum): the H100's 227 KiB, and for every other
# device the 99 KiB of the smallest Ampere-and-later part, which every GPU of the "default" rows offers.
_SHARED_MEMORY = {"H100": 232448, "default": 101376}


def shared_memory_bytes(blocks, *, q_rows: int, head_dim: int, itemsize: int) -> int:
    """What a program of the attention kernels holds in shared memory: `num_stages` buffers of a K and a V
    block, plus the query rows (a wgmma operand). Triton 3.x allocates exactly this for the kernels' loops."""
    return (2 * blocks.num_stages * blocks.block_kv + q_rows) * head_dim * itemsize + 1024


def fit_shared_memory(blocks, *, q_rows: int, head_dim: int, itemsize: int, device_kind: str | None = None):
    """`blocks` shrunk until a program fits the device's shared memory: fewer pipeline stages down to 2, then
    smaller KV blocks. Table rows are tuned for bf16; float32 doubles every buffer."""
    limit = _SHARED_MEMORY[device_family(device_kind)]
    fits = lambda b: shared_memory_bytes(b, q_rows=q_rows, head_dim=head_dim, itemsize=itemsize) <= limit
    while not fits(blocks) and blocks.num_stages > 2:
        blocks = dataclasses.replace(blocks, num_stages=blocks.num_stages - 1)
    while not fits(blocks) and blocks.block_kv > 16:
        blocks = dataclasses.replace(blocks, block_kv=blocks.block_kv // 2)
    return blocks


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
