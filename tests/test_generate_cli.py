"""scripts/generate.py: bad lines fail alone with the field named, batching changes no greedy output, finished
rows reach the file as they finish, and a config mistake is one line of error."""

import codecs
import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxpage import LLM, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "generate.py"
TINY_GIN = str(ROOT / "configs" / "tiny_test.gin")
# 23 usable pages of 8 tokens (184 tokens) for up to 8 running requests of up to ~150 tokens: requests must
# wait for pages, and running ones get preempted.
SMALL_POOL = ["EngineConfig.num_pages = 24"]
GOOD = json.dumps({"prompt": "Hello there", "max_tokens": 3, "temperature": 0})


def _load_script():
    spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_script = _load_script()


@pytest.fixture(scope="module")
def llm():
    return LLM.from_gin([TINY_GIN], SMALL_POOL)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": ""}', "prompt must be a non-empty string"),
        (json.dumps({"prompt": "word " * 400}), "max_model_len"),
        ('{"prompt": "hi", "max_tokens": 0}', "max_tokens must be"),
        ('{"prompt": "hi", "temperature": -0.5}', "temperature must be"),
        ('{"prompt": "hi", "temperature": NaN}', "temperature must be"),
        ('{"prompt": "hi", "top_p": 0}', "top_p must be"),
        ('{"prompt": "hi", "top_p": 1.5}', "top_p must be"),
        ('{"prompt": "hi", "top_k": -1}', "top_k must be"),
        ('{"messages": [{"role": "wizard", "content": "hi"}]}', r"messages\[0\]\.role must be one of"),
        ('{"prompt": "hi", "max_tokens": 3', "not valid JSON"),
        ('{"prompt": "hi", "temprature": 0.5}', "unknown field 'temprature'"),
        ('{"max_tokens": 3}', "exactly one of the fields prompt and messages"),
        ('{"prompt": null, "messages": null}', "exactly one of the fields prompt and messages"),
        ('{"prompt": "hi", "id": [1]}', "id must be"),
        ('{"prompt": "hi", "id": true}', "id must be a string or an int, got True"),
        ('["hi"]', "must be a JSON object"),
        ("[" * 100_000, "not valid JSON here: nested too deeply"),
        ('{"prompt": "hi", "min_p": 2}', r"min_p must be .*, got 2$"),
        ('{"prompt": "hi", "repetition_penalty": 0}', "repetition_penalty must be"),
        ('{"prompt": "hi", "presence_penalty": -3}', r"presence_penalty must be in \[-2, 2\]"),
        ('{"prompt": "hi", "frequency_penalty": 3}', "frequency_penalty must be"),
        ('{"prompt": "hi", "logprobs": 21}', r"logprobs must be <= max_logprobs \(20\), got 21"),
        ('{"prompt": "hi", "prompt_logprobs": -1}', "prompt_logprobs must be"),
        ('{"prompt": "hi", "n": 0}', r"n must be an int .*, got 0$"),
        ('{"prompt": "hi", "n": 3, "best_of": 2}', r"best_of must be None or an int .*n \(3\).*, got 2$"),
        ('{"prompt": "hi", "stop": 5}', "stop must be a non-empty string or a list of them, got 5"),
        (
            '{"prompt": "hi", "use_beam_search": true, "temperature": 0.8}',
            "temperature must be 0 with use_beam",
        ),
        (
            '{"prompt": "hi", "use_beam_search": true, "temperature": 0, "n": 11}',
            "must be <= max_logprobs / 2",
        ),
    ],
)
def test_bad_line_gets_an_error_naming_the_field_and_the_rest_is_served(llm, line, message):
    rows = generate_script.serve(llm, [GOOD, line, "", GOOD.replace("there", "again")])
    assert len(rows) == 3
    assert rows[1]["id"] == rows[1]["line"] == 2 and set(rows[1]) == {"id", "line", "error"}
    assert rows[1]["error"].startswith("line 2: ")
    assert re.search(message, rows[1]["error"]), rows[1]["error"]
    for row in (rows[0], rows[2]):
        assert row["outputs"][0]["finish_reason"] == "length" and len(row["outputs"][0]["token_ids"]) == 3


def test_missing_input_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), f"--input={missing}", f"--output={tmp_path / 'out.jsonl'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"--input file '{missing}' does not exist" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def _mixed_requests(count: int) -> list[dict]:
    """Prompts of 1 to ~100 tokens, half plain text and half chat, each with its own max_tokens."""
    rng = random.Random(0)
    words = "page pool token batch kernel cache step prefill decode warp tile block query key value".split()
    lines = []
    for i in range(count):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 60 if i % 2 else 90)))
        line = {"id": f"r{i}", "max_tokens": rng.randint(1, 40), "temperature": 0}
        if i % 2:
            line["messages"] = [{"role": "user", "content": text}]
        else:
            line["prompt"] = text
        lines.append(line)
    return lines


def test_64_greedy_requests_cli_equals_generate_equals_each_alone(llm, tmp_path):
    lines = _mixed_requests(64)
    input_path, output_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    bindings = [f"--gin_bindings={binding}" for binding in SMALL_POOL]
    cli = subprocess.run(
        [sys.executable, str(SCRIPT), f"--gin_file={TINY_GIN}", *bindings, f"--input={input_path}",
         f"--output={output_path}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    rows = [json.loads(row) for row in output_path.read_text().splitlines()]
    assert [row["id"] for row in rows] == [line["id"] for line in lines]
    assert [row["line"] for row in rows] == list(range(1, len(lines) + 1))
    assert "EngineConfig.num_pages = 24" in (tmp_path / "out.config.gin").read_text()

    prompts = [line.get("prompt") or line["messages"] for line in lines]
    params = [SamplingParams(max_tokens=line["max_tokens"], temperature=0) for line in lines]
    scheduler = llm.engine.scheduler
    waited_for_pages = []  # per step: a request waited although a row was free

    def watched_schedule(schedule=scheduler.schedule):
        output = schedule()
        waited_for_pages.append(bool(scheduler.waiting) and len(scheduler.running) < scheduler.max_num_seqs)
        return output

    scheduler.schedule = watched_schedule
    try:
        batched = llm.generate(prompts, params)
    finally:
        del scheduler.schedule
    assert any(waited_for_pages), "the pool never made a request wait for pages: make it smaller"

    for row, output, prompt, param in zip(rows, batched, prompts, params, strict=True):
        [alone] = llm.generate([prompt], param)
        single = alone.outputs[0]
        expected = (alone.prompt_token_ids, single.token_ids, single.text, single.finish_reason)
        completion = output.outputs[0]
        assert (
            output.prompt_token_ids,
            completion.token_ids,
            completion.text,
            completion.finish_reason,
        ) == expected
        completion = row["outputs"][0]
        cli = (
            row["prompt_token_ids"],
            completion["token_ids"],
            completion["text"],
            completion["finish_reason"],
        )
        assert cli == expected
        assert 1 <= len(single.token_ids) <= param.max_tokens


def test_logprobs_and_penalties_in_and_out(llm):
    line = {
        "prompt": "Hello there, general",
        "max_tokens": 4,
        "temperature": 0.9,
        "seed": 5,
        "min_p": 0.05,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.3,
        "frequency_penalty": 0.3,
        "logprobs": 2,
        "prompt_logprobs": 1,
    }
    [row] = generate_script.serve(llm, [json.dumps(line)])
    row = json.loads(json.dumps(row))  # what a reader of the file gets
    [completion] = row["outputs"]
    assert len(completion["logprobs"]) == len(completion["token_ids"]) == 4
    for token, pairs in zip(completion["token_ids"], completion["logprobs"], strict=True):
        assert pairs[0][0] == token and len(pairs) in (2, 3) and all(lp <= 0 for _, lp in pairs)
    prompt = row["prompt_logprobs"]
    assert len(prompt) == len(row["prompt_token_ids"]) and prompt[0] is None
    for token, pairs in zip(row["prompt_token_ids"][1:], prompt[1:], strict=True):
        assert pairs[0][0] == token and len(pairs) in (1, 2)
    [plain] = generate_script.serve(llm, [GOOD])
    assert "logprobs" not in plain["outputs"][0] and "prompt_logprobs" not in plain


def test_beam_search_line_returns_the_n_best_hypotheses(llm):
    line = {"prompt": "Hello there", "max_tokens": 5, "temperature": 0, "use_beam_search": True}
    line |= {"n": 2, "best_of": 3, "length_penalty": 0.5, "early_stopping": "never"}
    [row] = generate_script.serve(llm, [json.dumps(line)])
    [expected] = llm.generate(
        "Hello there",
        SamplingParams(**{k: v for k, v in line.items() if k != "prompt"}),
    )
    assert [c["token_ids"] for c in row["outputs"]] == [c.token_ids for c in expected.outputs]
    assert len(row["outputs"]) == 2


@pytest.mark.parametrize(
    "line",
    [
        {"id": "a", "prompt": "x", "temperature": -1},
        {"id": "a", "prompt": "x", "temprature": 0.5},
        {"id": "a", "prompt": ""},
        {"id": 7, "messages": [{"role": "wizard", "content": "hi"}]},
    ],
)
def test_a_refused_line_keeps_its_own_id(llm, line):
    [row] = generate_script.serve(llm, [json.dumps(line)])
    assert row["id"] == line["id"] and row["line"] == 1 and "error" in row


def test_a_byte_order_mark_is_skipped_and_a_line_not_utf8_fails_alone(llm, tmp_path):
    path = tmp_path / "in.jsonl"
    latin1 = json.dumps({"prompt": "café", "max_tokens": 3}, ensure_ascii=False).encode("latin-1")
    utf8 = json.dumps({"prompt": "café", "max_tokens": 3, "temperature": 0}, ensure_ascii=False).encode()
    path.write_bytes(codecs.BOM_UTF8 + GOOD.encode() + b"\r\n" + latin1 + b"\n" + utf8 + b"\n")
    rows = generate_script.serve(llm, generate_script.read_lines(path))
    assert [row["line"] for row in rows] == [1, 2, 3]
    assert rows[1] == {"id": 2, "line": 2, "error": "line 2: not valid UTF-8: byte 0xe9 at offset 15"}
    for row in (rows[0], rows[2]):
        assert len(row["outputs"][0]["token_ids"]) == 3


def test_each_repeated_id_gets_a_warning_and_is_served(llm, capsys):
    lines = [
        json.dumps({"id": request_id, "prompt": "Hello there", "max_tokens": 2, "temperature": 0})
        for request_id in ("a", "b", "a", "a", 1)  # line 1 has the id "a", not 1
    ]
    rows = generate_script.serve(llm, lines)
    assert [row["id"] for row in rows] == ["a", "b", "a", "a", 1]
    assert all(len(row["outputs"][0]["token_ids"]) == 2 for row in rows)
    assert capsys.readouterr().err.splitlines() == [
        "warning: line 3 repeats the id 'a' of line 1",
        "warning: line 4 repeats the id 'a' of line 1",
    ]


def test_a_request_that_failed_on_the_device_gets_an_error_row(llm, monkeypatch):
    step = llm.engine.step

    def step_failing_the_first_to_finish():
        outputs = step()
        for output in outputs:
            if output.finished:
                output.error = "the logits are NaN"
        return outputs

    monkeypatch.setattr(llm.engine, "step", step_failing_the_first_to_finish)
    line = json.dumps({"id": "x", "prompt": "Hello there", "max_tokens": 1})
    [row] = generate_script.serve(llm, [line])
    assert row == {"id": "x", "line": 1, "error": "line 1: the logits are NaN"}


def test_an_interrupted_run_leaves_the_finished_rows_in_the_file(llm, tmp_path, monkeypatch):
    lines = [
        json.dumps({"id": "long", "prompt": "Hello there", "max_tokens": 30, "ignore_eos": True}),
        json.dumps({"id": "refused", "prompt": ""}),
        json.dumps({"id": "short", "prompt": "Hello again", "max_tokens": 1, "temperature": 0}),
    ]
    step, finished = llm.engine.step, []

    def step_until_one_finished():
        if finished:
            raise KeyboardInterrupt
        outputs = step()
        finished.extend(output.request_id for output in outputs if output.finished)
        return outputs

    monkeypatch.setattr(llm.engine, "step", step_until_one_finished)
    path = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_script.serve_to_file(llm, lines, path)
    rows = [json.loads(row) for row in path.read_text().splitlines()]
    assert [(row["id"], row["line"]) for row in rows] == [("refused", 2), ("short", 3)]
    assert "error" in rows[0] and len(rows[1]["outputs"][0]["token_ids"]) == 1

    monkeypatch.undo()  # the interrupted request left nothing behind: the engine serves the same lines again
    assert not llm.engine.has_unfinished_requests()
    rows = generate_script.serve_to_file(llm, lines, path)
    assert [json.loads(row) for row in path.read_text().splitlines()] == rows
    assert [row["line"] for row in rows] == [1, 2, 3]
    assert len(rows[0]["outputs"][0]["token_ids"]) == 30
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def _run_cli(tmp_path: Path, *args: str, output: Path | None = None) -> subprocess.CompletedProcess:
    input_path = tmp_path / "in.jsonl"
    if not input_path.exists():
        input_path.write_text(GOOD + "\n")
    output = output or tmp_path / "out.jsonl"
    return subprocess.run(
        [sys.executable, str(SCRIPT), f"--gin_file={TINY_GIN}", *args, f"--input={input_path}",
         f"--output={output}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.parametrize(
    "args, output, message",
    [
        (["--gin_bindings=EngineConfig.page_size = -1"], None, "page_size must be a positive int, got -1"),
        (
            ["--gin_bindings=EngineConfig.nonexistent = 1"],
            None,
            "doesn't have a parameter named 'nonexistent'",
        ),
        (["--gin_bindings=EngineConfig.page_size = "], None, "Unable to parse value"),
        (["--gin_file=missing.gin"], None, "--gin_file 'missing.gin' does not exist"),
        (
            ["--gin_bindings=import no_such_module_xyz"],
            None,
            "gin config: No module named 'no_such_module_xyz'",
        ),
        (
            ["--gin_bindings=ModelConfig.max_position_embeddings = 128"],
            None,
            r"cannot build the engine: max_model_len \(256\) exceeds",
        ),
        ([], ".", "is a directory"),
        ([], "a_file/out.jsonl", "cannot create its folder"),
    ],
)
def test_a_config_or_output_mistake_is_one_line_of_error_and_exit_2(tmp_path, args, output, message):
    (tmp_path / "a_file").write_text("")
    result = _run_cli(tmp_path, *args, output=output and tmp_path / output)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and re.search(message, line), line


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    result = _run_cli(tmp_path_factory.mktemp("quiet_run"))
    assert result.returncode == 0, result.stderr
    return result


def test_a_default_run_logs_no_info_lines(quiet_run):
    assert not re.search(r"^I\d{4} ", quiet_run.stderr, re.MULTILINE), quiet_run.stderr
    assert "Unable to initialize backend" not in quiet_run.stderr


def test_the_summary_reports_the_peak_kv_usage(quiet_run):
    [summary] = [line for line in quiet_run.stderr.splitlines() if line.startswith("engine: ")]
    peak = re.search(r"peak KV usage (\d+\.\d)%", summary)
    assert peak and float(peak.group(1)) > 0, summary


def test_every_row_is_one_line_whatever_its_text(llm, tmp_path):
    # A lone surrogate has no UTF-8; U+0085 and U+2028 are line breaks to str.splitlines and some editors.
    lines = [
        json.dumps({"id": "\ud800", "prompt": "hi", "max_tokens": 2}),
        '{"id": "a\\u2028b\\u0085", "prompt": 5}',
    ]
    path = tmp_path / "out.jsonl"
    rows = generate_script.serve_to_file(llm, lines, path)
    written = path.read_text(encoding="utf-8").splitlines()
    assert len(written) == 2 and [json.loads(line)["id"] for line in written] == ["\ud800", "a\u2028b\x85"]
    assert "outputs" in rows[0] and "error" in rows[1]


def test_a_null_field_is_an_absent_one(llm):
    line = '{"prompt": "hi", "messages": null, "max_tokens": null, "stop": null}'
    (row,) = generate_script.serve(llm, [line])
    assert "error" not in row and len(row["outputs"][0]["token_ids"]) == 16  # the default max_tokens


def test_printed_answers_come_as_each_is_done(llm, tmp_path, capsys):
    lines = [
        json.dumps({"id": "long", "prompt": "Hello there", "max_tokens": 30, "ignore_eos": True}),
        json.dumps({"id": "short", "prompt": "Hello again", "max_tokens": 1, "temperature": 0}),
    ]
    printed_before_the_end = []

    def print_row(row):
        generate_script._print_row(row)
        printed_before_the_end.append(row["id"])

    rows = generate_script.serve_to_file(llm, lines, tmp_path / "out.jsonl", on_row=print_row)
    assert printed_before_the_end == ["short", "long"] and [row["id"] for row in rows] == ["long", "short"]
    out = capsys.readouterr().out
    assert out.index("=== short ===") < out.index("=== long ===")
