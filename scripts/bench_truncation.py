"""What moving a truncated conversation's K/V costs in quality, and what it saves in time to first token.

ShareGPT conversations are replayed turn by turn through `Conversation` with `drop_oldest_turns` under a
small max_model_len (--gin_bindings), so their oldest turns are dropped. Each turn that drops some runs twice
on the same prompt tokens, greedy: once with the kept history's K/V moved to its new positions (`shift_kv`,
AttentionStore's positional decoupling) and once computed exactly (the reference: no salt, so only the
exact system prompt's pages are reused). The conversation goes on with the shifted reply, as it would with
`shift_kv` on. Per truncated turn it records whether the two replies agree, the share of the longer reply
before they first differ, and both TTFTs; it prints the means and writes the JSON to --output_dir.

  python scripts/bench_truncation.py --num_conversations 8 \\
      --gin_bindings 'EngineConfig.max_model_len = 1024'
"""

import datetime
import json
import shlex
import sys
from pathlib import Path

import jax
import numpy as np
import sharegpt
from absl import app, flags

from jaxpage import SamplingParams, gin_config
from jaxpage.llm import LLM

ROOT = Path(__file__).resolve().parent.parent

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", None, "Gin config file(s); default configs/smollm2_135m.gin.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied after the files (set max_model_len).")
flags.DEFINE_integer(
    "num_conversations", 8, "ShareGPT conversations replayed (those that outgrow the context)."
)
flags.DEFINE_integer("max_turns", 12, "The most turns replayed of a conversation.")
flags.DEFINE_integer("output_tokens", 128, "The most tokens of a reply (else the recorded reply's length).")
flags.DEFINE_string(
    "system", "You are a helpful assistant.", "The system message that every truncation keeps."
)
flags.DEFINE_integer("seed", 0, "Seed of the conversation choice.")
flags.DEFINE_string("output_dir", str(ROOT / "benchmarks" / "results"), "Where the JSON goes.")


def agreement(a: list[int], b: list[int]) -> float:
    """The share of the longer reply before the two first differ (1.0: identical)."""
    longest = max(len(a), len(b))
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return same / longest if longest else 1.0


def chosen_conversations(llm: LLM) -> list[list[tuple[str, int]]]:
    """Conversations (user text, reply length) long enough to outgrow max_model_len, in a seeded order."""
    everything = list(sharegpt.conversations())
    limit = llm.engine.max_model_len
    chosen = []
    for index in np.random.default_rng(FLAGS.seed).permutation(len(everything)):
        pairs = everything[index][: FLAGS.max_turns]
        turns = [(q, min(len(llm.tokenizer.encode(a)), FLAGS.output_tokens)) for q, a in pairs]
        lengths = [len(llm.tokenizer.encode(q)) + n for q, n in turns]
        # Long enough to drop turns, and each turn alone fits with room for history.
        if len(turns) >= 3 and sum(lengths) > 1.2 * limit and max(lengths) < limit / 3:
            chosen.append(turns)
        if len(chosen) == FLAGS.num_conversations:
            return chosen
    raise ValueError(f"only {len(chosen)} ShareGPT conversations outgrow max_model_len {limit}")


def replay(llm: LLM, turns: list[tuple[str, int]]) -> list[dict]:
    chat = llm.conversation(FLAGS.system, drop_oldest_turns=True, shift_kv=True)
    records = []
    for index, (text, reply_len) in enumerate(turns):
        params = SamplingParams(max_tokens=reply_len, temperature=0)
        turn = chat.next_turn(text, reply_len)
        if len(turn.prompt_token_ids) + reply_len > llm.engine.max_model_len:
            break  # even with every earlier turn dropped it does not fit
        shifted = llm.generate(turn.prompt_token_ids, params, **turn.request_options)[0]
        if turn.kv_shift is not None:
            exact = llm.generate(turn.prompt_token_ids, params)[0]
            a, b = list(shifted.outputs[0].token_ids), list(exact.outputs[0].token_ids)
            records.append({
                "turn": index + 1, "prompt_tokens": len(turn.prompt_token_ids),
                "dropped_turns": turn.num_dropped_turns, "shifted_tokens": shifted.metrics.num_shifted_tokens,
                "identical": a == b, "agreement": agreement(a, b),
                "ttft_shifted": shifted.metrics.ttft, "ttft_exact": exact.metrics.ttft,
                "exact_cached_tokens": exact.metrics.num_cached_tokens,
            })  # fmt: skip
        chat.add_reply(turn, shifted)
    return records


def main(argv):
    del argv
    gin_files = FLAGS.gin_file or [str(ROOT / "configs" / "smollm2_135m.gin")]
    llm = LLM.from_gin(gin_files, FLAGS.gin_bindings)
    llm.engine.warmup()
    records = []
    for number, turns in enumerate(chosen_conversations(llm)):
        for record in replay(llm, turns):
            records.append({"conversation": number, **record})
            print(json.dumps(records[-1]), flush=True)
    if not records:
        raise ValueError("no turn was truncated: lower max_model_len")
    summary = {
        "truncated_turns": len(records),
        "identical_replies": float(np.mean([r["identical"] for r in records])),
        "mean_agreement": float(np.mean([r["agreement"] for r in records])),
        "mean_shifted_tokens": float(np.mean([r["shifted_tokens"] for r in records])),
        "mean_ttft_shifted": float(np.mean([r["ttft_shifted"] for r in records])),
        "mean_ttft_exact": float(np.mean([r["ttft_exact"] for r in records])),
    }
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "gin_config": gin_config.operative_config(),
        "summary": summary,
        "turns": records,
    }
    out_dir = Path(FLAGS.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"truncation_{record['backend']}_{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    s = summary
    print(
        f"{s['truncated_turns']} truncated turns: replies identical {s['identical_replies']:.1%}, "
        f"mean agreement before the first difference {s['mean_agreement']:.1%}; "
        f"{s['mean_shifted_tokens']:.0f} tokens moved per turn; mean TTFT "
        f"{s['mean_ttft_shifted'] * 1e3:.0f} ms shifted vs {s['mean_ttft_exact'] * 1e3:.0f} ms exact"
    )
    print(f"written to {path}")


if __name__ == "__main__":
    app.run(main)
