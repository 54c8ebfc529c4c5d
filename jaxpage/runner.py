"""Runs scheduled steps on the device: owns the parameters, the KV pool and one compiled program per bucket.

Each bucket (T tokens, B rows, P pages per row) gets an ahead-of-time compiled forward pass with the KV pool
donated, so XLA writes the new K/V into the pool's own buffers instead of copying the pool every step. Two
more forward kinds exist: one computes the logits at all T tokens and the prompt logprobs from them; it runs
only in steps where some request asks for prompt logprobs, and warm-up compiles it only when
`EngineConfig.warmup_prompt_logprobs` is set (otherwise its first use compiles it, with a warning). The other,
with the Pallas backends only, runs steps of one token per row through the decode kernel; warm-up compiles it
for the buckets such steps select.
With `EngineConfig.decode_steps` > 1, steps whose rows all decode may instead run one multi-step program
(`_decode_steps`: several forward passes and samples in a loop). Sampling is a separate, small program per
row bucket, in three variants (all rows greedy: argmax only; any
row sampling; any sampled row with penalties, per history width P * page_size), so the forward pass is
compiled once per bucket rather than once per variant. Calling a compiled executable never recompiles: a
shape outside the compiled buckets is compiled on the spot with a warning.
"""

import concurrent.futures
import functools
import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpage.batch import NO_TOKEN, Bucket, BucketGrid, StepInputs, padding_inputs
from jaxpage.compilation_cache import enable_compilation_cache
from jaxpage.config import EngineConfig, user_cache_dir
from jaxpage.executable_store import ExecutableStore, environment
from jaxpage.kv_memory import allocate_kv_pool, free_device_bytes, pool_pages
from jaxpage.sampling import (
    Penalties,
    PromptLogprobs,
    SampledTokens,
    SamplingRows,
    greedy_sample,
    prompt_logprobs,
    sample,
)
from models import llama, sharding
from models.attention import AttentionMetadata
from models.config import ModelConfig
from pallas_kernels import cpu_attention

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
    "source_rows",
)


def resolve_attention_backend(name: str, dtype: str = "float32") -> str:
    """The backend "auto" stands for: the Pallas kernels on GPU; on CPU the C++ kernel for a float32 pool
    where it builds (pallas_kernels.cpu_attention), else the blocked pure-jnp attention."""
    platform = jax.default_backend()
    if name == "auto" and platform == "gpu":
        return "pallas"
    if name == "cpu_kernel" and (platform != "cpu" or dtype != "float32"):
        raise ValueError(
            f"engine config field attention_backend 'cpu_kernel' runs float32 on the CPU, got dtype "
            f"{dtype!r} on {platform!r}"
        )
    wants_kernel = name == "cpu_kernel" or (name == "auto" and platform == "cpu" and dtype == "float32")
    if wants_kernel and cpu_attention.load(user_cache_dir() / "kernels"):
        return "cpu_kernel"
    if name == "cpu_kernel":
        raise ValueError(
            "engine config field attention_backend 'cpu_kernel' could not be built (a C++ compiler, $CXX, is "
            "needed; the log says why); 'blocked' needs none"
        )
    return "blocked" if name == "auto" else name


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, tensor_parallel_size: int = 1) -> int:
    """Bytes one page takes across all layers, K and V, on each device of a tensor-parallel mesh of that
    size (the whole page at 1)."""
    heads = sharding.kv_heads_per_device(cfg, tensor_parallel_size)
    return 2 * cfg.num_layers * heads * page_size * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def kv_pool_pages(cfg: ModelConfig, engine_config: EngineConfig, max_model_len: int, mesh=None) -> int:
    """Pages of the KV pool on the mesh's devices (None: the default device), page 0 included (see
    `kv_memory.pool_pages`): what the device with the least free memory holds."""
    devices = [jax.devices()[0]] if mesh is None else list(mesh.devices.flat)
    bytes_per_page = kv_bytes_per_page(cfg, engine_config.page_size, len(devices))
    free = [free_device_bytes(device) for device in devices]
    free_bytes = None if None in free else min(free)
    return pool_pages(engine_config, max_model_len, bytes_per_page, free_bytes, devices[0].platform == "cpu")


def _abstract(tree):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


def _forward_arrays(inputs: StepInputs) -> dict[str, np.ndarray]:
    return {name: getattr(inputs, name) for name in FORWARD_FIELDS}


def _sampling_rows(inputs: StepInputs) -> SamplingRows:
    return SamplingRows(
        inputs.temperature,
        inputs.top_k,
        inputs.top_p,
        inputs.min_p,
        inputs.seeds,
        inputs.sample_positions,
        inputs.banned_token_ids,
    )


def _penalties(inputs: StepInputs) -> Penalties:
    return Penalties(
        inputs.history,
        inputs.history_prompt_lens,
        inputs.history_lens,
        inputs.repetition_penalty,
        inputs.presence_penalty,
        inputs.frequency_penalty,
    )


# Forward kinds: logits at the sampled rows; at every token (prompt logprobs); at the rows of a step of one
# token per row, through the decode kernel.
_ROWS, _ALL_LOGITS, _DECODE = "rows", "all_logits", "decode"


class StepOutput(NamedTuple):
    sampled: SampledTokens  # numpy, every row of the bucket (padded rows included)
    prompt_logprobs: PromptLogprobs | None  # numpy, every token of the bucket; None unless the step asked


class LaunchedStep(NamedTuple):
    """A step dispatched to the device whose results are on their way to the host (`Runner.fetch`)."""

    sampled: SampledTokens  # device arrays
    prompt_logprobs: PromptLogprobs | None


# Sampler variants: all rows greedy, some sampled, some with penalties (the last also per history width);
# each with or without the top `max_logprobs` tokens of every row.
_GREEDY, _SAMPLED, _PENALISED = "greedy", "sampled", "penalised"


class Runner:
    """The device half of the engine. `step` is called from one thread only (the pool is donated)."""

    def __init__(
        self,
        model_config: ModelConfig,
        params: dict,
        engine_config: EngineConfig,
        num_token_ids: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        """num_token_ids: ids at and above it (rows that pad the embedding table past the tokenizer's
        vocabulary) get logit -inf in every forward kind, so they are never sampled, reported as an
        alternative, or counted in a logprob's normaliser. None: every id of the model is a token.

        mesh: the devices the model is split over (tensor parallelism, models.sharding); None: the first
        `tensor_parallel_size` devices. `params` may be numpy (each device then receives only its shards)."""
        if engine_config.compilation_cache_dir is not None:
            enable_compilation_cache(engine_config.compilation_cache_dir)
        self.model_config = model_config
        self.engine_config = engine_config
        self.page_size = engine_config.page_size
        self.num_top_logprobs = engine_config.max_logprobs
        backend = engine_config.attention_backend
        self.attention_backend = resolve_attention_backend(backend, model_config.dtype)
        max_model_len = engine_config.max_model_len or model_config.max_position_embeddings
        # Decode-only steps take the decode kernel (and the CPU kernel's portable loops, which serve decode
        # only); the jnp backends, and the CPU kernel's AVX-512 path, treat every step alike.
        self.uses_decode_kernel = self.attention_backend in ("pallas", "pallas_interpret") or (
            self.attention_backend == "cpu_kernel"
            and not cpu_attention.fast_for_prefill(engine_config.page_size, model_config.head_dim)
        )
        self.grid = BucketGrid(
            engine_config.token_buckets,
            engine_config.seq_buckets,
            engine_config.page_buckets,
            row_sized_decode=self.uses_decode_kernel,
            max_tokens_per_row=engine_config.max_bucket_tokens_per_row,
        )
        if mesh is None:
            mesh = sharding.tensor_parallel_mesh(engine_config.tensor_parallel_size)
        self.mesh = mesh
        # Step inputs, sampling state and the sampled tokens are the same on every device.
        self._replicated = sharding.replicated(mesh)
        # Logits stay split over the vocabulary: the greedy sampler reduces each device's share.
        self._logits_sharding = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, sharding.AXIS if mesh.size > 1 else None)
        )
        self.params = jax.device_put(params, sharding.param_shardings(model_config, mesh, params))
        self.num_pages = kv_pool_pages(model_config, engine_config, max_model_len, mesh)
        bytes_per_page = kv_bytes_per_page(model_config, self.page_size, mesh.size)
        self.kv_pool = allocate_kv_pool(model_config, self.num_pages, self.page_size, bytes_per_page, mesh)
        self._base_key = jax.device_put(jax.random.key(engine_config.seed), self._replicated)
        # The last step's sampled token of each row, kept on the device: a step launched before the host has
        # read them takes its pending tokens from here (`StepInputs.source_rows`).
        self.max_rows = self.grid.seq_buckets[-1]
        self._last_tokens = jax.device_put(np.zeros(self.max_rows, np.int32), self._replicated)
        vocab_size = model_config.vocab_size
        self.num_token_ids = vocab_size if num_token_ids is None else num_token_ids
        assert 0 < self.num_token_ids <= vocab_size, (self.num_token_ids, vocab_size)
        self._warmed_up = False  # before warm-up, compiling a bucket on first use is expected
        self._forward_jits = {
            _ROWS: jax.jit(self._forward, donate_argnums=1),
            _ALL_LOGITS: jax.jit(self._forward_all_logits, donate_argnums=1),
            _DECODE: jax.jit(functools.partial(self._forward, decode_only=True), donate_argnums=1),
        }
        self._decode_steps_jit = jax.jit(self._decode_steps, donate_argnums=1, static_argnames="num_calls")
        self._sample_jit = jax.jit(self._sample, static_argnames="num_top_logprobs")
        self._greedy_jit = jax.jit(self._greedy_sample, static_argnames="num_top_logprobs")
        # Keyed by (bucket, forward kind) and by (rows, variant, history width, top logprobs).
        self._forward_programs: dict[tuple[Bucket, str], jax.stages.Compiled] = {}
        self._sample_programs: dict[tuple[int, str, int, int], jax.stages.Compiled] = {}
        # Multi-step decode (EngineConfig.decode_steps > 1), keyed by (rows, pages per row, sampler variant).
        self._decode_steps_programs: dict[tuple[int, int, str], jax.stages.Compiled] = {}
        # Whole compiled programs beside JAX's cache: a warm start loads them without tracing them.
        self.executable_store = None
        if engine_config.compilation_cache_dir is not None:
            devices = list(mesh.devices.flat)
            directory = Path(engine_config.compilation_cache_dir) / "jaxpage-executables"
            try:
                self.executable_store = ExecutableStore(directory, environment(devices), devices)
            except OSError as error:  # a read-only cache: every start traces its programs, as without one
                logger.warning("no executable store in %s: %s", directory, error)
        # Besides the arguments' shapes, what the traced functions read from this runner.
        self._program_context = (
            model_config,
            engine_config,
            self.attention_backend,
            self.num_token_ids,
            self.max_rows,
        )

    @property
    def warmed_up(self) -> bool:
        return self._warmed_up

    @property
    def buckets(self) -> list[Bucket]:
        return self.grid.buckets

    def bucket_for(self, num_tokens: int, num_rows: int, max_pages: int) -> Bucket:
        return self.grid.select(num_tokens, num_rows, max_pages)

    # ---- compilation ---------------------------------------------------------------------------------------

    def _forward(self, params, kv_pool, step: dict, last_tokens, logits_indices=None, decode_only=False):
        metadata = AttentionMetadata(
            step["slot_mapping"], step["cu_q_lens"], step["kv_lens"], step["page_table"]
        )
        if logits_indices is None:
            logits_indices = step["logits_indices"]
        source = step["source_rows"]
        token_ids = jnp.where(source >= 0, last_tokens[jnp.maximum(source, 0)], step["token_ids"])
        logits, kv_pool = llama.forward(
            params, self.model_config, token_ids, step["positions"], kv_pool, metadata,
            logits_indices, attention=self.attention_backend, decode_only=decode_only, mesh=self.mesh,
        )  # fmt: skip
        if self.num_token_ids < logits.shape[-1]:
            is_token = jnp.arange(logits.shape[-1]) < self.num_token_ids
            logits = jnp.where(is_token, logits, -jnp.inf)
        if self.mesh.size > 1:
            logits = jax.lax.with_sharding_constraint(logits, self._logits_sharding)
        return logits, kv_pool

    def _forward_all_logits(self, params, kv_pool, step: dict, last_tokens, targets):  # targets: i32[T]
        """The forward pass with logits at every token: the prompt logprobs of the step's tokens, and the
        rows' logits for sampling."""
        num_tokens = step["token_ids"].shape[0]
        all_tokens = jnp.arange(num_tokens, dtype=jnp.int32)
        logits, kv_pool = self._forward(params, kv_pool, step, last_tokens, all_tokens)
        prompt = prompt_logprobs(logits, targets, self.num_top_logprobs)
        return (logits[step["logits_indices"]], prompt), kv_pool

    def _decode_steps(self, params, kv_pool, rows: dict, last_tokens, sampling, base_key, num_calls: int):
        """`num_calls` decode steps of the same rows in one program (multi-step decode): each forward
        pass takes the tokens the one before sampled, and row b takes part in the first
        `rows["num_steps"][b]` of them; later ones (and padded rows, 0) write their K/V into the null page
        and their samples are dropped. A row's key folds in each token's position, so its tokens are those
        of single steps. `sampling` is the banned ids (all rows greedy) or the `SamplingRows`; the loop's
        trip count is static, so XLA:GPU runs it without asking the host.

        Returns:
          ((SampledTokens of [num_calls, rows], the last sampled tokens), the KV pool).
        """
        page_table = rows["page_table"]
        num_rows, pages_per_row = page_table.shape
        row_ids = jnp.arange(num_rows, dtype=jnp.int32)
        source = rows["source_rows"]
        tokens = jnp.where(source >= 0, last_tokens[jnp.maximum(source, 0)], rows["token_ids"])
        banned_ids = sampling.banned_token_ids if isinstance(sampling, SamplingRows) else sampling

        def one_step(j, carry):
            tokens, kv_pool, token_ids, logprobs = carry
            active = j < rows["num_steps"]
            positions = rows["positions"] + j
            index = jnp.minimum(positions // self.page_size, pages_per_row - 1)
            pages = jnp.take_along_axis(page_table, index[:, None], axis=1)[:, 0]
            step = {
                "token_ids": tokens,
                "positions": jnp.where(active, positions, 0),
                "slot_mapping": jnp.where(active, pages * self.page_size + positions % self.page_size, 0),
                "cu_q_lens": jnp.arange(num_rows + 1, dtype=jnp.int32),
                "kv_lens": jnp.where(active, positions + 1, 1),  # an inactive row reads one slot, never 0
                "page_table": page_table,
                "logits_indices": row_ids,
                "source_rows": jnp.full(num_rows, -1, jnp.int32),
            }
            logits, kv_pool = self._forward(
                params, kv_pool, step, last_tokens, decode_only=self.uses_decode_kernel
            )
            # min_tokens: a row's banned ids hold while it has fewer outputs than that.
            banned = jnp.where((j < rows["banned_steps"])[:, None], banned_ids, NO_TOKEN)
            if isinstance(sampling, SamplingRows):
                rows_j = sampling._replace(positions=positions + 1, banned_token_ids=banned)
                out = sample(logits, rows_j, base_key, 0)
            else:
                out = greedy_sample(logits, banned, 0)
            tokens = jnp.where(active, out.token_ids, tokens)  # a row's last token stays its last sample
            return tokens, kv_pool, token_ids.at[j].set(out.token_ids), logprobs.at[j].set(out.logprobs)

        init = (
            tokens,
            kv_pool,
            jnp.zeros((num_calls, num_rows), jnp.int32),
            jnp.zeros((num_calls, num_rows), jnp.float32),
        )
        tokens, kv_pool, token_ids, logprobs = jax.lax.fori_loop(0, num_calls, one_step, init)
        no_top = jnp.zeros((num_calls, num_rows, 0))
        out = SampledTokens(token_ids, logprobs, no_top.astype(jnp.int32), no_top)
        return (out, self._as_last_tokens(tokens)), kv_pool

    def _decode_steps_args(self, inputs: StepInputs, variant: str) -> list:
        """The multi-step program's arguments: the rows' first token and position (a decode step's token b is
        row b's), their pages and step counts, and the sampling state."""
        num_rows = inputs.bucket.num_rows
        rows = {
            "token_ids": inputs.token_ids[:num_rows],
            "positions": inputs.positions[:num_rows],
            "source_rows": inputs.source_rows[:num_rows],
            "page_table": inputs.page_table,
            "num_steps": inputs.num_steps,
            "banned_steps": inputs.banned_steps,
        }
        sampling = inputs.banned_token_ids if variant == _GREEDY else _sampling_rows(inputs)
        on_devices = self._on_devices
        return [
            self.params,
            self.kv_pool,
            on_devices(rows),
            self._last_tokens,
            on_devices(sampling),
            self._base_key,
        ]

    def _compile_decode_steps(self, num_rows: int, pages_per_row: int, variant: str) -> jax.stages.Compiled:
        inputs = padding_inputs(Bucket(num_rows, num_rows, pages_per_row))
        abstract = list(map(_abstract, self._decode_steps_args(inputs, variant)))
        calls = self.engine_config.decode_steps
        return self._compile(
            ("decode_steps", calls, variant, abstract),
            lambda: self._decode_steps_jit.lower(*abstract, num_calls=calls),
        )

    def _compile_forward(self, bucket: Bucket, kind: str) -> jax.stages.Compiled:
        inputs = padding_inputs(bucket, prompt_logprobs=kind == _ALL_LOGITS)
        args = [self.params, self.kv_pool, self._on_devices(_forward_arrays(inputs)), self._last_tokens]
        if kind == _ALL_LOGITS:
            args.append(self._on_devices(inputs.prompt_logprob_targets))
        abstract = list(map(_abstract, args))
        return self._compile(("forward", kind, abstract), lambda: self._forward_jits[kind].lower(*abstract))

    def _compile_sampler(
        self, num_rows: int, variant: str, history_width: int, k: int
    ) -> jax.stages.Compiled:
        logits = jax.ShapeDtypeStruct(
            (num_rows, self.model_config.vocab_size), jnp.float32, sharding=self._logits_sharding
        )
        inputs = padding_inputs(Bucket(num_rows, num_rows, 1), history_width)
        if variant == _GREEDY:
            banned = _abstract(self._on_devices(inputs.banned_token_ids))
            return self._compile(
                ("greedy", logits, banned, k),
                lambda: self._greedy_jit.lower(logits, banned, num_top_logprobs=k),
            )
        rows = _abstract(self._on_devices(_sampling_rows(inputs)))
        penalties = _abstract(self._on_devices(_penalties(inputs))) if variant == _PENALISED else None
        key = _abstract(self._base_key)
        return self._compile(
            ("sample", logits, rows, key, k, penalties),
            lambda: self._sample_jit.lower(logits, rows, key, k, penalties),
        )

    def _compile(self, description: tuple, lower) -> jax.stages.Compiled:
        if self.executable_store is None:
            return lower().compile()
        return self.executable_store.compiled((self._program_context, description), lower)

    def _on_devices(self, tree):
        """Host arrays of a step, put on every device of the mesh."""
        return jax.device_put(tree, self._replicated)

    def _sample(self, logits, rows, base_key, num_top_logprobs, penalties=None):
        out = sample(logits, rows, base_key, num_top_logprobs, penalties)
        return out, self._as_last_tokens(out.token_ids)

    def _greedy_sample(self, logits, banned_token_ids, num_top_logprobs):
        out = greedy_sample(logits, banned_token_ids, num_top_logprobs)
        return out, self._as_last_tokens(out.token_ids)

    def _as_last_tokens(self, token_ids):  # i32[B] -> i32[max_rows], one shape for every forward program
        return jnp.pad(token_ids, (0, self.max_rows - token_ids.shape[0]))

    def _forward_program(self, bucket: Bucket, kind: str) -> jax.stages.Compiled:
        program = self._forward_programs.get((bucket, kind))
        if program is None:
            hint = " (prompt logprobs: set warmup_prompt_logprobs)" if kind == _ALL_LOGITS else ""
            self._before_compiling_outside_warmup(f"the forward pass of bucket {bucket} (kind {kind})", hint)
            program = self._forward_programs[(bucket, kind)] = self._compile_forward(bucket, kind)
        return program

    def _before_compiling_outside_warmup(self, what: str, hint: str = "") -> None:
        """Before warm-up, compiling on first use is expected; after it, warns or (`compile_after_warmup`
        "error") raises RuntimeError."""
        if not self._warmed_up:
            logger.debug("compiling %s before warm-up", what)
        elif self.engine_config.compile_after_warmup == "error":
            raise RuntimeError(f"a step needs {what}, which warm-up did not compile{hint}")
        else:
            logger.warning("compiling %s outside warm-up", what)

    def _decode_steps_program(self, bucket: Bucket, variant: str) -> jax.stages.Compiled:
        key = (bucket.num_rows, bucket.pages_per_row, variant)
        program = self._decode_steps_programs.get(key)
        if program is None:
            self._before_compiling_outside_warmup(f"the multi-step decode of {key}")
            program = self._decode_steps_programs[key] = self._compile_decode_steps(*key)
        return program

    def _sample_program(self, inputs: StepInputs, variant: str, history_width: int) -> jax.stages.Compiled:
        k = self.num_top_logprobs if inputs.wants_top_logprobs else 0
        key = (inputs.bucket.num_rows, variant, history_width, k)
        program = self._sample_programs.get(key)
        if program is None:
            self._before_compiling_outside_warmup(f"the {variant} sampler of {key[0]} rows")
            program = self._sample_programs[key] = self._compile_sampler(*key)
        return program

    def warmup(
        self, buckets: list[Bucket] | None = None, num_threads: int | None = None
    ) -> dict[Bucket, float]:
        """Compiles the forward pass of every bucket (default: all of the grid; with
        `warmup_prompt_logprobs` also its all-token-logits kind; with the decode kernel, the decode kind of
        the buckets decode steps select; with `decode_steps` > 1 their multi-step programs) and every sampler
        variant of every row count, several at once in threads (XLA compiles outside the GIL), and runs each
        program once.

        Returns:
          Wall seconds each bucket's forward programs (every kind compiled) took to compile or to load from
          the persistent cache.
        """
        whole_grid = buckets is None
        buckets = self.buckets if whole_grid else buckets
        kinds = (_ROWS, _ALL_LOGITS) if self.engine_config.warmup_prompt_logprobs else (_ROWS,)
        forwards = [(b, kind) for b in buckets for kind in kinds]
        # The buckets decode steps select: all of them with the whole grid (with `max_bucket_tokens_per_row`
        # a decode step's row count may have no prompt bucket), else those of the rows and pages asked for
        # (with `row_sized_decode` they may lie outside the token buckets).
        shapes = {(b.num_rows, b.pages_per_row) for b in buckets}
        selected = [
            d for d in self.grid.decode_buckets if whole_grid or (d.num_rows, d.pages_per_row) in shapes
        ]
        decode = []
        if self.uses_decode_kernel:
            # Their decode kind; a one-token prompt chunk with prompt logprobs takes them too.
            decode = selected
            forwards += [(d, _DECODE) for d in decode]
            if self.engine_config.warmup_prompt_logprobs:
                forwards += [(d, _ALL_LOGITS) for d in decode if d not in buckets]
        forwards = [key for key in forwards if key not in self._forward_programs]
        multi_step = []
        if self.engine_config.decode_steps > 1:  # the same buckets' multi-step programs, greedy or sampling
            multi_step = [
                (d.num_rows, d.pages_per_row, variant) for d in selected for variant in (_GREEDY, _SAMPLED)
            ]
            multi_step = [key for key in multi_step if key not in self._decode_steps_programs]
        sampler_keys = set()
        for b in [*buckets, *decode]:
            history_width = b.pages_per_row * self.page_size
            for k in {0, self.num_top_logprobs}:
                sampler_keys |= {(b.num_rows, _GREEDY, 0, k), (b.num_rows, _SAMPLED, 0, k)}
                sampler_keys.add((b.num_rows, _PENALISED, history_width, k))
        sampler_keys -= set(self._sample_programs)
        seconds: dict[Bucket, float] = {}
        # JAX's config contexts are thread-local: a caller's `jax.default_matmul_precision(...)` would not
        # reach the compile threads, whereas a program compiled on first use (this thread) would get it.
        precision = jax.config.jax_default_matmul_precision

        def in_callers_precision(compile_fn, *key):
            with jax.default_matmul_precision(precision):
                return compile_fn(*key)

        def timed_forward(key):
            start = time.perf_counter()
            program = in_callers_precision(self._compile_forward, *key)
            return key, program, time.perf_counter() - start

        workers = num_threads or min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            samplers = {
                key: pool.submit(in_callers_precision, self._compile_sampler, *key) for key in sampler_keys
            }
            multi = {
                key: pool.submit(in_callers_precision, self._compile_decode_steps, *key) for key in multi_step
            }
            for key, program, elapsed in pool.map(timed_forward, forwards):
                self._forward_programs[key] = program
                seconds[key[0]] = seconds.get(key[0], 0.0) + elapsed
            for key, future in multi.items():
                self._decode_steps_programs[key] = future.result()
            for key, future in samplers.items():
                self._sample_programs[key] = future.result()
        # Each program's first run costs more than later ones (on the CPU ~0.2 s more for a 128-token step
        # of SmolLM2): run every new program once on padding (a forward writes only the null page).
        for key in forwards:
            self._run_once(key, self._forward_programs, self._compile_forward, self._run_forward_on_padding)
        for key in sorted(sampler_keys):
            self._run_once(key, self._sample_programs, self._compile_sampler, self._run_sampler_on_padding)
        for key in multi_step:
            run = self._run_decode_steps_on_padding
            self._run_once(key, self._decode_steps_programs, self._compile_decode_steps, run)
        self._warmed_up = True
        return seconds

    def _run_once(self, key: tuple, programs: dict, compile_fn, run) -> None:
        """Runs `programs[key]` on padding; one the executable store loaded that fails to run is deleted
        there and compiled again, so that a bad entry costs one start its time, never the engine."""
        try:
            run(key, programs[key])
        except Exception:
            if self.executable_store is None or not self.executable_store.discard(programs[key]):
                raise
            # A forward that failed may have taken the pool (donated) with it; at warm-up it holds nothing.
            if any(page.is_deleted() for layer in self.kv_pool for page in layer):
                bytes_per_page = kv_bytes_per_page(self.model_config, self.page_size, self.mesh.size)
                self.kv_pool = allocate_kv_pool(
                    self.model_config, self.num_pages, self.page_size, bytes_per_page, self.mesh
                )
            programs[key] = compile_fn(*key)
            run(key, programs[key])

    def _run_forward_on_padding(self, key: tuple[Bucket, str], program: jax.stages.Compiled) -> None:
        bucket, kind = key
        inputs = padding_inputs(bucket, prompt_logprobs=kind == _ALL_LOGITS)
        args = [self.params, self.kv_pool, self._on_devices(_forward_arrays(inputs)), self._last_tokens]
        if kind == _ALL_LOGITS:
            args.append(self._on_devices(inputs.prompt_logprob_targets))
        logits, self.kv_pool = program(*args)
        jax.block_until_ready(logits)

    def _run_decode_steps_on_padding(self, key: tuple[int, int, str], program: jax.stages.Compiled) -> None:
        num_rows, pages_per_row, variant = key
        inputs = padding_inputs(Bucket(num_rows, num_rows, pages_per_row))  # no row takes part: null page
        (out, _), self.kv_pool = program(*self._decode_steps_args(inputs, variant))
        jax.block_until_ready(out)

    def _run_sampler_on_padding(self, key: tuple[int, str, int, int], program: jax.stages.Compiled) -> None:
        num_rows, variant, history_width, _ = key
        shape = (num_rows, self.model_config.vocab_size)
        logits = jnp.zeros(shape, jnp.float32, device=self._logits_sharding)  # made there, not sent
        inputs = padding_inputs(Bucket(num_rows, num_rows, 1), history_width)
        if variant == _GREEDY:
            out = program(logits, self._on_devices(inputs.banned_token_ids))
        else:
            penalties = self._on_devices(_penalties(inputs)) if variant == _PENALISED else None
            out = program(logits, self._on_devices(_sampling_rows(inputs)), self._base_key, penalties)
        jax.block_until_ready(out)

    # ---- one step ------------------------------------------------------------------------------------------

    def step(self, inputs: StepInputs) -> StepOutput:
        """Runs the step and waits for its results: `fetch(launch(inputs))`."""
        return self.fetch(self.launch(inputs))

    def programs(self, inputs: StepInputs) -> tuple[jax.stages.Compiled, jax.stages.Compiled | None]:
        """The forward and sampling programs of the step (a multi-step decode call: its one program, and
        None), compiled now if warm-up left them out (or, with `compile_after_warmup` "error", RuntimeError
        before anything ran)."""
        bucket = inputs.bucket
        assert bucket.pages_per_row in self.grid.page_buckets, bucket
        if inputs.decode_steps > 1:
            assert inputs.decode_steps == self.engine_config.decode_steps, inputs.decode_steps
            return self._decode_steps_program(bucket, _GREEDY if inputs.all_greedy else _SAMPLED), None
        if inputs.wants_prompt_logprobs:
            kind = _ALL_LOGITS
        elif self.uses_decode_kernel and inputs.decode_only:
            kind = _DECODE
        else:
            kind = _ROWS
        if inputs.has_penalties:
            sampler = self._sample_program(inputs, _PENALISED, inputs.history.shape[1])
        elif inputs.all_greedy:
            sampler = self._sample_program(inputs, _GREEDY, 0)
        else:
            sampler = self._sample_program(inputs, _SAMPLED, 0)
        return self._forward_program(bucket, kind), sampler

    def launch(
        self, inputs: StepInputs, programs: tuple[jax.stages.Compiled, jax.stages.Compiled] | None = None
    ) -> LaunchedStep:
        """Dispatches the forward pass of the step's bucket, updating the KV pool in place, and the sampling
        of every row, then starts copying the results to the host; returns without waiting for the device.

        Steps run on the device in launch order, so a step may be launched before the previous one's results
        are read: its pending tokens (`inputs.source_rows`) come from the previous step's samples on the
        device, and pages freed meanwhile are rewritten only by later steps.
        A multi-step decode call (`inputs.decode_steps` > 1) is one program; its samples are
        [decode_steps, rows].
        programs: what `programs(inputs)` returned, if the caller has it already.
        """
        forward, sampler = programs if programs is not None else self.programs(inputs)
        if inputs.decode_steps > 1:
            variant = _GREEDY if inputs.all_greedy else _SAMPLED
            (out, self._last_tokens), self.kv_pool = forward(*self._decode_steps_args(inputs, variant))
            for array in out:
                array.copy_to_host_async()
            return LaunchedStep(out, None)
        all_logits = inputs.wants_prompt_logprobs
        args = [self.params, self.kv_pool, self._on_devices(_forward_arrays(inputs)), self._last_tokens]
        if all_logits:
            args.append(self._on_devices(inputs.prompt_logprob_targets))
        logits, self.kv_pool = forward(*args)
        prompt = None
        if all_logits:
            logits, prompt = logits

        if inputs.has_penalties:
            rows, penalties = self._on_devices((_sampling_rows(inputs), _penalties(inputs)))
            out, self._last_tokens = sampler(logits, rows, self._base_key, penalties)
        elif inputs.all_greedy:
            out, self._last_tokens = sampler(logits, self._on_devices(inputs.banned_token_ids))
        else:
            out, self._last_tokens = sampler(
                logits, self._on_devices(_sampling_rows(inputs)), self._base_key, None
            )
        for array in jax.tree.leaves((out, prompt)):
            array.copy_to_host_async()
        return LaunchedStep(out, prompt)

    def fetch(self, launched: LaunchedStep) -> StepOutput:
        """Waits for a launched step's results.

        Returns:
          numpy samples of all rows of the bucket (padded rows included), and the prompt logprobs of all its
          tokens when the step asked for them.
        """
        out, prompt = jax.device_get((launched.sampled, launched.prompt_logprobs))
        return StepOutput(
            SampledTokens(*map(np.asarray, out)),
            None if prompt is None else PromptLogprobs(*map(np.asarray, prompt)),
        )
