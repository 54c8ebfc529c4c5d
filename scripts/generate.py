"""Batch generation: one request per JSONL line in, one result per line out, all served in one batch.

Input line: {"id"?, "prompt": str | "messages": [{role, content}], and any `SamplingParams` field: "n"?,
"best_of"?, "max_tokens"?, "min_tokens"?, "temperature"?, "top_p"?, "top_k"?, "min_p"?, "repetition_penalty"?,
"presence_penalty"?, "frequency_penalty"?, "seed"?, "stop"?, "stop_token_ids"?, "ignore_eos"?, "logprobs"?,
"prompt_logprobs"?, "use_beam_search"?, "length_penalty"?, "early_stopping"?}. Output line, in input order:
{"id", "prompt_token_ids", "prompt_logprobs"?, "outputs": [{"index", "text", "token_ids", "finish_reason",
"cumulative_logprob", "logprobs"?}], "metrics": {"queue_time", "ttft", "tpot", "num_cached_tokens", ...}}, or
{"id", "error"} for a line that could not be served; the other lines are served regardless.

With "logprobs": k, an output's "logprobs" has, per generated token, a list of [token_id, logprob] pairs: the
generated token first, then the k most likely tokens in order (the generated one appears once). With
"prompt_logprobs": k, "prompt_logprobs" has the same per prompt token (null for the first). Logprobs are of
the model's own distribution, before penalties, temperature and filters. A request asking prompt logprobs
takes no prefix-cache hit.

The engine's metrics (KV usage, prefix-cache hit rate, preemptions, swaps) are printed at the end. The
resolved gin config is written next to the output.

  python scripts/generate.py --input examples/prompts.jsonl --output out/demo.jsonl --print_outputs
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

from absl import app, flags
from tqdm import tqdm

from jaxpage import LLM, SamplingParams, gin_config

DEFAULT_GIN_FILE = str(Path(__file__).resolve().parent.parent / "configs" / "smollm2_135m.gin")
SAMPLING_FIELDS = tuple(field.name for field in dataclasses.fields(SamplingParams))
FIELDS = ("id", "prompt", "messages", *SAMPLING_FIELDS)

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Only when run as a script: importing `serve` (tests) then leaves the process-wide flags alone.
    flags.DEFINE_multi_string("gin_file", None, f"Gin files, applied in order; default {DEFAULT_GIN_FILE}.")
    flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied after the files.")
    flags.DEFINE_string("input", None, "JSONL file of requests.", required=True)
    flags.DEFINE_string("output", None, "JSONL file the results are written to.", required=True)
    flags.DEFINE_bool("print_outputs", False, "Print every prompt and its answer when done.")


def parse_line(text: str) -> tuple[object, dict]:
    """One input line -> (its id or None, keyword arguments of `LLMEngine.add_request`). ValueError names the
    field at fault."""
    try:
        line = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON: {error}") from None
    if not isinstance(line, dict):
        raise ValueError(f"a line must be a JSON object, got {type(line).__name__}")
    unknown = sorted(set(line) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; known fields: {', '.join(FIELDS)}")
    request_id = line.get("id")
    if request_id is not None and not isinstance(request_id, str | int):
        raise ValueError(f"id must be a string or an int, got {request_id!r}")
    if ("prompt" in line) == ("messages" in line):
        raise ValueError("give exactly one of the fields prompt and messages")
    if "prompt" in line and not isinstance(line["prompt"], str):
        raise ValueError(f"prompt must be a string, got {line['prompt']!r}")
    params = SamplingParams(**{name: line[name] for name in SAMPLING_FIELDS if name in line})
    return request_id, {
        "prompt": line.get("prompt"),
        "messages": line.get("messages"),
        "sampling_params": params,
    }


def _result_row(request_id, output) -> dict:
    results = []
    for completion in output.outputs:
        result = {
            "index": completion.index,
            "text": completion.text,
            "token_ids": completion.token_ids,
            "finish_reason": completion.finish_reason,
            "cumulative_logprob": completion.cumulative_logprob,
        }
        if completion.logprobs is not None:
            result["logprobs"] = [_pairs(position) for position in completion.logprobs]
        results.append(result)
    row = {"id": request_id, "prompt_token_ids": output.prompt_token_ids}
    if output.prompt_logprobs is not None:
        row["prompt_logprobs"] = [_pairs(position) for position in output.prompt_logprobs]
    return row | {"outputs": results, "metrics": dataclasses.asdict(output.metrics)}


def _pairs(logprobs: dict[int, float] | None) -> list[list] | None:
    # JSON keys are strings; pairs keep the ids as ints and the order (the chosen token first).
    return None if logprobs is None else [[token_id, logprob] for token_id, logprob in logprobs.items()]


def serve(llm: LLM, lines: list[str], progress: bool = False) -> list[dict]:
    """Serves every non-blank line in one continuous batch and returns the output rows in input order.

    A line's id defaults to its 1-based line number; a line that cannot be served gets an `error` row naming
    the line and the field, and leaves the engine as it was.
    """
    engine = llm.engine
    rows: list[dict | None] = []
    pending: dict[str, tuple[int, object]] = {}  # engine request id -> (row index, the line's id)
    for line_number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        request_id = line_number
        try:
            request_id, kwargs = parse_line(text)
            request_id = line_number if request_id is None else request_id
            # Engine ids are per line, so a repeated `id` in the input cannot clash.
            engine_id = engine.add_request(request_id=f"line-{line_number}", **kwargs)
        except ValueError as error:
            rows.append({"id": request_id, "error": f"line {line_number}: {error}"})
            continue
        pending[engine_id] = (len(rows), request_id)
        rows.append(None)

    start, generated = time.perf_counter(), 0
    with tqdm(total=len(pending), unit="req", disable=not progress, file=sys.stderr) as bar:
        while pending:
            for output in engine.step():
                generated += sum(len(completion.new_token_ids) for completion in output.outputs)
                if output.finished and output.request_id in pending:
                    index, request_id = pending.pop(output.request_id)
                    rows[index] = _result_row(request_id, output)
                    bar.update(1)
            bar.set_postfix_str(f"{generated / (time.perf_counter() - start):.1f} tok/s", refresh=False)
    assert all(row is not None for row in rows)
    return rows


def _print_outputs(rows: list[dict]) -> None:
    for row in rows:
        print(f"=== {row['id']} ===")
        if "error" in row:
            print(f"error: {row['error']}")
        else:
            print(row["outputs"][0]["text"].strip())
        print()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    input_path, output_path = Path(FLAGS.input), Path(FLAGS.output)
    if not input_path.is_file():  # before the model loads, so the mistake costs nothing
        sys.exit(f"error: --input file {str(input_path)!r} does not exist")
    lines = input_path.read_text(encoding="utf-8").splitlines()

    setup = gin_config.parse(FLAGS.gin_file or [DEFAULT_GIN_FILE], FLAGS.gin_bindings)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    config_path = output_path.with_name(output_path.stem + ".config.gin")
    config_path.write_text(gin_config.operative_config(), encoding="utf-8")
    llm = LLM(setup.engine, random_model=setup.random_model, random_weight_scale=setup.random_weight_scale)

    rows = serve(llm, lines, progress=True)
    with output_path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    num_errors = sum("error" in row for row in rows)
    print(
        f"wrote {len(rows)} results ({num_errors} errors) to {output_path}; config in {config_path}",
        file=sys.stderr,
    )
    print(f"engine: {llm.engine.metrics().summary()}", file=sys.stderr)
    if FLAGS.print_outputs:
        _print_outputs(rows)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
