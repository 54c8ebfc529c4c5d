"""Checks on a GPU that overlapped steps change no output: the same requests, with `overlap_steps` on and off,
give the same tokens. The model has Llama-3-8B's layer shapes in float32 (two layers, random weights), so the
Pallas kernels run and near-ties of bfloat16 cannot hide a real difference; the requests mix greedy and seeded
sampling, lengths that end mid-page and stop tokens. Prints the counts; exits 1 on any difference.

  python scripts/check_overlap_gpu.py [attention_backend]   # default "auto": the Pallas kernels
"""

import sys

import jax
import numpy as np

from jaxpage import LLM, SamplingParams

BINDINGS = [
    "ModelConfig.num_layers = 2",
    'EngineConfig.dtype = "float32"',
    "EngineConfig.num_pages = 4096",
    "EngineConfig.max_num_seqs = 32",
    "EngineConfig.seq_buckets = (32,)",
    # One step shape: a row's numbers then do not depend on which rows share its step (with several buckets,
    # the overlap's one-step-later admissions change step shapes, hence matmul algorithms, hence last bits).
    "EngineConfig.token_buckets = (1024,)",
    "EngineConfig.max_num_batched_tokens = 1024",
]


def requests(num: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40000, int(rng.integers(5, 600))).tolist() for _ in range(num)]
    lengths = rng.integers(1, 80, num).tolist()
    params = [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2)
        if i % 3
        else SamplingParams(max_tokens=n, temperature=0.9, top_p=0.95, seed=i, logprobs=2)
        for i, n in enumerate(lengths)
    ]
    params[5] = SamplingParams(max_tokens=60, temperature=0.0, stop_token_ids=[prompts[5][-1]])
    return prompts, params


def main():
    backend = sys.argv[1] if len(sys.argv) > 1 else "auto"
    prompts, params = requests(96)
    outputs = {}
    for overlap in (True, False):
        llm = LLM.from_gin(
            ["configs/llama3_8b.gin"],
            [
                *BINDINGS,
                f"EngineConfig.overlap_steps = {overlap}",
                f'EngineConfig.attention_backend = "{backend}"',
            ],
        )
        outputs[overlap] = [o.outputs[0] for o in llm.generate(prompts, params)]
        llm.engine.close()
    differ = []
    for i, (on, off) in enumerate(zip(outputs[True], outputs[False], strict=True)):
        if on.token_ids != off.token_ids:
            at = next(
                (p for p, (a, b) in enumerate(zip(on.token_ids, off.token_ids, strict=False)) if a != b), None
            )
            top = sorted(off.logprobs[at].values(), reverse=True) if at is not None else []
            gap = top[0] - top[1] if len(top) > 1 else float("nan")
            kind = "greedy" if params[i].temperature == 0 else "sampled"
            differ.append(f"request {i} ({kind}) from token {at}, top-2 logprob gap there {gap:.2e}")
    tokens = sum(len(o.token_ids) for o in outputs[True])
    device = jax.devices()[0].device_kind
    print(f"{device}, JAX {jax.__version__}, attention {backend}: {len(prompts)} requests, {tokens} tokens")
    print(f"outputs that differ with the overlap on and off: {len(differ)}")
    print("\n".join(differ))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
