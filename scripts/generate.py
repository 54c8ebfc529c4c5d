"""Batch generation: one request per JSONL line in, one result per line out, all served in one batch.

Input: a UTF-8 JSONL file (a byte-order mark at its start is allowed). Input line: {"id"?, "prompt": str |
"messages": [{role, content}], and any `SamplingParams` field: "n"?, "best_of"?, "max_tokens"?,
"min_tokens"?, "temperature"?, "top_p"?, "top_k"?, "min_p"?, "repetition_penalty"?, "presence_penalty"?,
"frequency_penalty"?, "seed"?, "stop"?, "stop_token_ids"?, "ignore_eos"?, "logprobs"?, "prompt_logprobs"?,
"use_beam_search"?, "length_penalty"?, "early_stopping"?}. An id is a string or an int and defaults to the
line number; a repeated id is served again, with a warning.

Output line: {"id", "line", "prompt_token_ids", "prompt_logprobs"?, "outputs": [{"index", "text",
"token_ids", "finish_reason", "cumulative_logprob", "logprobs"?}], "metrics": {"queue_time", "ttft", "tpot",
"num_cached_tokens", ...}}, or {"id", "line", "error"} for a line that could not be served or a request that
failed; the other lines are served regardless. "line" is the 1-based input line number.

Rows are written to the output file as their requests finish, so while the run goes on (or after it was
interrupted) the file holds the finished rows in completion order; a run that ends normally rewrites it in
input order. Sort a partial file by "line" to restore the input order.

With "logprobs": k, an output's "logprobs" has, per generated token, a list of [token_id, logprob] pairs: the
generated token first, then the k most likely tokens in order (the generated one appears once). With
"prompt_logprobs": k, "prompt_logprobs" has the same per prompt token (null for the first). Logprobs are of
the model's own distribution, before penalties, temperature and filters. A request asking prompt logprobs
takes no prefix-cache hit.

The engine's metrics (peak KV usage, prefix-cache hit rate, preemptions, swaps) are printed at the end. The
resolved gin config is written next to the output. Logging shows warnings and errors only, unless --verbosity
is given.

  python scripts/generate.py --input examples/prompts.jsonl --output out/demo.jsonl --print_outputs
"""

import codecs
import concurrent.futures
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from tokenize import TokenError
from typing import NoReturn

import jax
from absl import app, flags, logging
from tqdm import tqdm

from jaxpage import LLM, SamplingParams, distributed, gin_config
from jaxpage.engine import LLMEngine

DEFAULT_GIN_FILE = str(Path(__file__).resolve().parent.parent / "configs" / "smollm2_135m.gin")
# A row holds a request's final output only, so its output_kind is the engine's business, not the line's.
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name != "output_kind")
FIELDS = ("id", "prompt", "messages", *SAMPLING_FIELDS)

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Only when run as a script: importing `serve` (tests) then leaves the process-wide flags alone.
    flags.DEFINE_multi_string("gin_file", None, f"Gin files, applied in order; default {DEFAULT_GIN_FILE}.")
    flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied after the files.")
    flags.DEFINE_string("input", None, "JSONL file of requests.", required=True)
    flags.DEFINE_string("output", None, "JSONL file the results are written to.", required=True)
    flags.DEFINE_bool("print_outputs", False, "Print each answer as soon as it is done.")
    flags.DEFINE_string(
        "coordinator_address", None,
        "host:port of the first process of a multi-process run (default $JAXPAGE_COORDINATOR_ADDRESS); "
        "unset: one process.",
    )  # fmt: skip
    flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run ($JAXPAGE_NUM_PROCESSES).")
    flags.DEFINE_integer("process_id", None, "This process's index in it, from 0 ($JAXPAGE_PROCESS_ID).")


def read_lines(path: Path) -> list[bytes]:
    """The file's lines, undecoded: a line that is not UTF-8 then fails alone, in `parse_line`."""
    # Some editors start a UTF-8 file with a byte-order mark; it is no part of line 1's JSON.
    return path.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines()


def parse_line(text: str | bytes) -> tuple[object, dict]:
    """One input line -> (its id or None, its fields). ValueError names the field at fault.

    Only the id is checked here, so that a line refused for another field keeps its id in the error row.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"not valid UTF-8: byte {error.object[error.start]:#04x} at offset {error.start}"
            ) from None
    try:
        line = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON: {error}") from None
    except RecursionError:
        raise ValueError("not valid JSON here: nested too deeply") from None
    if not isinstance(line, dict):
        raise ValueError(f"a line must be a JSON object, got {type(line).__name__}")
    request_id = line.get("id")
    # bool is an int in Python, but `true` as an id is a mistake, not id 1.
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, str | int)):
        raise ValueError(f"id must be a string or an int, got {request_id!r}")
    return request_id, line


def request_kwargs(line: dict) -> dict:
    """A parsed line's fields -> keyword arguments of `LLMEngine.add_request`. ValueError names the field."""
    unknown = sorted(set(line) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; known fields: {', '.join(FIELDS)}")
    # A null field is an absent one, as for every other field ("stop": null, "seed": null).
    line = {name: value for name, value in line.items() if value is not None}
    if ("prompt" in line) == ("messages" in line):
        raise ValueError("give exactly one of the fields prompt and messages")
    if "prompt" in line and not isinstance(line["prompt"], str):
        raise ValueError(f"prompt must be a string, got {line['prompt']!r}")
    fields = {name: line[name] for name in SAMPLING_FIELDS if name in line}
    params = SamplingParams(**fields, output_kind="final_only")
    return {"prompt": line.get("prompt"), "messages": line.get("messages"), "sampling_params": params}


def _error_row(request_id, line_number: int, error) -> dict:
    return {"id": request_id, "line": line_number, "error": f"line {line_number}: {error}"}


def _result_row(request_id, line_number: int, output) -> dict:
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
    row = {"id": request_id, "line": line_number, "prompt_token_ids": output.prompt_token_ids}
    if output.prompt_logprobs is not None:
        row["prompt_logprobs"] = [_pairs(position) for position in output.prompt_logprobs]
    return row | {"outputs": results, "metrics": dataclasses.asdict(output.metrics)}


def _pairs(logprobs: dict[int, float] | None) -> list[list] | None:
    # JSON keys are strings; pairs keep the ids as ints and the order (the chosen token first).
    return None if logprobs is None else [[token_id, logprob] for token_id, logprob in logprobs.items()]


def serve(
    llm: LLM,
    lines: Sequence[str | bytes],
    on_row: Callable[[dict], None] | None = None,
    progress: bool = False,
    first_line: int = 1,
) -> list[dict]:
    """Serves every non-blank line in one continuous batch and returns the output rows in input order.

    `on_row` gets each row as soon as it is final: rows of refused lines first, then the others as their
    requests finish. A line's id defaults to its line number (`first_line` for the first of `lines`); a line
    that cannot be served gets an `error` row naming the line and the field, and leaves the engine as it was.
    With data-parallel replicas (`llm.replicas`), each serves a contiguous share of the lines, side by side.
    An exception (Ctrl-C) aborts the requests still running, so the engine can serve again.
    """
    engines = [replica.engine for replica in llm.replicas] or [llm.engine]
    numbered = [(n, text) for n, text in enumerate(lines, start=first_line) if text.strip()]
    rows: dict[int, dict] = {}  # by line number
    lock = threading.Lock()  # replicas finish rows from their own threads
    first_line_of: dict[object, int] = {}  # by id

    def finish(line_number: int, row: dict) -> None:
        with lock:
            rows[line_number] = row
            if on_row is not None:
                on_row(row)

    queued: list[tuple[LLMEngine, dict]] = []
    stop = threading.Event()
    try:  # an interrupt while queueing or serving aborts what this call queued
        for index, engine in enumerate(engines):
            share = distributed.share(len(numbered), index, len(engines))
            pending = _queue(engine, numbered[share.start : share.stop], finish, first_line_of)
            queued.append((engine, pending))
        total = sum(len(pending) for _, pending in queued)
        with tqdm(total=total, unit="req", disable=not progress, file=sys.stderr) as bar:
            counter = _Progress(bar)
            if len(queued) == 1:
                _drain(*queued[0], finish, counter, stop)
            else:
                with concurrent.futures.ThreadPoolExecutor(len(queued)) as pool:
                    futures = [pool.submit(_drain, *q, finish, counter, stop) for q in queued]
                    try:
                        for future in futures:
                            future.result()
                    except BaseException:
                        stop.set()  # the other replicas stop after their current step
                        raise
    except BaseException:
        for engine, pending in queued:
            for engine_id in list(pending):
                engine.abort(engine_id, report=False)  # no one will read its final output
        raise
    return [rows[line_number] for line_number in sorted(rows)]


def _queue(engine: LLMEngine, numbered, finish, first_line_of: dict) -> dict[str, tuple[int, object]]:
    """Adds each line's request to the engine (a refused line gets its error row at once); returns engine
    request id -> (line number, the line's id) of the queued ones."""
    pending = {}
    for line_number, text in numbered:
        request_id = line_number
        try:
            line_id, line = parse_line(text)
            request_id = line_number if line_id is None else line_id
            first = first_line_of.setdefault(request_id, line_number)
            if first != line_number:
                print(
                    f"warning: line {line_number} repeats the id {request_id!r} of line {first}",
                    file=sys.stderr,
                )
            # Engine ids are per line, so a repeated `id` in the input cannot clash.
            engine_id = engine.add_request(request_id=f"line-{line_number}", **request_kwargs(line))
        except ValueError as error:
            finish(line_number, _error_row(request_id, line_number, error))
            continue
        pending[engine_id] = (line_number, request_id)
    return pending


class _Progress:
    """The progress bar and the output tokens per second, updated from every replica's thread."""

    def __init__(self, bar: tqdm):
        self.bar, self.generated, self.start = bar, 0, time.perf_counter()
        self.lock = threading.Lock()

    def update(self, new_tokens: int, finished: int) -> None:
        with self.lock:
            self.generated += new_tokens
            self.bar.update(finished)
            rate = self.generated / (time.perf_counter() - self.start)
            self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)


def _drain(engine: LLMEngine, pending: dict, finish, progress: _Progress, stop: threading.Event) -> None:
    """Steps the engine until its queued lines are all final (removing them from `pending`), or `stop`."""
    while pending and not stop.is_set():
        new_tokens = finished = 0
        for output in engine.step():
            new_tokens += sum(len(completion.new_token_ids) for completion in output.outputs)
            if output.finished and output.request_id in pending:
                line_number, request_id = pending.pop(output.request_id)
                error = getattr(output, "error", None)  # set when the device failed it
                if error:
                    finish(line_number, _error_row(request_id, line_number, error))
                else:
                    finish(line_number, _result_row(request_id, line_number, output))
                finished += 1
        progress.update(new_tokens, finished)


# Characters JSON leaves raw that Python's str.splitlines (and some editors) take for line breaks.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _json_line(row: dict) -> str:
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (valid JSON, e.g. in an id) has no UTF-8: keep it escaped
        line = json.dumps(row)
    return line.translate(_LINE_BREAKS) + "\n"


def serve_to_file(
    llm: LLM,
    lines: Sequence[str | bytes],
    path: Path,
    progress: bool = False,
    first_line: int = 1,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """`serve`, writing each row to `path` as it is final (and passing it to `on_row`); once all are, rewrites
    `path` in input order."""
    with path.open("w", encoding="utf-8") as f:

        def write(row: dict) -> None:
            f.write(_json_line(row))
            f.flush()  # an interrupted or killed run keeps the rows it finished
            if on_row is not None:
                on_row(row)

        rows = serve(llm, lines, on_row=write, progress=progress, first_line=first_line)
    write_rows(rows, path)
    return rows


def write_rows(rows: list[dict], path: Path) -> None:
    # Through a temporary file, so a run stopped while rewriting still leaves every row.
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(map(_json_line, rows)), encoding="utf-8")
    os.replace(temporary, path)


def check_output_path(path: Path) -> None:
    """ValueError for an output the run could not write, found before the model loads and not after."""
    if path.is_dir():
        raise ValueError(f"--output {str(path)!r} is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--output {str(path)!r}: cannot create its folder: {error.strerror}") from None
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"--output {str(path)!r}: its folder is not writable")


def _one_line(error: Exception) -> str:
    if isinstance(error, SyntaxError):  # its str() leaves out the text that failed to parse
        where = f"{error.filename}, line {error.lineno}" if error.filename else "--gin_bindings"
        return f"{error.msg.rstrip('.')} ({where}): {(error.text or '').strip()!r}"
    return str(error).splitlines()[0]  # gin appends lines of context to a message


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _print_row(row: dict) -> None:
    answer = f"error: {row['error']}" if "error" in row else row["outputs"][0]["text"].strip()
    tqdm.write(f"=== {row['id']} ===\n{answer}\n")  # above the progress bar, not through it


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        # Libraries log at INFO while loading (backends, checkpoints): noise around the progress and results.
        logging.set_verbosity(logging.WARNING)
    input_path, output_path = Path(FLAGS.input), Path(FLAGS.output)
    # Before the model loads, so a mistake costs nothing.
    if not input_path.is_file():
        _fail(f"--input file {str(input_path)!r} does not exist")
    try:
        check_output_path(output_path)
    except ValueError as error:
        _fail(str(error))
    gin_files = FLAGS.gin_file or [DEFAULT_GIN_FILE]
    for gin_file in gin_files:
        if not Path(gin_file).is_file():  # gin would log its search first, then raise
            _fail(f"--gin_file {gin_file!r} does not exist")
    lines = read_lines(input_path)

    try:
        setup = gin_config.parse(gin_files, FLAGS.gin_bindings)
    except (ImportError, OSError, SyntaxError, TokenError, TypeError, ValueError) as error:
        _fail(f"gin config: {_one_line(error)}")
    try:  # before anything starts a JAX backend
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as error:
        _fail(str(error))
    process, num_processes = jax.process_index(), jax.process_count()
    config_path = output_path.with_name(output_path.stem + ".config.gin")
    if process == 0:
        config_path.write_text(gin_config.operative_config(), encoding="utf-8")
    try:
        llm = LLM(
            setup.engine, random_model=setup.random_model, random_weight_scale=setup.random_weight_scale
        )
    except (OSError, ValueError) as error:
        _fail(f"cannot build the engine: {_one_line(error)}")

    # Each process serves its contiguous share of the lines into a file of its own; the first one gathers
    # every share's rows and writes the output in input order.
    share = distributed.process_share(len(lines))
    own_path = (
        output_path if num_processes == 1 else output_path.with_name(f"{output_path.name}.process{process}")
    )
    try:
        # One process prints each answer as it is done; several print them all from the first, at the end.
        print_now = FLAGS.print_outputs and num_processes == 1
        rows = serve_to_file(
            llm, lines[share.start : share.stop], own_path, progress=True, first_line=share.start + 1,
            on_row=_print_row if print_now else None,
        )  # fmt: skip
    except KeyboardInterrupt:
        print(f"\ninterrupted: {own_path} holds the finished rows, in completion order", file=sys.stderr)
        sys.exit(130)
    for engine in [replica.engine for replica in llm.replicas] or [llm.engine]:
        print(f"engine: {engine.metrics().summary()}", file=sys.stderr)
    if num_processes > 1:
        rows = distributed.gather_to_first(rows)
        own_path.unlink()
        if rows is None:  # not the first process
            return
        write_rows(rows, output_path)
    num_errors = sum("error" in row for row in rows)
    print(
        f"wrote {len(rows)} results ({num_errors} errors) to {output_path}; config in {config_path}",
        file=sys.stderr,
    )
    if FLAGS.print_outputs and num_processes > 1:
        for row in rows:
            _print_row(row)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
