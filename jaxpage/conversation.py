"""A multi-turn chat whose every prompt extends the last prompt and reply token for token.

The prefix cache (and the tiers under it) reuse K/V by token ids. Re-rendering a conversation with its chat
template and re-tokenizing it can split the model's own earlier reply differently from how it was generated,
and every token after the first difference is then recomputed. So the conversation keeps the token ids it
has run (prompt and reply, as generated) and tokenizes only the text the template adds for the next turn.
Where the template rewrites history (its new rendering does not start with the old one), the whole
conversation is tokenized afresh, which is correct and reuses only what still matches.

A conversation that outgrows the context can drop its oldest turns (`drop_oldest_turns`): the system
message stays, the oldest user/assistant pairs go until the prompt and the reply's max_tokens fit. The kept
history then sits at new positions; by default it is recomputed, and with `shift_kv` its cached K/V is moved
there instead (jaxpage.kv_shift: approximate, and kept under a cache salt of the conversation's own).
"""

import dataclasses
import hashlib
from collections.abc import Iterator

from jaxpage.kv_shift import KVShift
from jaxpage.outputs import RequestOutput
from jaxpage.sampling_params import SamplingParams

Piece = tuple[str, list[int]]  # a run of the conversation's text and its token ids, as tokenized


@dataclasses.dataclass(frozen=True)
class Turn:
    """The request of one turn (`Conversation.next_turn`): run it with these tokens and options, then give
    it back with its output to `Conversation.add_reply`."""

    user_text: str
    prompt_token_ids: list[int]
    text: str  # what the chat template renders for the prompt
    num_dropped_turns: int  # oldest user/assistant pairs dropped to fit the context
    cache_salt: str | None
    kv_shift: KVShift | None
    messages: list[dict]  # the conversation's messages this turn's prompt renders (the user's included)
    pieces: list[Piece]  # the prompt's text and tokens, in the runs they were tokenized in

    @property
    def request_options(self) -> dict:
        """Keyword arguments of `LLMEngine.add_request` (and `LLM.generate`) for this turn."""
        return {"cache_salt": self.cache_salt, "kv_shift": self.kv_shift}


class Conversation:
    """Made by `LLM.conversation`; `send` a user message, get the reply (`RequestOutput`)."""

    def __init__(
        self, llm, system: str | None = None, *, drop_oldest_turns: bool = False, shift_kv: bool = False
    ):
        for name, value in (("drop_oldest_turns", drop_oldest_turns), ("shift_kv", shift_kv)):
            if not isinstance(value, bool):
                raise ValueError(f"conversation option {name} must be a bool, got {value!r}")
        if shift_kv and not drop_oldest_turns:
            raise ValueError(
                "conversation option shift_kv needs drop_oldest_turns (it moves the K/V they keep)"
            )
        if shift_kv and not llm.engine.config.enable_prefix_caching:
            raise ValueError("conversation option shift_kv needs engine config field enable_prefix_caching")
        self.llm = llm
        self.drop_oldest_turns = drop_oldest_turns
        self.shift_kv = shift_kv
        self.messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
        self._num_system = len(self.messages)
        # Every token run so far (prompts and replies as generated), in the pieces they were tokenized in.
        self._pieces: list[Piece] = []
        self.cache_salt: str | None = None  # after a shifted truncation: where this conversation's K/V lives

    @property
    def token_ids(self) -> list[int]:
        return _tokens(self._pieces)

    def next_turn(self, user_text: str, max_tokens: int = 0) -> Turn:
        """The request for `user_text`, with the oldest turns dropped (`drop_oldest_turns`) until it leaves
        `max_tokens` of the context for the reply."""
        messages = [*self.messages, {"role": "user", "content": user_text}]
        pieces = self._extend(self._pieces, messages)
        turn = Turn(user_text, _tokens(pieces), _text(pieces), 0, self.cache_salt, None, messages, pieces)
        max_model_len = self.llm.engine.max_model_len
        num_pairs = (len(self.messages) - self._num_system) // 2
        if not self.drop_oldest_turns or len(turn.prompt_token_ids) + max_tokens <= max_model_len:
            return turn
        for dropped in range(1, num_pairs + 1):
            turn = self._truncated(user_text, dropped)
            if len(turn.prompt_token_ids) + max_tokens <= max_model_len:
                break
        return turn

    def _truncated(self, user_text: str, dropped: int) -> Turn:
        """The turn for `user_text` with the oldest `dropped` user/assistant pairs left out. The history it
        keeps is cut out of the tokens run so far where the template's renderings place the turns, so its
        K/V can move; where that fails, the kept messages are tokenized afresh (and recomputed)."""
        system = self.messages[: self._num_system]
        messages = [
            *system,
            *self.messages[self._num_system + 2 * dropped :],
            {"role": "user", "content": user_text},
        ]
        render = self.llm.tokenizer.apply_chat_template
        keep_text = len(render(system, add_generation_prompt=False)) if system else 0
        cut_text = len(render(self.messages[: self._num_system + 2 * dropped], add_generation_prompt=False))
        head, _ = _split(self._pieces, keep_text, self.llm.tokenizer)
        _, tail = _split(self._pieces, cut_text, self.llm.tokenizer)
        shifted = head is not None and tail is not None
        pieces = self._extend(head + tail if shifted else [], messages)
        turn = Turn(user_text, _tokens(pieces), _text(pieces), dropped, None, None, messages, pieces)
        history = pieces[: len(head) + len(tail)] if shifted else []
        if not (self.shift_kv and shifted and history == head + tail and _tokens(tail)):
            return turn  # recomputed
        keep, drop = len(_tokens(head)), len(self.token_ids) - len(_tokens(head)) - len(_tokens(tail))
        shift = KVShift(tuple(self.token_ids), keep, drop, self.cache_salt)
        salt = hashlib.sha256(repr((self.cache_salt, keep, drop, self.token_ids)).encode()).hexdigest()
        return dataclasses.replace(turn, cache_salt="kv-shift:" + salt, kv_shift=shift)

    def _extend(self, history: list[Piece], messages: list[dict]) -> list[Piece]:
        """The prompt rendering `messages`: `history` and a piece of the text the template adds, if its
        rendering extends the history's text, else one piece tokenized afresh."""
        tokenizer = self.llm.tokenizer
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        history_text = _text(history)
        if history and text.startswith(history_text):
            added = text[len(history_text) :]
            return [*history, (added, tokenizer.encode(added, add_special_tokens=False))]
        return [(text, tokenizer.encode(text, add_special_tokens=False))]

    def send(self, user_text: str, sampling_params: SamplingParams | None = None) -> RequestOutput:
        """Generates the reply to `user_text` and adds both to the conversation."""
        params = sampling_params or SamplingParams()
        turn = self.next_turn(user_text, params.max_tokens)
        output = self.llm.generate(turn.prompt_token_ids, params, **turn.request_options)[0]
        self.add_reply(turn, output)
        return output

    def stream(
        self, user_text: str, sampling_params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Like `send`, yielding every step's output (with `new_text`); the reply joins the conversation when
        it finishes."""
        # Cumulative outputs (each has `new_text` too), so that the last holds the whole reply.
        params = dataclasses.replace(sampling_params or SamplingParams(), output_kind="cumulative")
        turn = self.next_turn(user_text, params.max_tokens)
        for output in self.llm.generate_stream(turn.prompt_token_ids, params, **turn.request_options):
            if output.finished:
                self.add_reply(turn, output)
            yield output

    def add_reply(self, turn: Turn, output: RequestOutput) -> None:
        """Adds a turn run outside `send` (a caller driving the engine itself): the `Turn` that `next_turn`
        gave, and its finished output. A reply that was aborted or failed is left out, and so is its user
        message."""
        reply = output.outputs[0]
        if reply.finish_reason not in ("stop", "length"):
            return
        self.messages = [*turn.messages, {"role": "assistant", "content": reply.text}]
        # The reply's special tokens (its end-of-turn token) are part of what the template renders next.
        reply_text = self.llm.tokenizer.decode(reply.token_ids, skip_special_tokens=False)
        self._pieces = [*turn.pieces, (reply_text, list(reply.token_ids))]
        self.cache_salt = turn.cache_salt


def _text(pieces: list[Piece]) -> str:
    return "".join(text for text, _ in pieces)


def _tokens(pieces: list[Piece]) -> list[int]:
    return [token for _, tokens in pieces for token in tokens]


def _split(pieces: list[Piece], at: int, tokenizer) -> tuple[list[Piece] | None, list[Piece] | None]:
    """The pieces before and after character `at` of their text. A piece cut in the middle is split where
    its tokens split too (its two halves tokenize to its tokens); (None, None) if they do not."""
    head, offset = [], 0
    for index, (text, tokens) in enumerate(pieces):
        if offset + len(text) <= at:
            head.append((text, tokens))
            offset += len(text)
            continue
        if offset == at:
            return head, pieces[index:]
        left, right = text[: at - offset], text[at - offset :]
        left_tokens = tokenizer.encode(left, add_special_tokens=False)
        right_tokens = tokenizer.encode(right, add_special_tokens=False)
        if left_tokens + right_tokens != tokens:
            return None, None
        return [*head, (left, left_tokens)], [(right, right_tokens), *pieces[index + 1 :]]
    return head, []
