import contextlib
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dense_reference import assert_top_logprobs, dense_log_softmax, dense_logits
from jax.experimental.compilation_cache import compilation_cache

from jaxpage.batch import Bucket, build_step_inputs, padding_inputs, step_size
from jaxpage.config import EngineConfig
from jaxpage.engine import record_prompt_logprobs
from jaxpage.page_pool import PagePool
from jaxpage.request import Request, RequestStatus
from jaxpage.runner import (
    Runner,
    _forward_arrays,
    _penalties,
    _sampling_rows,
    kv_bytes_per_page,
    kv_pool_pages,
)
from jaxpage.sampling_params import SamplingParams
from jaxpage.scheduler import Scheduler
from models.config import ModelConfig
from models.llama import init_params

TINY = ModelConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_q_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
CONFIG = EngineConfig(
    page_size=4,
    num_pages=37,  # an odd size, so the pool's buffers are easy to tell apart in the HLO
    max_num_seqs=4,
    max_num_batched_tokens=16,
    max_model_len=64,
    token_buckets=(8, 16),
    seq_buckets=(4,),
    page_buckets=(4, 16),
    attention_backend="auto",
    compilation_cache_dir=None,
    max_logprobs=3,
    warmup_prompt_logprobs=True,
)


@pytest.fixture(scope="module")
def runner():
    # At init's std of 0.02 a tiny model barely looks at its context; larger weights make every token depend
    # on the whole prefix, so a paging or batching mistake changes the output.
    params = jax.tree.map(lambda x: x * 10, init_params(TINY, jax.random.key(0)))
    runner = Runner(TINY, params, CONFIG)
    runner.warmup()
    return runner


def _serve(
    runner, prompts, params, *, num_pages=None, budget=16, abort_after=None, keep_requests=False, eos=()
):
    """Serves the prompts through a fresh scheduler on the runner; returns {id: output tokens} (or the
    requests). `eos`: the EOS token ids of every request."""
    pool = PagePool(num_pages or runner.num_pages)
    scheduler = Scheduler(
        pool,
        page_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=budget,
        max_model_len=TINY.max_position_embeddings,
    )
    requests = [
        Request(str(i), p, sp, frozenset(eos)) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
    ]
    pending = list(requests)
    steps = 0
    while pending or scheduler.has_unfinished_requests:
        if pending:  # one arrival per step, so prefill and decode rows mix
            scheduler.add_request(pending.pop(0))
        output = scheduler.schedule()
        bucket = runner.bucket_for(*step_size(output))
        inputs = build_step_inputs(output, bucket, runner.page_size)
        result = runner.step(inputs)
        if result.prompt_logprobs is not None:
            record_prompt_logprobs(output, inputs.cu_q_lens, result)
        scheduler.advance(output)
        scheduler.update_from_output(output, result.sampled)
        steps += 1
        if steps == abort_after:
            scheduler.finish_request(requests[0].request_id, RequestStatus.FINISHED_ABORTED)
        pool.check_invariants([r.page_ids for r in scheduler.running])
    assert pool.num_free_pages == pool.num_usable_pages, "pages leaked"
    if keep_requests:
        return requests
    return {r.request_id: r.output_token_ids for r in requests}


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, TINY.vocab_size, size=rng.integers(1, 30)).tolist() for _ in range(n)]


def _params(n):
    """Greedy, sampled, and (every third) penalised or min_p and min_tokens rows, so every sampler variant
    runs."""
    penalties = dict(repetition_penalty=1.4, presence_penalty=0.6, frequency_penalty=0.3)
    params = []
    for i in range(n):
        if i % 2 == 0:
            extra = penalties if i % 3 == 0 else {}
            params.append(SamplingParams(max_tokens=12, temperature=0.0, **extra))
        else:
            extra = penalties if i % 3 == 0 else dict(min_p=0.05, min_tokens=4, stop_token_ids=[5, 6])
            params.append(
                SamplingParams(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=i, **extra)
            )
    return params


def test_batching_chunking_and_preemption_change_no_tokens(runner):
    prompts, params = _prompts(8), _params(8)
    alone = {}
    for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
        alone[str(i)] = _serve(runner, [prompt], [sp])["0"]
    batched = _serve(runner, prompts, params)
    # A small budget chunks every long prompt; a small pool makes requests wait for pages and preempts.
    squeezed = _serve(runner, prompts, params, num_pages=14, budget=8)
    assert batched == alone
    assert squeezed == alone
    assert len({tuple(tokens) for tokens in alone.values()}) == len(alone)


def test_decode_steps_take_the_decode_kernel_and_change_no_tokens():
    # The Pallas kernels in their interpreter (they need head_dim >= 16): prefill steps go through the ragged
    # kernel, steps of one token per row through the decode kernel; both must give the blocked path's tokens.
    cfg = dataclasses.replace(TINY, head_dim=16)
    weights = jax.tree.map(lambda x: x * 10, init_params(cfg, jax.random.key(0)))
    config = dataclasses.replace(
        CONFIG, attention_backend="pallas_interpret", warmup_prompt_logprobs=False, page_buckets=(16,)
    )
    pallas = Runner(cfg, weights, config)
    blocked = Runner(cfg, weights, dataclasses.replace(config, attention_backend="blocked"))
    pallas.warmup()
    compiled = set(pallas._forward_programs)
    assert {key for key in pallas._forward_programs if key[1] == "decode"} == {
        (b, "decode") for b in pallas.grid.decode_buckets
    }
    kinds = []
    pick = pallas._forward_program
    pallas._forward_program = lambda bucket, kind: kinds.append(kind) or pick(bucket, kind)

    prompts = _prompts(3, seed=11)
    params = [SamplingParams(max_tokens=6, temperature=0.0)] * 3
    assert _serve(pallas, prompts, params) == _serve(blocked, prompts, params)
    assert kinds.count("decode") >= 5 and "rows" in kinds, kinds
    assert set(pallas._forward_programs) == compiled, "a step needed a program warm-up did not compile"


def test_greedy_decode_equals_prefill_from_scratch(runner):
    # Decoding reads K/V written by earlier steps; a fresh prefill of the whole text computes it all at once.
    prompt = _prompts(1, seed=3)[0]
    decoded = _serve(runner, [prompt], [SamplingParams(max_tokens=8, temperature=0.0)])["0"]
    text = list(prompt)
    for _ in range(8):
        text += _serve(runner, [text], [SamplingParams(max_tokens=1, temperature=0.0)])["0"]
    assert text[len(prompt) :] == decoded


def _dense_greedy(runner, prompt, max_tokens, min_tokens, banned, stops):
    """Greedy tokens from dense passes: `banned` ids are masked while fewer than min_tokens are out; a token
    in `stops` ends the output after that."""
    out = []
    while len(out) < max_tokens:
        logits = dense_logits(TINY, runner.params, prompt + out)[-1].copy()
        if len(out) < min_tokens:
            logits[list(banned)] = -np.inf
        out.append(int(np.argmax(logits)))
        if len(out) >= min_tokens and out[-1] in stops:
            break
    return out


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_bans_eos_and_stop_token_ids_until_reached(runner, ignore_eos):
    # The first two tokens of the free greedy output become the EOS and a stop token id: min_tokens must
    # steer around both, also under ignore_eos (vLLM's rule), which only keeps EOS from stopping the output.
    prompt = _prompts(1, seed=9)[0]
    free = _serve(runner, [prompt], [SamplingParams(max_tokens=8, temperature=0.0)])["0"]
    eos, stop = free[0], free[1]
    assert eos != stop
    params = SamplingParams(
        max_tokens=10, min_tokens=6, temperature=0.0, stop_token_ids=[stop], ignore_eos=ignore_eos
    )
    got = _serve(runner, [prompt], [params], eos=[eos])["0"]
    stops = {stop} if ignore_eos else {eos, stop}
    assert got == _dense_greedy(runner, prompt, 10, 6, {eos, stop}, stops)
    assert not {eos, stop} & set(got[:6])


def test_prompt_logprobs_of_a_chunked_preempted_prompt_equal_a_dense_pass(runner):
    # The newest request is preempted first: a 40-token prompt arriving last is chunked (budget 8), preempted
    # and recomputed, taking its own cached pages back, and its logprobs must still come out whole.
    prompts = _prompts(3, seed=5) + [np.random.default_rng(6).integers(1, TINY.vocab_size, size=40).tolist()]
    params = _params(3) + [SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=3)]
    request = _serve(runner, prompts, params, num_pages=14, budget=8, keep_requests=True)[-1]
    assert request.num_preemptions > 0, "make the pool smaller"
    dense = dense_log_softmax(TINY, runner.params, prompts[-1])
    assert len(request.prompt_logprobs) == len(prompts[-1]) and request.prompt_logprobs[0] is None
    for position in range(1, len(prompts[-1])):
        got = request.prompt_logprobs[position]
        # 1e-3: the runner's CPU attention ("blocked") sums in another order than the dense pass, and the
        # tiny model's x10 weights amplify that to ~7e-4; a misplaced position would be off by ~1.
        assert_top_logprobs(got, prompts[-1][position], dense[position - 1], k=3, tol=1e-3)


class _CompilationCounter:
    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.events = []

    def __call__(self, event, duration, **kwargs):
        if event in self.EVENTS:
            self.events.append(event)


@contextlib.contextmanager
def _count_compilations():
    counter = _CompilationCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)


def test_mixed_workload_compiles_nothing_after_warmup(runner):
    warmed = set(runner._forward_programs)
    every_bucket = {(b, k) for b in runner.buckets for k in ("rows", "all_logits")}
    assert every_bucket <= warmed
    # A decode kernel (here the CPU kernel's portable loops: the tiny model's heads) adds decode programs.
    extra = warmed - every_bucket
    assert bool(extra) == runner.uses_decode_kernel
    assert all(b in runner.grid.decode_buckets and k in ("decode", "all_logits") for b, k in extra)
    prompts, params = _prompts(10, seed=1), _params(10)
    params[1] = dataclasses.replace(params[1], logprobs=3, prompt_logprobs=2)
    params[4] = dataclasses.replace(params[4], prompt_logprobs=0)
    with _count_compilations() as counter:
        _serve(runner, prompts, params, num_pages=20, budget=16, abort_after=3)
        _serve(runner, prompts[:2], [SamplingParams(max_tokens=3, temperature=0.0)] * 2)
    assert counter.events == []
    # The counter does see a compilation when one happens.
    with _count_compilations() as counter:
        jax.jit(lambda x: x * 3)(np.arange(5)).block_until_ready()
    assert counter.events


def test_warmup_threads_compile_in_the_callers_matmul_precision():
    # JAX's precision context is thread-local; warm-up compiles in threads and must carry it over.
    local = Runner(TINY, init_params(TINY, jax.random.key(1)), CONFIG)
    with jax.default_matmul_precision("highest"):
        local.warmup(local.buckets[:1])
    hlo = local._forward_programs[(local.buckets[0], "rows")].as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert dots and all("operand_precision={highest,highest}" in line for line in dots), dots[:2]


def test_kv_pool_is_donated_and_updated_in_place(runner):
    pointers = [a.unsafe_buffer_pointer() for layer in runner.kv_pool for a in layer]
    _serve(runner, _prompts(2, seed=2), [SamplingParams(max_tokens=2, temperature=0.0)] * 2)
    assert [a.unsafe_buffer_pointer() for layer in runner.kv_pool for a in layer] == pointers

    hlo = runner._forward_programs[(runner.buckets[-1], "rows")].as_text()
    header = next(line for line in hlo.splitlines() if "input_output_alias" in line)
    assert header.count("-alias)") == 2 * TINY.num_layers
    page_shape = f"f32[{TINY.num_kv_heads},{CONFIG.num_pages},{CONFIG.page_size},{TINY.head_dim}]"
    copies = [line for line in hlo.splitlines() if " copy(" in line and page_shape in line]
    assert copies == [], "the step copies a KV-sized buffer"


def test_persistent_compilation_cache_stores_the_step_programs(tmp_path):
    previous = jax.config.jax_compilation_cache_dir
    try:
        config = dataclasses.replace(CONFIG, compilation_cache_dir=str(tmp_path / "jax"))
        local = Runner(TINY, init_params(TINY, jax.random.key(1)), config)
        local.warmup(local.buckets[:1])
        assert any((tmp_path / "jax").glob("*-cache"))
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        compilation_cache.reset_cache()


def test_kv_pool_size_from_memory_fraction_is_capped_by_what_requests_can_use():
    config = dataclasses.replace(CONFIG, num_pages=None, kv_cache_memory_fraction=0.5)
    # 4 rows x 16 pages for a 64-token request, plus the null page; the host has far more memory than that.
    assert kv_pool_pages(TINY, config, max_model_len=64) == 4 * 16 + 1
    assert kv_pool_pages(TINY, CONFIG, max_model_len=64) == CONFIG.num_pages
    huge = dataclasses.replace(TINY, num_layers=10**6, num_kv_heads=64, num_q_heads=64, head_dim=1024)
    assert kv_bytes_per_page(huge, 4) > 2**40
    with pytest.raises(ValueError, match="kv_cache_memory_fraction"):
        kv_pool_pages(huge, dataclasses.replace(config, kv_cache_memory_fraction=1e-6), max_model_len=64)


def test_gpu_step_programs_hold_no_loop_or_branch():
    """Every program of a step, lowered for an H100 with the Pallas kernels, is straight-line, but for the
    loop of multi-step decode, whose trip count is static: XLA:GPU decides each iteration of any other while
    loop (and a conditional's branch) on the host, which would stall a launched step on a device-to-host
    copy. (The kernels' own loops live inside their Triton custom calls.)"""
    model = dataclasses.replace(TINY, head_dim=16, dtype="bfloat16")  # the kernels need head_dim >= 16
    local = Runner(
        model, init_params(model, jax.random.key(0)), dataclasses.replace(CONFIG, attention_backend="pallas")
    )
    bucket = local.buckets[-1]
    inputs = padding_inputs(bucket, prompt_logprobs=True)
    decode = Bucket(bucket.num_rows, bucket.num_rows, bucket.pages_per_row)

    # Shapes without the CPU mesh's shardings: the programs are lowered for a GPU.
    def _abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

    forward = [_abstract(local.params), _abstract(local.kv_pool), _abstract(_forward_arrays(inputs))]
    forward.append(_abstract(local._last_tokens))
    logits = jax.ShapeDtypeStruct((bucket.num_rows, model.vocab_size), jnp.float32)
    rows = padding_inputs(Bucket(bucket.num_rows, bucket.num_rows, 1), history_width=16)
    programs = {
        "rows": lambda: local._forward_jits["rows"].trace(*forward),
        "decode": lambda: local._forward_jits["decode"].trace(*forward),
        "all_logits": lambda: local._forward_jits["all_logits"].trace(
            *forward, _abstract(inputs.prompt_logprob_targets)
        ),
        # Multi-step decode: one loop, over the calls, whose trip count is static (XLA:GPU runs it with no
        # host round trip; checked on an H200, benchmarks/README.md).
        "decode_steps": lambda: local._decode_steps_jit.trace(
            *map(_abstract, local._decode_steps_args(padding_inputs(decode), "sampled")), num_calls=4
        ),
        "greedy": lambda: local._greedy_jit.trace(
            logits, _abstract(rows.banned_token_ids), num_top_logprobs=3
        ),
        "sampled": lambda: local._sample_jit.trace(
            logits,
            _abstract(_sampling_rows(rows)),
            _abstract(local._base_key),
            3,
            _abstract(_penalties(rows)),
        ),
    }
    for name, trace in programs.items():
        device = jax.sharding.AbstractDevice(
            device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
        )
        axis = (jax.sharding.AxisType.Explicit,)
        with jax.sharding.use_abstract_mesh(
            jax.sharding.AbstractMesh((1,), ("x",), axis, abstract_device=device)
        ):
            text = trace().lower(lowering_platforms=("cuda",)).as_text()
        assert name in ("greedy", "sampled") or "__gpu$xla.gpu.triton" in text, name
        loops = re.findall(r"stablehlo\.(while|case|if)\b", text)
        assert loops == (["while"] if name == "decode_steps" else []), name
