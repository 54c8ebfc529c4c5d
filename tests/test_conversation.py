"""Conversations: each turn's prompt extends the last prompt and reply token for token, so the history's K/V
is reused, and the replies are those of the same prompts run without any reuse."""

import importlib.util
import re
from pathlib import Path

from jaxpage import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0)
QUESTIONS = ["What is a page?", "And a page table?", "Why share pages?"]


def test_turns_extend_the_history_and_reuse_its_pages():
    llm = LLM.from_gin(["configs/tiny_test.gin"])
    chat = llm.conversation(system="Be brief.")
    previous, outputs = [], []
    for question in QUESTIONS:
        out = chat.send(question, GREEDY)
        assert out.prompt_token_ids[: len(previous)] == previous  # the history, token for token
        # Every full page of the history's computed tokens (all but the reply's last) is reused.
        if previous:
            assert out.metrics.num_cached_tokens == (len(previous) - 1) // 8 * 8
        previous = out.prompt_token_ids + out.outputs[0].token_ids
        outputs.append(out)
    assert [m["role"] for m in chat.messages] == ["system"] + ["user", "assistant"] * 3
    assert chat.messages[-1]["content"] == outputs[-1].outputs[0].text
    # The same prompts, run with nothing to reuse, give the same replies.
    fresh = LLM.from_gin(["configs/tiny_test.gin"], ["EngineConfig.enable_prefix_caching = False"])
    replies = [o.outputs[0].token_ids for o in fresh.generate([o.prompt_token_ids for o in outputs], GREEDY)]
    assert replies == [o.outputs[0].token_ids for o in outputs]


def test_a_template_that_rewrites_history_is_tokenized_afresh():
    llm = LLM.from_gin(["configs/tiny_test.gin"])
    chat = llm.conversation()
    chat.send("Hello", SamplingParams(max_tokens=4, temperature=0))
    chat._pieces = [("something the template no longer renders", [1, 2, 3])]
    turn = chat.next_turn("Again")
    assert turn.prompt_token_ids == llm.tokenizer.encode(turn.text, add_special_tokens=False)


def test_a_streamed_turn_joins_the_conversation_when_it_finishes():
    llm = LLM.from_gin(["configs/tiny_test.gin"])
    chat = llm.conversation()
    # Asked for deltas, the stream still keeps the whole reply (each output's new_text is the delta).
    outputs = list(chat.stream("Hello", SamplingParams(max_tokens=5, temperature=0, output_kind="delta")))
    assert outputs[-1].finished and len(chat.messages) == 2
    assert chat.messages[1]["content"] == "".join(o.outputs[0].new_text for o in outputs)
    assert chat.token_ids == outputs[-1].prompt_token_ids + outputs[-1].outputs[0].token_ids


def load_chat_script():
    # Loaded without running its main, so no absl flags are defined in this process.
    path = Path(__file__).resolve().parent.parent / "scripts" / "chat.py"
    spec = importlib.util.spec_from_file_location("chat_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_chat_script_streams_replies_and_shows_where_the_history_came_from():
    chat_script = load_chat_script()
    llm = LLM.from_gin(["configs/tiny_test.gin"])
    written = []
    lines = ["Hello there\n", "/reset\n", "Hello there\n", "Tell me more\n", "\n", "never read\n"]
    chat_script.chat(llm, iter(lines), written.append, SamplingParams(max_tokens=6, temperature=0), None)
    text = "".join(written)
    turns = re.findall(r"\[TTFT \d+ ms; prompt (\d+) tokens, computed (\d+); reused from device (\d+)", text)
    assert len(turns) == 3 and "(new conversation)" in text
    (p1, c1, d1), (p2, c2, d2), (p3, c3, d3) = [tuple(map(int, t)) for t in turns]
    assert c1 == p1 and d1 == 0  # nothing to reuse yet
    assert p2 == p1 and d2 == (p1 - 1) // 8 * 8  # the same first prompt: its full pages from the cache
    assert p3 > p2 and d3 > 0 and c3 < p3 - p2 + 8  # the third turn computes little more than what it adds
