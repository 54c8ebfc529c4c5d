"""The engine's configuration: one frozen dataclass, validated when built, shared by every host-side piece."""

import dataclasses
import math
import os
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")
_ATTENTION_BACKENDS = ("auto", "cpu_kernel", "blocked", "reference", "pallas", "pallas_interpret")
_PREEMPTION_MODES = ("recompute", "swap")
_KV_ALLOCATIONS = ("paged", "reserved")


def user_cache_dir() -> Path:
    """Where jaxpage keeps what it can rebuild (compiled programs, converted weights): $JAXPAGE_CACHE_DIR,
    else $XDG_CACHE_HOME/jaxpage, else ~/.cache/jaxpage. Read when an EngineConfig is built."""
    if override := os.environ.get("JAXPAGE_CACHE_DIR"):
        return Path(override).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG base directory spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "jaxpage"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_positive_int(name: str, value) -> None:
    if not (_is_int(value) and value > 0):
        raise ValueError(f"engine config field {name} must be a positive int, got {value!r}")


def _check_buckets(name: str, buckets) -> None:
    if not (isinstance(buckets, tuple) and buckets):
        raise ValueError(f"engine config field {name} must be a non-empty tuple of ints, got {buckets!r}")
    for value in buckets:
        _check_positive_int(name, value)
    if list(buckets) != sorted(set(buckets)):
        raise ValueError(f"engine config field {name} must be strictly increasing, got {buckets!r}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine loads the model, sizes the KV pool and batches requests.

    Every step is padded to one of a few shapes (a token bucket, a row bucket, a pages-per-row bucket), so jit
    compiles a small, fixed set of programs that can all be built at warm-up.
    """

    model: str | None = None  # GGUF file or safetensors directory; None = the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"  # parameters and activations
    page_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # KV pool size including the null page 0; wins over kv_cache_gib
    kv_cache_memory_fraction: float = 0.9  # of the device memory left free after loading the weights
    # KV pool size in GiB; wins over kv_cache_memory_fraction, loses to num_pages. None: on GPU the fraction
    # of the free device memory, on CPU min(the fraction of the available memory, 1 GiB).
    kv_cache_gib: float | None = None
    max_num_seqs: int = 64  # requests running at once (rows of a step)
    max_num_batched_tokens: int = 512  # tokens run in one step, prefill and decode together
    max_model_len: int | None = None  # prompt + output tokens of one request; None = the model's context
    token_buckets: tuple[int, ...] = (16, 64, 256, 512)
    seq_buckets: tuple[int, ...] = (4, 16, 64)
    page_buckets: tuple[int, ...] = (8, 32, 128, 512)  # pages per row of the page table
    # A bucket of T tokens has at least T / this many rows (None: any seq bucket up to T). A step of many
    # tokens and few rows then pads its rows, which costs it little (the rows' logits and sampling), and the
    # grid has fewer programs to compile at start-up.
    max_bucket_tokens_per_row: int | None = None
    # "auto": pallas on GPU; on CPU the C++ kernel (float32, where a C++ compiler builds it), else "blocked"
    attention_backend: str = "auto"
    # JAX's persistent compilation cache, and converted weights; None turns either off. The defaults lie under
    # user_cache_dir(), never relative, so the working directory does not decide where caches are written.
    compilation_cache_dir: str | None = dataclasses.field(
        default_factory=lambda: str(user_cache_dir() / "jax")
    )
    checkpoint_cache_dir: str | None = dataclasses.field(
        default_factory=lambda: str(user_cache_dir() / "checkpoints")
    )
    seed: int = 0  # base of every request's sampling key, and of the seeds given to requests without one
    enable_prefix_caching: bool = True  # reuse the K/V of full pages whose token prefix was computed before
    preemption_mode: str = "recompute"  # when the pool runs dry: "recompute" the victim later, or "swap" it
    # Host memory holding swapped-out pages (preemption_mode "swap"). This and kv_host_cache_gib count every
    # device's copy: a pool replicated over a tensor-parallel mesh keeps one per device.
    swap_space_gib: float = 4.0
    # Tiers under the prefix cache (AttentionStore): cached pages are saved to host memory (this many GiB;
    # None: no tiers) when they fill or, without kv_tier_write_through, when the device pool evicts them, and
    # from there to files under kv_disk_cache_dir (at most kv_disk_cache_gib; None: no disk tier). A prefix
    # lookup that misses the pool continues there.
    kv_host_cache_gib: float | None = None
    kv_disk_cache_dir: str | None = None
    kv_disk_cache_gib: float = 10.0
    # The tiers' look-ahead: pages queued requests will look up are read from disk into host memory while
    # they wait, and host memory first evicts pages no queued request wants. False: plain LRU, and disk
    # reads on demand.
    kv_tier_lookahead: bool = True
    # Save a page to the tiers when it fills (write-through) instead of when the pool evicts it: then no save
    # lands on the step of the request whose admission evicts the page. Reused turns' TTFT was lower writing
    # through on the CPU and on an H200 (benchmarks/README.md). Saving on eviction copies fewer pages: writing
    # through cost 1% of CPU throughput and 3.9-4.8% of an H200's (8B shapes); on eviction, none measurable.
    kv_tier_write_through: bool = True
    # Saves to and loads from the tiers wait for their device<->host copies to finish before the step goes on,
    # instead of overlapping them with the device's work: only to measure what the asynchronous copies buy.
    kv_tier_sync_transfers: bool = False
    # "paged": pages are taken as tokens arrive. "reserved": a request takes, at admission, the pages of its
    # whole prompt + max_tokens (the contiguous allocation of FasterTransformer and Orca), the baseline the
    # PagedAttention paper compares against; only for that comparison.
    kv_allocation: str = "paged"
    # The most top alternatives a request may ask for (logprobs, prompt_logprobs); every sampler computes
    # this many for every row, so keep it small.
    max_logprobs: int = 20
    # Warm-up also compiles each bucket's forward pass with logits at every token, which steps serving
    # prompt_logprobs run; otherwise the first such step compiles it (twice the forward compilations).
    warmup_prompt_logprobs: bool = False
    # Overlapped steps: the next step is scheduled and launched before the host reads the current one's
    # tokens, which stay on the device meanwhile, so the device never waits for the host's bookkeeping.
    # Steps with beam searches, penalties or prompt logprobs, which need the host's tokens, run synchronously.
    overlap_steps: bool = True
    # Multi-step decode: a step whose rows all decode, with nothing queued, runs up to this many forward
    # passes and samples in one device call (each row as many as its length limits allow), so the host
    # schedules and packs once for that many tokens (min_tokens bans are counted per call on the device).
    # A step with a row that needs the host between tokens (stop strings, logprobs, prompt logprobs,
    # penalties, beams) stays a step of one.
    # It pays where the host's work is a large share of a step: small models, CPUs (benchmarks/README.md).
    # 1: off.
    decode_steps: int = 1
    # A step that needs a forward or sampling program warm-up did not build: "warn" (compile it, with a
    # warning) or "error" (raise RuntimeError rather than stall serving on a compile; for benchmarks and
    # deployments that must never compile mid-run).
    compile_after_warmup: str = "warn"
    # Devices one engine splits the model over (tensor parallelism; models.sharding), and engines that
    # `LLM` and scripts/generate.py run side by side on disjoint device groups, each on its share of the
    # prompts (data parallelism). Together they use tensor_parallel_size * data_parallel_size devices.
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1

    def __post_init__(self):
        if self.model is not None and not (isinstance(self.model, str) and self.model):
            raise ValueError(
                f"engine config field model must be a non-empty path or None, got {self.model!r}"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"engine config field dtype must be one of {_DTYPES}, got {self.dtype!r}")
        positive = ("page_size", "max_num_seqs", "max_num_batched_tokens")
        for name in positive + ("tensor_parallel_size", "data_parallel_size"):
            _check_positive_int(name, getattr(self, name))
        if self.num_pages is not None and not (_is_int(self.num_pages) and self.num_pages >= 2):
            # Page 0 is the null page, so a pool needs at least one more to hold anything.
            raise ValueError(
                f"engine config field num_pages must be an int >= 2 or None, got {self.num_pages!r}"
            )
        fraction = self.kv_cache_memory_fraction
        if not (isinstance(fraction, int | float) and math.isfinite(fraction) and 0 < fraction <= 1):
            raise ValueError(
                f"engine config field kv_cache_memory_fraction must be in (0, 1], got {fraction!r}"
            )
        gib = self.kv_cache_gib
        if gib is not None and not (
            isinstance(gib, int | float) and not isinstance(gib, bool) and math.isfinite(gib) and gib > 0
        ):
            raise ValueError(
                f"engine config field kv_cache_gib must be a positive number or None, got {gib!r}"
            )
        if self.max_model_len is not None and not (_is_int(self.max_model_len) and self.max_model_len >= 2):
            raise ValueError(
                f"engine config field max_model_len must be an int >= 2 or None, got {self.max_model_len!r}"
            )
        for name in ("token_buckets", "seq_buckets", "page_buckets"):
            _check_buckets(name, getattr(self, name))
        ratio = self.max_bucket_tokens_per_row
        if ratio is not None and not (_is_int(ratio) and ratio >= 1):
            raise ValueError(
                f"engine config field max_bucket_tokens_per_row must be an int >= 1 or None, got {ratio!r}"
            )
        if self.token_buckets[-1] < self.max_num_batched_tokens:
            raise ValueError(
                f"engine config: the largest token bucket ({self.token_buckets[-1]}) must be >= "
                f"max_num_batched_tokens ({self.max_num_batched_tokens})"
            )
        if self.seq_buckets[-1] < self.max_num_seqs:
            raise ValueError(
                f"engine config: the largest seq bucket ({self.seq_buckets[-1]}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        if self.max_model_len is not None:
            self.check_page_buckets(self.max_model_len)
        if self.attention_backend not in _ATTENTION_BACKENDS:
            raise ValueError(
                f"engine config field attention_backend must be one of {_ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )
        for name in ("compilation_cache_dir", "checkpoint_cache_dir"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(
                    f"engine config field {name} must be a non-empty path or None, got {value!r}"
                )
        if not isinstance(self.enable_prefix_caching, bool):
            value = self.enable_prefix_caching
            raise ValueError(f"engine config field enable_prefix_caching must be a bool, got {value!r}")
        if self.preemption_mode not in _PREEMPTION_MODES:
            raise ValueError(
                f"engine config field preemption_mode must be one of {_PREEMPTION_MODES}, "
                f"got {self.preemption_mode!r}"
            )
        if self.kv_allocation not in _KV_ALLOCATIONS:
            raise ValueError(
                f"engine config field kv_allocation must be one of {_KV_ALLOCATIONS}, "
                f"got {self.kv_allocation!r}"
            )
        swap = self.swap_space_gib
        if not (
            isinstance(swap, int | float) and not isinstance(swap, bool) and math.isfinite(swap) and swap >= 0
        ):
            raise ValueError(f"engine config field swap_space_gib must be a number >= 0, got {swap!r}")
        for name in ("kv_host_cache_gib", "kv_disk_cache_gib"):
            value = getattr(self, name)
            if name == "kv_host_cache_gib" and value is None:
                continue
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"engine config field {name} must be a positive number, got {value!r}")
        if self.kv_disk_cache_dir is not None:
            if not (isinstance(self.kv_disk_cache_dir, str) and self.kv_disk_cache_dir):
                value = self.kv_disk_cache_dir
                raise ValueError(
                    f"engine config field kv_disk_cache_dir must be a non-empty path, got {value!r}"
                )
            if self.kv_host_cache_gib is None:
                raise ValueError(
                    "engine config field kv_disk_cache_dir needs kv_host_cache_gib: the disk tier holds what "
                    "the host tier evicts"
                )
        if self.kv_host_cache_gib is not None and not self.enable_prefix_caching:
            raise ValueError(
                "engine config field kv_host_cache_gib needs enable_prefix_caching: the tiers are keyed by "
                "the prefix cache's page names"
            )
        if not (_is_int(self.max_logprobs) and self.max_logprobs >= 0):
            raise ValueError(
                f"engine config field max_logprobs must be an int >= 0, got {self.max_logprobs!r}"
            )
        if self.compile_after_warmup not in ("warn", "error"):
            raise ValueError(
                "engine config field compile_after_warmup must be 'warn' or 'error', got "
                f"{self.compile_after_warmup!r}"
            )
        for name in ("kv_tier_lookahead", "kv_tier_write_through", "kv_tier_sync_transfers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"engine config field {name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.overlap_steps, bool):
            raise ValueError(f"engine config field overlap_steps must be a bool, got {self.overlap_steps!r}")
        if not (_is_int(self.decode_steps) and 1 <= self.decode_steps <= 64):
            raise ValueError(
                f"engine config field decode_steps must be an int in [1, 64], got {self.decode_steps!r}"
            )
        if not isinstance(self.warmup_prompt_logprobs, bool):
            value = self.warmup_prompt_logprobs
            raise ValueError(f"engine config field warmup_prompt_logprobs must be a bool, got {value!r}")
        if not (_is_int(self.seed) and 0 <= self.seed < 2**32):
            raise ValueError(f"engine config field seed must be an int in [0, 2**32), got {self.seed!r}")

    def pages_per_seq(self, max_model_len: int) -> int:
        """Pages one request can hold at most: one for every token but the last, whose K/V is never needed."""
        return -(-(max_model_len - 1) // self.page_size)

    def check_page_buckets(self, max_model_len: int) -> None:
        """Raises unless the largest page bucket can hold a request of max_model_len tokens."""
        needed = self.pages_per_seq(max_model_len)
        if self.page_buckets[-1] < needed:
            raise ValueError(
                f"engine config: the largest page bucket ({self.page_buckets[-1]}) must be >= {needed}, the "
                f"pages of a {max_model_len}-token request at page_size {self.page_size}; raise page_buckets "
                "or lower max_model_len"
            )
