"""A multi-turn chat whose every prompt extends the last prompt and reply token for token.

The prefix cache (and the tiers under it) reuse K/V by token ids. Re-rendering a conversation with its chat
template and re-tokenizing it can split the model's own earlier reply differently from how it was generated,
and every token after the first difference is then recomputed. So the conversation keeps the token ids it
has run (prompt and reply, as generated) and tokenizes only the text the template adds for the next turn.
Where the template rewrites history (its new rendering does not start with the old one), the whole
conversation is tokenized afresh, which is correct and reuses only what still matches.
"""

import dataclasses
from collections.abc import Iterator

from jaxpage.outputs import RequestOutput
from jaxpage.sampling_params import SamplingParams


class Conversation:
    """Made by `LLM.conversation`; `send` a user message, get the reply (`RequestOutput`)."""

    def __init__(self, llm, system: str | None = None):
        self.llm = llm
        self.messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
        self.token_ids: list[int] = []  # every token run so far: prompts and replies as generated
        self._text = ""  # what the chat template renders for those tokens

    def prompt_token_ids(self, user_text: str) -> tuple[list[int], str]:
        """The next turn's prompt for `user_text`, and the text it renders."""
        tokenizer = self.llm.tokenizer
        messages = [*self.messages, {"role": "user", "content": user_text}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if self.token_ids and text.startswith(self._text):
            added = tokenizer.encode(text[len(self._text) :], add_special_tokens=False)
            return self.token_ids + added, text
        return tokenizer.encode(text, add_special_tokens=False), text

    def send(self, user_text: str, sampling_params: SamplingParams | None = None) -> RequestOutput:
        """Generates the reply to `user_text` and adds both to the conversation."""
        prompt, text = self.prompt_token_ids(user_text)
        output = self.llm.generate(prompt, sampling_params)[0]
        self.add_reply(user_text, prompt, text, output)
        return output

    def stream(
        self, user_text: str, sampling_params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Like `send`, yielding every step's output (with `new_text`); the reply joins the conversation when
        it finishes."""
        prompt, text = self.prompt_token_ids(user_text)
        # Cumulative outputs (each has `new_text` too), so that the last holds the whole reply.
        params = dataclasses.replace(sampling_params or SamplingParams(), output_kind="cumulative")
        for output in self.llm.generate_stream(prompt, params):
            if output.finished:
                self.add_reply(user_text, prompt, text, output)
            yield output

    def add_reply(self, user_text: str, prompt: list[int], text: str, output: RequestOutput) -> None:
        """Adds a turn run outside `send` (a caller driving the engine itself): the user text, the prompt and
        text `prompt_token_ids` gave for it, and the finished output. A reply that was aborted or failed is
        left out, and so is its user message."""
        reply = output.outputs[0]
        if reply.finish_reason not in ("stop", "length"):
            return
        self.messages.append({"role": "user", "content": user_text})
        self.messages.append({"role": "assistant", "content": reply.text})
        self.token_ids = prompt + list(reply.token_ids)
        # The reply's special tokens (its end-of-turn token) are part of what the template renders next.
        self._text = text + self.llm.tokenizer.decode(reply.token_ids, skip_special_tokens=False)
