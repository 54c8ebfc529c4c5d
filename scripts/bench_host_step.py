"""The host's share of a step: the engine's whole loop with a device that answers instantly.

With overlapped steps the host's work per step (schedule, pack, dispatch, read, stop checks, detokenize) is
the floor of a step's wall time whenever it exceeds the device's, as it does for an 8B model at 256 rows
(the device's forward takes ~8 ms on an H100/H200). This runs `LLMEngine.step` on the CPU for N requests of
fixed prompt and output lengths with the runner's `launch`/`fetch` replaced by ones that return tokens without
computing anything, and prints the mean host milliseconds of a decode step at full batch; with --profile, the
functions that take the time.

  python scripts/bench_host_step.py --num_requests 256 --prompt_len 512 --output_len 256
"""

import cProfile
import pstats
import time

import numpy as np
from absl import app, flags

from jaxpage import SamplingParams
from jaxpage.config import EngineConfig
from jaxpage.engine import LLMEngine
from jaxpage.runner import LaunchedStep, StepOutput
from jaxpage.sampling import SampledTokens
from models.config import ModelConfig

flags.DEFINE_integer("num_requests", 256, "Requests, all admitted at once (rows of the decode steps).")
flags.DEFINE_integer("prompt_len", 512, "Prompt tokens of each request.")
flags.DEFINE_integer("output_len", 256, "Output tokens of each request (EOS held back).")
flags.DEFINE_bool("overlap_steps", True, "EngineConfig.overlap_steps.")
flags.DEFINE_integer("decode_steps", 1, "EngineConfig.decode_steps (multi-step decode).")
flags.DEFINE_enum(
    "output_kind", "final_only", ["cumulative", "delta", "final_only"], "SamplingParams.output_kind."
)
flags.DEFINE_string("model", None, "The tokenizer's source (EngineConfig.model); default the embedded one.")
flags.DEFINE_integer("profile", 0, "Print this many of the costliest functions of the decode steps.")
FLAGS = flags.FLAGS


class InstantDevice:
    """Stands in for the runner's device half: each row samples a fixed function of its step and row."""

    def __init__(self, runner, vocab_size: int):
        self.vocab_size = vocab_size
        self.num_top = runner.num_top_logprobs
        self.count = 0

    def programs(self, inputs):
        return None, None  # nothing is compiled: launch runs no program

    def launch(self, inputs, programs=None) -> LaunchedStep:
        self.count += 1
        # A multi-step decode call samples [decode_steps, rows].
        shape = (
            (inputs.decode_steps, len(inputs.kv_lens)) if inputs.decode_steps > 1 else (len(inputs.kv_lens),)
        )
        # Ids in 1000..vocab: ordinary text tokens, away from SmolLM2's special ids.
        counter = np.arange(np.prod(shape)).reshape(shape) * 7919 + self.count * 104729
        token_ids = (1000 + counter % (self.vocab_size - 1000)).astype(np.int32)
        sampled = SampledTokens(
            token_ids,
            np.full(shape, -1.0, np.float32),
            np.repeat(token_ids[..., None], self.num_top, axis=-1),
            np.full((*shape, self.num_top), -1.0, np.float32),
        )
        return LaunchedStep(sampled, None)

    def fetch(self, launched: LaunchedStep) -> StepOutput:
        return StepOutput(launched.sampled, None)


def main(argv):
    del argv
    n, prompt_len, output_len = FLAGS.num_requests, FLAGS.prompt_len, FLAGS.output_len
    max_model_len = 1 << (prompt_len + output_len - 1).bit_length()
    page_size = 16
    config = EngineConfig(
        model=FLAGS.model,
        dtype="float32",
        page_size=page_size,
        num_pages=n * max_model_len // page_size + 1,
        max_num_seqs=n,
        max_num_batched_tokens=2048,
        max_model_len=max_model_len,
        token_buckets=tuple(sorted({n, 2048})),
        seq_buckets=(n,),
        page_buckets=(max_model_len // page_size,),
        attention_backend="reference",
        overlap_steps=FLAGS.overlap_steps,
        decode_steps=FLAGS.decode_steps,
    )
    # A tiny model: only its shapes reach the host loop, and the device half is replaced below.
    model = ModelConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=1, num_q_heads=4,
        num_kv_heads=2, head_dim=16, max_position_embeddings=max_model_len, tie_word_embeddings=True,
    )  # fmt: skip
    engine = LLMEngine(config, random_model=model)
    device = InstantDevice(engine.runner, engine.tokenizer.vocab_size)
    engine.runner.programs, engine.runner.launch, engine.runner.fetch = (
        device.programs,
        device.launch,
        device.fetch,
    )

    rng = np.random.default_rng(0)
    params = SamplingParams(
        max_tokens=output_len, min_tokens=output_len, temperature=0.0, output_kind=FLAGS.output_kind
    )
    for _ in range(n):
        engine.add_request(rng.integers(1000, 40000, prompt_len).tolist(), params)

    durations = []  # (seconds, decode rows) of each step
    profiler = cProfile.Profile()
    while engine.has_unfinished_requests():
        full_decode = len(engine.scheduler.running) == n and not engine.scheduler.waiting
        if full_decode and FLAGS.profile:
            profiler.enable()
        start = time.perf_counter()
        engine.step()
        durations.append((time.perf_counter() - start, full_decode))
        profiler.disable()
    decode = [s for s, full in durations if full]
    total = sum(s for s, _ in durations)
    print(f"{len(durations)} steps in {total:.2f} s; {len(decode)} decode steps at {n} rows")
    print(f"host ms per decode step at {n} rows: mean {1e3 * np.mean(decode):.2f}, ", end="")
    print(f"p50 {1e3 * np.median(decode):.2f}, p90 {1e3 * np.percentile(decode, 90):.2f}")
    if FLAGS.profile:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(FLAGS.profile)


if __name__ == "__main__":
    app.run(main)
