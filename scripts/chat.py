"""An interactive chat in the terminal that keeps the conversation's K/V between turns.

Each turn's prompt extends the last prompt and reply token for token (`jaxpage.Conversation`), so its history
comes from the prefix cache, or from the host and disk tiers under it when the pool evicted it. After every
reply one line shows the time to first token, the prompt tokens computed, and where the history came from.
An empty line or end of input ends the chat; /reset starts a new conversation.

  python scripts/chat.py --kv_host_cache_gib 1 --kv_disk_cache_dir /path/to/dir
"""

import sys
from pathlib import Path

from absl import app, flags

from jaxpage import LLM, SamplingParams

DEFAULT_GIN_FILE = str(Path(__file__).resolve().parent.parent / "configs" / "smollm2_135m.gin")

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_multi_string("gin_file", None, f"Gin files, applied in order; default {DEFAULT_GIN_FILE}.")
    flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied after the files.")
    flags.DEFINE_string("system", None, "A system message opening the conversation.")
    flags.DEFINE_integer("max_tokens", 256, "The most tokens of one reply.")
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).")
    flags.DEFINE_float("kv_host_cache_gib", None, "Host tier under the prefix cache, GiB (default: none).")
    flags.DEFINE_string("kv_disk_cache_dir", None, "Disk tier directory under the host tier (default: none).")


def turn_line(output) -> str:
    """The line shown after a reply: TTFT, tokens computed, and the history's source."""
    m = output.metrics
    host, disk = m.tier_hit_tokens["host"], m.tier_hit_tokens["disk"]
    device = m.num_cached_tokens - host - disk
    ttft = f"{m.ttft * 1e3:.0f} ms" if m.ttft is not None else "-"
    computed = m.num_prompt_tokens - m.num_cached_tokens
    return (
        f"[TTFT {ttft}; prompt {m.num_prompt_tokens} tokens, computed {computed}; "
        f"reused from device {device}, host {host}, disk {disk}]"
    )


def chat(llm: LLM, lines, write, params: SamplingParams, system: str | None) -> None:
    """Reads user messages from `lines` and writes the replies (streamed) and turn lines with `write`."""
    conversation = llm.conversation(system)
    write("> ")
    for line in lines:
        text = line.rstrip("\n")
        if not text.strip():
            return
        if text.strip() == "/reset":
            conversation = llm.conversation(system)
            write("(new conversation)\n> ")
            continue
        final = None
        for output in conversation.stream(text, params):
            write(output.outputs[0].new_text)
            final = output
        write("\n" + turn_line(final) + "\n> ")


def main(argv):
    del argv
    bindings = list(FLAGS.gin_bindings)
    if FLAGS.kv_host_cache_gib is not None:
        bindings.append(f"EngineConfig.kv_host_cache_gib = {FLAGS.kv_host_cache_gib!r}")
    if FLAGS.kv_disk_cache_dir is not None:
        bindings.append(f"EngineConfig.kv_disk_cache_dir = {FLAGS.kv_disk_cache_dir!r}")
    try:
        llm = LLM.from_gin(FLAGS.gin_file or [DEFAULT_GIN_FILE], bindings)
    except ValueError as error:
        sys.exit(f"error: {error}")
    params = SamplingParams(max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat(llm, sys.stdin, write, params, FLAGS.system)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
