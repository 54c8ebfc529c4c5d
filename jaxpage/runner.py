"""Runs scheduled steps on the device: owns the parameters, the KV pool and one compiled program per bucket.

Each bucket (T tokens, B rows, P pages per row) gets an ahead-of-time compiled forward pass with the KV pool
donated, so XLA writes the new K/V into the pool's own buffers instead of copying the pool every step.
Sampling is a second, small program per row bucket, in two variants (all rows greedy: argmax only; any row
sampling), so the forward pass is compiled once per bucket rather than once per variant. Calling a compiled
executable never recompiles: a shape outside the compiled buckets is compiled on the spot with a warning.
"""

import concurrent.futures
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpage.batch import Bucket, BucketGrid, StepInputs, padding_inputs
from jaxpage.compilation_cache import enable_compilation_cache
from jaxpage.config import EngineConfig
from jaxpage.sampling import SampledTokens, greedy_sample, sample
from models import llama
from models.attention import AttentionMetadata
from models.config import ModelConfig

logger = logging.getLogger(__name__)

# The StepInputs arrays the forward pass reads; the rest parameterise sampling.
FORWARD_FIELDS = (
    "token_ids",
    "positions",
    "slot_mapping",
    "cu_q_lens",
    "kv_lens",
    "page_table",
    "logits_indices",
)


def resolve_attention_backend(name: str) -> str:
    """The backend "auto" stands for: the Pallas kernels on GPU, the pure-jnp reference elsewhere."""
    if name == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    return name


def kv_bytes_per_page(cfg: ModelConfig, page_size: int) -> int:
    """Bytes one page takes across all layers, K and V."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def _free_device_bytes(device: jax.Device) -> int:
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    # The CPU client reports no memory statistics; its memory is the host's.
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ValueError("cannot tell the free device memory here; set the engine config field num_pages")


def kv_pool_pages(cfg: ModelConfig, engine_config: EngineConfig, max_model_len: int) -> int:
    """Pages of the KV pool, page 0 included: `num_pages` when set, else the configured fraction of the free
    device memory, never more than `max_num_seqs` full-length requests can use."""
    if engine_config.num_pages is not None:
        return engine_config.num_pages
    most_useful = engine_config.max_num_seqs * engine_config.pages_per_seq(max_model_len) + 1
    budget = engine_config.kv_cache_memory_fraction * _free_device_bytes(jax.devices()[0])
    num_pages = min(int(budget // kv_bytes_per_page(cfg, engine_config.page_size)), most_useful)
    if num_pages < 2:
        raise ValueError(
            f"kv_cache_memory_fraction {engine_config.kv_cache_memory_fraction} leaves room for {num_pages} "
            "KV pages; at least 2 are needed (set num_pages or raise the fraction)"
        )
    return num_pages


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _forward_arrays(inputs: StepInputs) -> dict[str, np.ndarray]:
    return {name: getattr(inputs, name) for name in FORWARD_FIELDS}


def _sampling_arrays(inputs: StepInputs) -> tuple[np.ndarray, ...]:
    # The order of `sampling.sample`'s per-row parameters.
    return inputs.temperature, inputs.top_k, inputs.top_p, inputs.seeds, inputs.sample_positions


class Runner:
    """The device half of the engine. `step` is called from one thread only (the pool is donated)."""

    def __init__(self, model_config: ModelConfig, params: dict, engine_config: EngineConfig):
        if engine_config.compilation_cache_dir is not None:
            enable_compilation_cache(engine_config.compilation_cache_dir)
        self.model_config = model_config
        self.engine_config = engine_config
        self.page_size = engine_config.page_size
        self.attention_backend = resolve_attention_backend(engine_config.attention_backend)
        max_model_len = engine_config.max_model_len or model_config.max_position_embeddings
        self.grid = BucketGrid(
            engine_config.token_buckets, engine_config.seq_buckets, engine_config.page_buckets
        )
        self.params = jax.device_put(params)
        self.num_pages = kv_pool_pages(model_config, engine_config, max_model_len)
        self.kv_pool = llama.init_kv_pool(model_config, self.num_pages, self.page_size)
        self._base_key = jax.random.key(engine_config.seed)
        self._forward_jit = jax.jit(self._forward, donate_argnums=1)
        self._sample_jit = jax.jit(sample)
        self._greedy_jit = jax.jit(greedy_sample)
        self._forward_programs: dict[Bucket, jax.stages.Compiled] = {}
        self._sample_programs: dict[tuple[int, bool], jax.stages.Compiled] = {}

    @property
    def buckets(self) -> list[Bucket]:
        return self.grid.buckets

    def bucket_for(self, num_tokens: int, num_rows: int, max_pages: int) -> Bucket:
        return self.grid.select(num_tokens, num_rows, max_pages)

    # ---- compilation ---------------------------------------------------------------------------------------

    def _forward(self, params, kv_pool, step: dict):  # step: the FORWARD_FIELDS arrays of StepInputs
        metadata = AttentionMetadata(
            step["slot_mapping"], step["cu_q_lens"], step["kv_lens"], step["page_table"]
        )
        return llama.forward(
            params, self.model_config, step["token_ids"], step["positions"], kv_pool, metadata,
            step["logits_indices"], attention=self.attention_backend,
        )  # fmt: skip

    def _compile_forward(self, bucket: Bucket) -> jax.stages.Compiled:
        step = _abstract(_forward_arrays(padding_inputs(bucket)))
        return self._forward_jit.lower(_abstract(self.params), _abstract(self.kv_pool), step).compile()

    def _compile_sampler(self, num_rows: int, greedy: bool) -> jax.stages.Compiled:
        logits = jax.ShapeDtypeStruct((num_rows, self.model_config.vocab_size), jnp.float32)
        if greedy:
            return self._greedy_jit.lower(logits).compile()
        rows = _abstract(_sampling_arrays(padding_inputs(Bucket(num_rows, num_rows, 1))))
        return self._sample_jit.lower(logits, *rows, self._base_key).compile()

    def _forward_program(self, bucket: Bucket) -> jax.stages.Compiled:
        program = self._forward_programs.get(bucket)
        if program is None:
            logger.warning("compiling bucket %s outside warm-up", bucket)
            program = self._forward_programs[bucket] = self._compile_forward(bucket)
        return program

    def _sample_program(self, num_rows: int, greedy: bool) -> jax.stages.Compiled:
        program = self._sample_programs.get((num_rows, greedy))
        if program is None:
            program = self._sample_programs[(num_rows, greedy)] = self._compile_sampler(num_rows, greedy)
        return program

    def warmup(
        self, buckets: list[Bucket] | None = None, num_threads: int | None = None
    ) -> dict[Bucket, float]:
        """Compiles the forward pass of every bucket (default: all of the grid) and both samplers of every row
        count, several at once in threads (XLA compiles outside the GIL).

        Returns:
          Wall seconds each bucket's forward pass took to compile (or to load from the persistent cache).
        """
        buckets = [
            b for b in (self.buckets if buckets is None else buckets) if b not in self._forward_programs
        ]
        sampler_keys = {(b.num_rows, greedy) for b in buckets for greedy in (True, False)}
        sampler_keys -= set(self._sample_programs)
        seconds: dict[Bucket, float] = {}

        def timed_forward(bucket):
            start = time.perf_counter()
            program = self._compile_forward(bucket)
            seconds[bucket] = time.perf_counter() - start
            return bucket, program

        workers = num_threads or min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            samplers = {key: pool.submit(self._compile_sampler, *key) for key in sampler_keys}
            for bucket, program in pool.map(timed_forward, buckets):
                self._forward_programs[bucket] = program
            for key, future in samplers.items():
                self._sample_programs[key] = future.result()
        return seconds

    # ---- one step ------------------------------------------------------------------------------------------

    def step(self, inputs: StepInputs) -> SampledTokens:
        """Runs the forward pass of the step's bucket, updating the KV pool in place, and samples every row.

        Returns:
          numpy `token_ids` i32[B] and `logprobs` f32[B] for all rows of the bucket (padded rows included).
        """
        bucket = inputs.bucket
        assert bucket.pages_per_row in self.grid.page_buckets, bucket
        forward = self._forward_program(bucket)
        logits, self.kv_pool = forward(self.params, self.kv_pool, jax.device_put(_forward_arrays(inputs)))
        greedy = inputs.all_greedy
        sampler = self._sample_program(bucket.num_rows, greedy)
        if greedy:
            out = sampler(logits)
        else:
            out = sampler(logits, *jax.device_put(_sampling_arrays(inputs)), self._base_key)
        token_ids, logprobs = jax.device_get((out.token_ids, out.logprobs))
        return SampledTokens(np.asarray(token_ids), np.asarray(logprobs))
