"""Fuzzing the public API: every input either runs or is refused with a ValueError that names the field at
fault; no other exception escapes, and the engine is left serving with every page back.

The strategies mix well-formed values with every JSON-able type in every field, lone surrogates in text,
and ids past the vocabulary.
"""

import dataclasses
import importlib.util
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxpage import LLM, SamplingParams

FIELDS = [field.name for field in dataclasses.fields(SamplingParams)]
# JAXPAGE_FUZZ_EXAMPLES raises the count for a long run (docs/reliability.md records one); CI runs 100.
FUZZ = settings(
    max_examples=int(os.environ.get("JAXPAGE_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Text with lone surrogates (valid in JSON and Python strings, not in UTF-8) and control characters.
text = st.text(st.characters(codec=None, categories=["L", "N", "P", "S", "Zs", "Cc", "Cs"]), max_size=12)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-1e-30, 1e-30),
    text,
)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)

# Plausible values per field, so that most examples get past the first check and reach the later ones.
PLAUSIBLE = {
    "max_tokens": st.integers(-1, 40),
    "temperature": st.sampled_from([0, 0.005, 0.01, 0.7, 1.0, 2.0, 1e300, -1.0]),
    "top_p": st.sampled_from([1e-40, 0.1, 0.9, 1.0, 1.5]),
    "top_k": st.integers(-1, 200),
    "min_p": st.sampled_from([0.0, 1e-40, 0.05, 1.0, 2.0]),
    "repetition_penalty": st.sampled_from([1.0, 1.2, 0.0, 1e-300, 1e300]),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "seed": st.one_of(st.none(), st.integers(-1, 2**33)),
    "stop": st.one_of(st.none(), text, st.lists(text, max_size=3)),
    "stop_token_ids": st.one_of(st.none(), st.lists(st.integers(-1, 60000), max_size=20)),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 300),
    "logprobs": st.one_of(st.none(), st.booleans(), st.integers(-1, 30)),
    "prompt_logprobs": st.one_of(st.none(), st.booleans(), st.integers(-1, 30)),
    "n": st.integers(0, 4),
    "best_of": st.one_of(st.none(), st.integers(0, 5)),
    "use_beam_search": st.booleans(),
    "length_penalty": st.sampled_from([1.0, 0.5, -2.0, 1e300]),
    "early_stopping": st.sampled_from([True, False, "never", "sometimes"]),
    "output_kind": st.sampled_from(["cumulative", "delta", "final_only", "stream"]),
}
assert set(PLAUSIBLE) == set(FIELDS)
sampling_kwargs = st.fixed_dictionaries(
    {}, optional={name: st.one_of(PLAUSIBLE[name], PLAUSIBLE[name], anything) for name in FIELDS}
)

token_lists = st.lists(st.one_of(st.integers(-2, 50000), st.booleans(), st.floats(0, 10)), max_size=20)
prompts = st.one_of(text, token_lists, st.lists(st.integers(0, 49151), min_size=1, max_size=300), anything)
message = st.fixed_dictionaries(
    {}, optional={"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), anything),
                  "content": st.one_of(text, anything)}
)  # fmt: skip
conversations = st.one_of(st.lists(message, max_size=4), anything)


def names_a_field(error: ValueError, fields) -> bool:
    # As a whole word: "n" is in nearly every message.
    return any(re.search(rf"\b{re.escape(name)}\b", str(error)) for name in fields)


@FUZZ
@given(sampling_kwargs)
def test_sampling_params_are_built_or_refused_naming_the_field(kwargs):
    try:
        SamplingParams(**kwargs)
    except ValueError as error:
        assert names_a_field(error, kwargs), error


@pytest.fixture(scope="module")
def llm():
    return LLM.from_gin(["configs/tiny_test.gin"])


def _serve_a_little(engine, request_id: str) -> None:
    # A few steps exercise what add_request accepted; then the request makes way for the next example.
    for _ in range(3):
        engine.step()
    engine.abort(request_id, report=False)
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_free_pages == engine.pool.num_usable_pages


@FUZZ
@given(prompt=prompts, kwargs=sampling_kwargs)
def test_add_request_runs_or_refuses_naming_the_field(llm, prompt, kwargs):
    engine = llm.engine
    try:
        params = SamplingParams(**kwargs)
    except ValueError:
        params = None
    try:
        request_id = engine.add_request(prompt, params)
    except ValueError as error:
        assert names_a_field(error, ["prompt", *FIELDS]), error
        assert not engine.has_unfinished_requests()
        return
    _serve_a_little(engine, request_id)


@FUZZ
@given(messages=conversations)
def test_chat_messages_run_or_are_refused_naming_the_field(llm, messages):
    engine = llm.engine
    try:
        request_id = engine.add_request(messages=messages, sampling_params=SamplingParams(max_tokens=2))
    except ValueError as error:
        assert names_a_field(error, ["messages", "prompt"]), error
        assert not engine.has_unfinished_requests()
        return
    _serve_a_little(engine, request_id)


@FUZZ
@given(
    prompt_list=st.one_of(st.lists(prompts, max_size=3), prompts),
    params=st.one_of(
        st.none(), st.just(SamplingParams(max_tokens=2)), anything, st.dictionaries(text, anything)
    ),
)
def test_generate_runs_or_refuses_naming_the_field(llm, prompt_list, params):
    try:
        outputs = llm.generate(prompt_list, params)
    except ValueError as error:
        assert names_a_field(error, ["prompt", "sampling_params"]), error
    else:
        assert all(output.finished for output in outputs)
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_free_pages == engine.pool.num_usable_pages


def _load_generate_script():
    path = Path(__file__).resolve().parent.parent / "scripts" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_script_for_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


field_values = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(text, st.integers(-5, 5), anything),
        "prompt": st.one_of(text, anything),
        "messages": conversations,
        **{name: st.one_of(PLAUSIBLE[name], anything) for name in FIELDS},
        "unknown": anything,
    },
)
json_lines = st.one_of(
    field_values.map(lambda fields: json.dumps(fields).encode()),  # escapes surrogates: valid
    st.binary(max_size=40),
    st.sampled_from(
        [b"", b"   ", b"[]", b"null", b'{"prompt": "hi"', b'{"prompt": "\xe9t\xe9"}', b"[" * 10**5]
    ),
)


@FUZZ
@given(lines=st.lists(json_lines, min_size=1, max_size=4), bom=st.booleans())
def test_jsonl_lines_are_served_or_answered_with_an_error_row(llm, lines, bom):
    generate = _load_generate_script()
    if bom:
        lines[0] = b"\xef\xbb\xbf" + lines[0]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "input.jsonl"
        path.write_bytes(b"\n".join(lines))
        output = Path(folder) / "out.jsonl"
        rows = generate.serve_to_file(llm, generate.read_lines(path), output)
        written = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
        served_lines = [i for i, line in enumerate(generate.read_lines(path), start=1) if line.strip()]
    assert written == json.loads(json.dumps(rows))
    assert [row["line"] for row in rows] == served_lines
    for row in rows:
        assert ("error" in row) != ("outputs" in row)
        if "error" in row:
            assert row["error"].startswith(f"line {row['line']}: ")
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_free_pages == engine.pool.num_usable_pages
