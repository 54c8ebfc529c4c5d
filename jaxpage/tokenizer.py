"""Text <-> token ids, chat templates, and streaming detokenization.

A `Tokenizer` wraps a `tokenizers.Tokenizer` built from a GGUF file's `tokenizer.ggml.*` metadata or from a
Hugging Face directory (tokenizer.json). It matches HF transformers on the prompts the parity tests check: the
chat template is rendered the way `apply_chat_template` renders it and the result is encoded without adding
special tokens; `eos_token_ids` are the ids HF `generate` stops on.
"""

import datetime
import json
import os
from collections.abc import Sequence
from functools import cached_property

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers, processors

from models.loaders.gguf import read_gguf

CHAT_ROLES = ("system", "user", "assistant", "tool")

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4
# How each `tokenizer.ggml.pre` splits text before BPE. "smollm" and "starcoder" isolate every digit first:
# so do their tokenizer.json and llama.cpp, and their merges contain no digit at all.
_DIGITS_THEN_BYTE_LEVEL = ("smollm", "starcoder")
_BYTE_LEVEL = ("gpt2", "gpt-2")


class Tokenizer:
    """Encode/decode text, render chat templates. Build with `from_gguf` or `from_hf_dir`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
    ):
        """`backend` already adds BOS/EOS itself when encoding with special tokens (its post-processor)."""
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # The template sees the special tokens as strings, as HF passes them (`{{ bos_token }}`).
        self.special_tokens = {
            name: token
            for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token),
                                ("unk_token", unk_token))
            if token is not None
        }  # fmt: skip
        for name, token in self.special_tokens.items():
            if backend.token_to_id(token) is None:
                raise ValueError(f"{name}={token!r} is not in the vocabulary")
        self.bos_token_id = self.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id = self.token_to_id(eos_token) if eos_token is not None else None
        self.pad_token_id = self.token_to_id(pad_token) if pad_token is not None else None
        for token_id in extra_eos_token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"eos token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        # What generation stops on: the tokenizer's eos plus the ids the generation config adds.
        eos = {self.eos_token_id} if self.eos_token_id is not None else set()
        self.eos_token_ids = frozenset(eos | set(extra_eos_token_ids))
        self.chat_template = chat_template

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
        """The tokenizer a GGUF file describes: byte-level BPE (`tokenizer.ggml.model` "gpt2") only."""
        meta, _ = read_gguf(path)
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"tokenizer.ggml.model={model!r} in {path} is not supported; only 'gpt2' (byte-level BPE)"
            )
        pre = meta.get("tokenizer.ggml.pre", "gpt2")
        if pre in _DIGITS_THEN_BYTE_LEVEL:
            digits = pre_tokenizers.Digits(individual_digits=True)
            pre_tokenizer = pre_tokenizers.Sequence(
                [digits, pre_tokenizers.ByteLevel(add_prefix_space=False)]
            )
        elif pre in _BYTE_LEVEL:
            pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            known = _DIGITS_THEN_BYTE_LEVEL + _BYTE_LEVEL
            raise ValueError(f"tokenizer.ggml.pre={pre!r} in {path} is not supported; known: {known}")

        tokens = meta["tokenizer.ggml.tokens"]
        merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
        assert all(len(m) == 2 for m in merges), "a byte-level merge has exactly one space"
        vocab = {token: i for i, token in enumerate(tokens)}
        backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizer
        backend.decoder = decoders.ByteLevel()

        def token(key: str) -> str | None:
            token_id = meta.get(f"tokenizer.ggml.{key}")
            return tokens[token_id] if token_id is not None else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        # Control tokens stay whole in text and are skipped when decoding; user-defined ones only stay whole.
        types = meta.get("tokenizer.ggml.token_type", [])
        special = {tokens[i] for i, kind in enumerate(types) if kind == _CONTROL} | {bos, eos} - {None}
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(special)])
        user = [
            AddedToken(tokens[i], normalized=False) for i, kind in enumerate(types) if kind == _USER_DEFINED
        ]
        backend.add_tokens(user)
        _set_post_processor(
            backend,
            bos if meta.get("tokenizer.ggml.add_bos_token", False) else None,
            eos if meta.get("tokenizer.ggml.add_eos_token", False) else None,
        )
        # HF takes the generation config's eos from tokenizer.ggml.eos_token_id: nothing extra to stop on.
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            pad_token=token("padding_token_id"),
            unk_token=token("unknown_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """tokenizer.json, plus tokenizer_config.json (special tokens, chat template), chat_template.jinja and
        generation_config.json (extra eos ids) when present."""
        tokenizer_json = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_json):
            raise ValueError(f"path={os.fspath(path)!r} has no tokenizer.json")
        backend = tokenizers.Tokenizer.from_file(tokenizer_json)
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        tokens = {
            name: _token_content(config.get(name))
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        if "add_bos_token" in config or "add_eos_token" in config:
            # HF rebuilds the post-processor from these flags, overriding tokenizer.json's.
            bos = tokens["bos_token"] if config.get("add_bos_token") else None
            _set_post_processor(backend, bos, tokens["eos_token"] if config.get("add_eos_token") else None)

        template = config.get("chat_template")
        template_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                template = f.read()
        elif isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")

        generation = _read_json(os.path.join(path, "generation_config.json")) or _read_json(
            os.path.join(path, "config.json")
        )
        extra_eos = generation.get("eos_token_id")
        extra_eos = (
            [] if extra_eos is None else [extra_eos] if isinstance(extra_eos, int) else list(extra_eos)
        )
        return cls(backend, **tokens, extra_eos_token_ids=extra_eos, chat_template=template)

    def save_hf_dir(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json, tokenizer_config.json (special tokens, chat template) and
        generation_config.json (eos ids) into `path`, which `from_hf_dir` reads back as this tokenizer: a few
        MB that can travel where a whole checkpoint cannot (random-weight speed runs)."""
        os.makedirs(path, exist_ok=True)
        self.backend.save(os.path.join(path, "tokenizer.json"))
        config = dict(self.special_tokens)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=1)
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": sorted(self.eos_token_ids)}, f)

    def token_to_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token={token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. "<|im_start|>") become their ids, as in HF.

        add_special_tokens: add BOS/EOS where the checkpoint asks for them (SmolLM2 asks for neither).
        """
        check_text("text", text)
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (i32[N]); the bytes of an unfinished UTF-8 character decode to U+FFFD."""
        ids = [int(i) for i in ids]
        if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt string for a chat, rendered by the checkpoint's own template as HF renders it.

        messages: [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]
        """
        validate_messages(messages)
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (none in the GGUF or tokenizer_config.json)"
            )
        # HF passes tools and documents explicitly, so `{% if tools is not none %}` is false.
        try:
            return self._compiled_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError) as error:
            # The checkpoint's template failed on these messages (e.g. a field it expects is missing).
            name = type(error).__name__
            raise ValueError(f"chat template failed on these messages: {name}: {error}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; the template writes any BOS itself, so none is added (as in HF)."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False
        )

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        return _chat_template_environment().from_string(self.chat_template)


def validate_messages(messages) -> None:
    """Raises ValueError naming the message index and field unless `messages` is a list of {role, content}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{role, content}} dicts, got {messages!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {CHAT_ROLES}, got {role!r}")
        check_text(f"messages[{i}].content", message.get("content"))


def check_text(field: str, text) -> None:
    """Raises ValueError naming `field` unless `text` is a str that UTF-8 can encode (a lone surrogate such as
    "\\ud800", which JSON allows, cannot be, and the tokenizer would raise a TypeError on it)."""
    if not isinstance(text, str):
        raise ValueError(f"{field} must be a str, got {text!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{field} is not valid Unicode: lone surrogate {text[error.start]!r} at index {error.start}"
        ) from None


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text deltas, for streaming and stop strings.

    A delta is emitted only once its text is complete: while the newest tokens end inside a multi-byte UTF-8
    character (the decoded text ends in U+FFFD), they are held back. Each step decodes only the tokens since
    the last complete point, plus the tokens before it as context, so that decoders which treat the start of
    a text specially (e.g. dropping a leading-space marker) decode the new tokens as they would mid-sequence.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ):
        """prompt_ids: i32[N], the prompt; its last few tokens give the first generated token its context."""
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = [int(i) for i in prompt_ids[-4:]]
        self._prefix = 0  # self._ids[prefix:read] is the context already turned into text
        self._read = len(self._ids)
        self.text = ""  # all emitted text

    def add(self, token_ids: Sequence[int]) -> str:
        """Appends new token ids (i32[n]); returns the text that became complete (maybe "")."""
        self._ids.extend(int(i) for i in token_ids)
        context = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)
        full = self._tokenizer.decode(self._ids[self._prefix :], self._skip)
        if full.endswith("\ufffd") or len(full) <= len(context):
            return ""
        delta = full[len(context) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a request: the held-back remainder, an unfinished character as U+FFFD."""
        context = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)
        delta = self._tokenizer.decode(self._ids[self._prefix :], self._skip)[len(context) :]
        self._prefix = self._read = len(self._ids)
        self.text += delta
        return delta


def _set_post_processor(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> None:
    """Make `encode(..., add_special_tokens=True)` wrap a text in the given BOS/EOS (either may be None)."""
    single = " ".join(t for t in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if t)
    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t is not None]
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(token) -> str | None:
    # tokenizer_config.json spells a special token as a string or as an AddedToken dict.
    return token.get("content") if isinstance(token, dict) else token


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which HF templates use to mark assistant text: the body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    # A template rejecting the messages (e.g. roles out of order) is the caller's error.
    raise ValueError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; HF's keeps text as written.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _chat_template_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    # Templates come with checkpoints, so they run sandboxed, with the options and globals HF gives them.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env
