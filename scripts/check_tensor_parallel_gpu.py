"""Checks on several GPUs that tensor parallelism changes no output: the same greedy requests at
tensor_parallel_size 1 and N. The model has Llama-3-8B's layer shapes in float32 (two layers, random weights),
so the Pallas kernels run per device on their heads and near-ties of bfloat16 cannot hide a real difference.
A split sums the row-parallel matmuls in another order, so a greedy choice between two tokens whose logits
differ in the last bits may flip; a real mistake changes requests where the choice was clear. Prints the
collectives of the split programs and the requests that differ, with the top-2 logprob gap where they part;
exits 1 when one parts where that gap is above `tie` nats (not a near-tie).

  python scripts/check_tensor_parallel_gpu.py [size] [tie]   # defaults: 2, 1e-2
"""

import re
import sys

import check_overlap_gpu  # the same directory
import jax
import numpy as np

from jaxpage import LLM, SamplingParams

# check_overlap_gpu's two-layer float32 8B shapes, one step schedule for both runs.
BINDINGS = [*check_overlap_gpu.BINDINGS, "EngineConfig.overlap_steps = False"]


def collectives(hlo: str) -> dict[str, int]:
    """Collective ops of an optimized HLO text by kind (an async one counted at its start; result types may
    be tuples, with spaces)."""
    kinds = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    pattern = r"^\s*\S+ = .* {}(?:-start)?\("
    return {kind: len(re.findall(pattern.format(kind), hlo, re.MULTILINE)) for kind in kinds}


def main():
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    tie = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-2
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40000, int(rng.integers(5, 600))).tolist() for _ in range(64)]
    params = [
        SamplingParams(max_tokens=int(n), temperature=0.0, ignore_eos=True, logprobs=2)
        for n in rng.integers(1, 80, len(prompts))
    ]
    outputs, programs = {}, {}
    for tp in (1, size):
        llm = LLM.from_gin(
            ["configs/llama3_8b.gin"], [*BINDINGS, f"EngineConfig.tensor_parallel_size = {tp}"]
        )
        outputs[tp] = [o.outputs[0] for o in llm.generate(prompts, params)]
        programs[tp] = {
            key: collectives(p.as_text()) for key, p in llm.engine.runner._forward_programs.items()
        }
    differ = []
    for i, (one, split) in enumerate(zip(outputs[1], outputs[size], strict=True)):
        if one.token_ids != split.token_ids:
            at = next(
                p for p, (a, b) in enumerate(zip(one.token_ids, split.token_ids, strict=False)) if a != b
            )
            top = sorted(one.logprobs[at].values(), reverse=True)
            gap = top[0] - top[1] if len(top) > 1 else float("nan")
            differ.append((i, at, len(one.token_ids), gap))
    tokens = sum(len(o.token_ids) for o in outputs[1])
    print(
        f"{jax.devices()[0].device_kind} x {size}, JAX {jax.__version__}: {len(prompts)} greedy requests, "
        f"{tokens} tokens"
    )
    for (bucket, kind), counts in programs[size].items():
        print(f"collectives of the split {kind} program {bucket}: {counts}")
    print(f"outputs that differ between tensor_parallel_size 1 and {size}: {len(differ)}")
    for i, at, length, gap in differ:
        print(f"request {i} from token {at} of {length}, top-2 logprob gap there {gap:.2e}")
    sys.exit(1 if any(not gap <= tie for *_, gap in differ) else 0)


if __name__ == "__main__":
    main()
