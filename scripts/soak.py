"""Soak: thousands of random requests through one engine, with aborts from another thread, then a check that
nothing leaked and nothing was lost.

Each run drives the tiny random model (configs/tiny_test.gin) with a padded vocabulary (the model has more
ids than its tokenizer) and a small pool, so preemption happens all the time: once with recompute and once
with swap preemption. Requests mix text and token prompts of random lengths, shared prefixes, every sampling
parameter, n/best_of, beam search, logprobs, stop strings, and some bad requests that must be refused alone.
A second thread aborts random requests (whole, or one sample) while the main thread steps.

At the end of each run it checks: no page held and the pool's invariants intact, no request left in the
engine, every accepted request got exactly one final output with a reason ("abort" exactly for the aborts
that took effect), and the resident memory stayed flat after warm-up (the curve is printed).

  python scripts/soak.py --num_requests 10000 --output_dir out/soak
"""

import dataclasses
import json
import random
import resource
import sys
import threading
import time
from pathlib import Path

import jax
from absl import app, flags

from jaxpage import LLM, SamplingParams

REPO = Path(__file__).resolve().parent.parent
# More model rows than tokenizer ids, and a pool that preempts: 40 pages of 8 tokens for up to 8 rows.
BINDINGS = (
    "ModelConfig.vocab_size = 50000",
    "EngineConfig.num_pages = 40",
    "EngineConfig.swap_space_gib = 0.001",
    "EngineConfig.warmup_prompt_logprobs = True",
)
PREFIXES = ["You are a helpful assistant. Answer briefly. " * 2, "Translate the following text: ", ""]
FINISH_REASONS = {"stop", "length", "abort", "error"}


@dataclasses.dataclass
class SoakReport:
    preemption_mode: str
    num_requests: int = 0  # accepted by add_request
    num_refused: int = 0  # refused with a ValueError, as intended
    num_aborted: int = 0  # aborts that took effect (whole requests), reported
    num_silenced: int = 0  # aborts that took effect with report=False (the caller is gone)
    num_sample_aborts: int = 0  # aborts of one sample of an n > 1 request
    num_outputs: int = 0
    num_steps: int = 0
    num_preemptions: int = 0
    num_swap_outs: int = 0
    # Programs XLA built (compiled or loaded from the persistent cache) after warm-up: page copies of a new
    # size, sampler variants warm-up skipped. Each one adds native memory that RSS shows.
    num_compiled_after_warmup: int = 0
    finish_reasons: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    rss_mib: list = dataclasses.field(default_factory=list)  # (requests finished, max RSS MiB) samples
    problems: list = dataclasses.field(default_factory=list)  # every broken invariant, empty when all held

    @property
    def rss_growth_after_warmup_mib(self) -> float:
        # The first quarter is warm-up: compilation caches, the first batches' buffers.
        after = [rss for _, rss in self.rss_mib[len(self.rss_mib) // 4 :]]
        return max(after) - min(after) if after else 0.0


def _random_params(rng: random.Random) -> SamplingParams:
    kind = rng.random()
    max_tokens = rng.randint(1, 24)
    if kind < 0.08:
        width = rng.randint(2, 3)
        return SamplingParams(
            max_tokens=max_tokens, temperature=0, use_beam_search=True, n=rng.randint(1, width), best_of=width
        )
    fields = dict(
        max_tokens=max_tokens,
        temperature=rng.choice([0, 0, 0.5, 1.0, 1.5]),
        top_p=rng.choice([1.0, 0.9, 0.5]),
        top_k=rng.choice([0, 0, 5, 50]),
        min_p=rng.choice([0.0, 0.0, 0.1]),
        seed=rng.choice([None, rng.randrange(2**32)]),
        logprobs=rng.choice([None, None, 0, 3]),
        prompt_logprobs=rng.choice([None] * 8 + [2]),
        min_tokens=rng.choice([0, 0, min(3, max_tokens)]),
        stop=rng.choice([(), (), ("e",), ("the", "and")]),
        ignore_eos=rng.random() < 0.2,
    )
    if rng.random() < 0.15:
        fields.update(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3)
    if rng.random() < 0.15:
        n = rng.randint(2, 3)
        fields.update(n=n, best_of=rng.choice([None, n + 1]))
    return SamplingParams(**fields)


def _random_prompt(rng: random.Random):
    if rng.random() < 0.4:
        return [rng.randrange(49152) for _ in range(rng.randint(1, 120))]
    words = " ".join(rng.choice(["paging", "cache", "token", "the", "and", "é", "数据"]) for _ in range(40))
    return rng.choice(PREFIXES) + words[: rng.randint(1, 200)]


def _bad_request(rng: random.Random) -> dict:
    return rng.choice(
        [
            {"prompt": "bad \ud800"},
            {"prompt": [1, 49999]},  # a padding id of the model, not a token
            {"prompt": [True, 2]},
            {"prompt": "x " * 400},  # longer than max_model_len
            {"prompt": "ok", "sampling_params": SamplingParams(logprobs=25)},  # above max_logprobs
            {"messages": [{"role": "nobody", "content": "hi"}]},
        ]
    )


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_soak(
    preemption_mode: str,
    num_requests: int,
    seed: int = 0,
    max_in_flight: int = 24,
    abort_every_s: float = 0.1,
    gin_files: tuple[str, ...] = (str(REPO / "configs" / "tiny_test.gin"),),
) -> SoakReport:
    """One soak run; the report's `problems` lists every invariant that broke (empty: all held)."""
    rng = random.Random(seed)
    bindings = [*BINDINGS, f"EngineConfig.preemption_mode = {preemption_mode!r}"]
    llm = LLM.from_gin(list(gin_files), bindings)
    engine = llm.engine
    engine.warmup()
    report = SoakReport(preemption_mode)

    def count_compiles(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            report.num_compiled_after_warmup += 1

    jax.monitoring.register_event_duration_secs_listener(count_compiles)
    lock = threading.Lock()
    in_flight: dict[str, SamplingParams] = {}
    aborted: set[str] = set()
    silenced: set[str] = set()  # aborted with report=False
    best_of_above_n: set[str] = set()
    finals: dict[str, list] = {}
    done = threading.Event()

    def abort_randomly():
        abort_rng = random.Random(seed + 1)
        while not done.wait(abort_every_s):
            with lock:
                candidates = list(in_flight.items())
            if not candidates:
                continue
            request_id, params = abort_rng.choice(candidates)
            if params.num_samples > 1 and not params.use_beam_search and abort_rng.random() < 0.5:
                if engine.abort(request_id, index=abort_rng.randrange(params.num_samples)):
                    with lock:
                        report.num_sample_aborts += 1
            elif abort_rng.random() < 0.1:  # a caller that is gone: no final output may follow
                with lock:
                    if engine.abort(request_id, report=False):
                        silenced.add(request_id)
                        in_flight.pop(request_id, None)
            elif engine.abort(request_id):
                with lock:
                    aborted.add(request_id)

    aborter = threading.Thread(target=abort_randomly, daemon=True)
    aborter.start()
    start = time.perf_counter()
    submitted = 0
    try:
        while submitted < num_requests or engine.has_unfinished_requests() or in_flight:
            while submitted < num_requests and len(in_flight) < max_in_flight:
                submitted += 1
                if rng.random() < 0.03:
                    try:
                        engine.add_request(**_bad_request(rng))
                        report.problems.append("a bad request was accepted")
                    except ValueError:
                        report.num_refused += 1
                    continue
                prompt, params = _random_prompt(rng), _random_params(rng)
                try:
                    request_id = engine.add_request(prompt, params)
                except ValueError as error:
                    report.problems.append(f"a good request was refused: {error}")
                    continue
                with lock:
                    in_flight[request_id] = params
                if params.num_samples > params.n:
                    best_of_above_n.add(request_id)
                report.num_requests += 1
            outputs = engine.step()
            for output in outputs:
                report.num_outputs += 1
                if output.finished:
                    _record(finals, output)
                    with lock:
                        in_flight.pop(output.request_id, None)
                    if len(finals) % max(1, num_requests // 40) == 0:
                        report.rss_mib.append((len(finals), round(_rss_mib(), 1)))
            if not (outputs or engine.has_unfinished_requests() or submitted < num_requests):
                break  # nothing runs and nothing came: whatever is still in flight was lost (checked below)
    finally:
        done.set()
        aborter.join()
        jax.monitoring.unregister_event_duration_listener(count_compiles)
    for output in engine.stream():  # outputs of aborts that came after the last step
        _record(finals, output)
        in_flight.pop(output.request_id, None)
    report.seconds = time.perf_counter() - start
    _check(engine, report, in_flight, aborted, finals, best_of_above_n, silenced)
    metrics = engine.metrics()
    report.num_steps, report.num_preemptions = metrics.num_steps, metrics.num_preemptions
    report.num_swap_outs = metrics.num_swap_outs
    report.num_aborted, report.num_silenced = len(aborted), len(silenced)
    return report


def _record(finals: dict, output) -> None:
    # Only what the checks need, so that the soak's own bookkeeping does not grow the memory it watches.
    reasons = tuple(completion.finish_reason for completion in output.outputs)
    count = finals[output.request_id][0] + 1 if output.request_id in finals else 1
    finals[output.request_id] = (count, reasons, output.error)


def _check(
    engine,
    report: SoakReport,
    in_flight: dict,
    aborted: set,
    finals: dict,
    best_of_above_n: set,
    silenced: set,
) -> None:
    problems = report.problems
    pool = engine.pool
    if pool.num_free_pages != pool.num_usable_pages:
        problems.append(f"{pool.num_usable_pages - pool.num_free_pages} pages leaked")
    try:
        pool.check_invariants([])
    except AssertionError as error:
        problems.append(f"pool invariants: {error}")
    if engine.scheduler.requests or engine.scheduler.waiting or engine.scheduler.running:
        problems.append(f"requests stuck in the scheduler: {list(engine.scheduler.requests)[:5]}")
    if engine.scheduler.kv_cache.num_used_swap_pages:
        problems.append(f"{engine.scheduler.kv_cache.num_used_swap_pages} swap pages leaked")
    for name in ("_groups", "_group_of", "_beams", "_beam_of", "_text", "_swapped"):
        if getattr(engine, name):
            problems.append(f"engine.{name} still holds {len(getattr(engine, name))} entries")
    if in_flight:
        problems.append(f"{len(in_flight)} requests never got a final output: {list(in_flight)[:5]}")
    reasons: dict[str, int] = {}
    for request_id, (count, completion_reasons, error) in finals.items():
        if count != 1:
            problems.append(f"{request_id} got {count} final outputs")
        for reason in completion_reasons:
            reasons[reason] = reasons.get(reason, 0) + 1
            if reason not in FINISH_REASONS:
                problems.append(f"{request_id} finished without a reason: {reason!r}")
        # A sample that finished before the abort keeps its reason; with best_of > n an aborted sample may
        # not be among the n best reported.
        if request_id in aborted and "abort" not in completion_reasons and request_id not in best_of_above_n:
            problems.append(f"{request_id} was aborted but finished with {completion_reasons}")
        if error is not None:
            problems.append(f"{request_id} failed: {error}")
    if silenced & set(finals):
        problems.append(f"silently aborted requests reported: {sorted(silenced & set(finals))[:5]}")
    if len(finals) + len(silenced) != report.num_requests:
        problems.append(
            f"{report.num_requests} requests accepted, {len(finals)} final outputs, {len(silenced)} silenced"
        )
    report.finish_reasons = dict(sorted(reasons.items()))


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_integer("num_requests", 10000, "Requests per preemption mode.")
    flags.DEFINE_integer("seed", 0, "Seed of the random workload.")
    flags.DEFINE_list("modes", ["recompute", "swap"], "Preemption modes to run, one run each.")
    flags.DEFINE_string("output_dir", None, "Folder for the JSON report (none: print only).")


def main(argv):
    del argv
    reports = []
    for mode in FLAGS.modes:
        report = run_soak(mode, FLAGS.num_requests, FLAGS.seed)
        reports.append(report)
        curve = " ".join(f"{n}:{rss:.0f}" for n, rss in report.rss_mib)
        print(f"[{mode}] RSS MiB by requests finished: {curve}", file=sys.stderr)
    columns = [
        "mode", "requests", "refused", "aborted", "silent aborts", "sample aborts", "steps", "preemptions",
        "swap outs", "finish reasons", "s", "RSS growth after warm-up MiB", "programs built after warm-up",
        "problems",
    ]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in reports:
        cells = [
            r.preemption_mode, r.num_requests, r.num_refused, r.num_aborted, r.num_silenced,
            r.num_sample_aborts, r.num_steps, r.num_preemptions, r.num_swap_outs, r.finish_reasons,
            f"{r.seconds:.0f}", f"{r.rss_growth_after_warmup_mib:.1f}", r.num_compiled_after_warmup,
            len(r.problems),
        ]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")
    for r in reports:
        for problem in r.problems[:20]:
            print(f"[{r.preemption_mode}] problem: {problem}")
    if FLAGS.output_dir:
        folder = Path(FLAGS.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"soak_{time.strftime('%Y%m%d-%H%M%S')}.json"
        rows = [dataclasses.asdict(r) | {"rss_growth_after_warmup_mib": r.rss_growth_after_warmup_mib}
                for r in reports]  # fmt: skip
        path.write_text(
            json.dumps({"num_requests": FLAGS.num_requests, "seed": FLAGS.seed, "runs": rows}, indent=1)
        )
        print(f"wrote {path}", file=sys.stderr)
    if any(r.problems for r in reports):
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
