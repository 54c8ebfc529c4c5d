"""End-to-end agreement of the Pallas kernels with the reference attention inside the model, on one device.

Random-weight Llama-family models generate greedily through `models.llama.forward` twice, with
attention="pallas" and with attention="reference": same parameters, same schedule, pages in random order,
every unwritten slot of the pool NaN. Prompts of mixed lengths are prefilled in chunks under a per-step token
budget while the shorter ones already decode, so steps mix prefill chunks and decode tokens; every step is
padded to the budget, so each backend compiles once per dtype. While a request's two token streams agree,
their logits are compared (same inputs); where they part, the reference's top-1 / top-2 logit gap at that
token says whether it was a near-tie (a gap under the logit tolerance). The bf16 tolerance is measured: a
third run, the reference on the same weights in float32, gives bf16's own error on the prompt rows, and two
bf16 paths each that close to the exact logits may differ by twice it. Exits 1 on a logit difference over
the tolerance or a divergence that was no near-tie.

  python scripts/check_model_gpu.py --output_dir benchmarks/results
  python scripts/check_model_gpu.py --attention pallas_interpret --configs tiny --new_tokens 4 \\
      --prompt_lens 5,40,20 --token_budget 32   # CPU, interpreted
"""

import dataclasses
import datetime
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from model_shapes import CONFIGS

from models.attention import AttentionMetadata
from models.llama import forward, init_params

flags.DEFINE_string("output_dir", "benchmarks/results", "Where the JSON result is written.")
flags.DEFINE_string("attention", "pallas", "The backend checked against 'reference'.")
flags.DEFINE_list("configs", ["llama_gqa4_d128", "smollm2_shape"], "Model shapes (see CONFIGS).")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Model dtypes.")
flags.DEFINE_list("prompt_lens", ["7", "130", "700", "1500"], "Prompt length of each request.")
flags.DEFINE_integer("token_budget", 512, "Tokens per step: decodes first, then prompt chunks in the rest.")
flags.DEFINE_integer("new_tokens", 32, "Greedy tokens generated per request.")
flags.DEFINE_integer("page_size", 16, "Tokens per page.")
FLAGS = flags.FLAGS

LOGIT_ATOL_F32 = 2e-3


def generate(runs: dict, prompt_lens, budget, new_tokens, page_size, seed=0):
    """Runs {name: (cfg, params, attention)} in lockstep on one schedule; yields, per sampled row,
    (request, generated-token index, {name: logits f32[vocab]}). Each run follows its own greedy tokens."""
    rng = np.random.default_rng(seed)
    cfg0 = next(iter(runs.values()))[0]
    batch = len(prompt_lens)
    pages = [-(-(p + new_tokens) // page_size) for p in prompt_lens]
    num_pages = 2 + sum(pages)
    order = rng.permutation(np.arange(1, num_pages))
    page_table = np.zeros((batch, max(pages)), np.int32)
    for b, start in enumerate(np.cumsum([0, *pages[:-1]])):
        page_table[b, : pages[b]] = order[start : start + pages[b]]
    shape = (cfg0.num_kv_heads, num_pages, page_size, cfg0.head_dim)
    steps, pools = {}, {}
    for name, (cfg, _, attention) in runs.items():
        steps[name] = jax.jit(
            functools.partial(forward, cfg=cfg, attention=attention), donate_argnames="kv_pool"
        )
        nan = lambda: jnp.full(shape, jnp.nan, cfg.jnp_dtype)  # noqa: B023 (called at once)
        pools[name] = tuple((nan(), nan()) for _ in range(cfg.num_layers))  # one buffer each: all donated
    prompts = [list(rng.integers(1, cfg0.vocab_size, p)) for p in prompt_lens]
    tokens = {name: [list(p) for p in prompts] for name in runs}
    lengths = lambda: [len(t) for t in next(iter(tokens.values()))]  # the same for every run
    computed = [0] * batch
    while any(n - p < new_tokens for n, p in zip(lengths(), prompt_lens, strict=True)):
        n, left = [0] * batch, budget
        # Decoding requests first (one token each), then prompts in order, chunked to what the step has left.
        for b in sorted(range(batch), key=lambda b: computed[b] < prompt_lens[b]):
            if lengths()[b] - prompt_lens[b] < new_tokens:
                n[b] = min(left, lengths()[b] - computed[b])
                left -= n[b]
        cu = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
        positions, slots = np.zeros(budget, np.int32), np.zeros(budget, np.int32)
        for b in range(batch):
            pos = np.arange(computed[b], computed[b] + n[b])
            positions[cu[b] : cu[b + 1]] = pos
            slots[cu[b] : cu[b + 1]] = page_table[b, pos // page_size] * page_size + pos % page_size
        kv_lens = np.array([c + k if k else 0 for c, k in zip(computed, n, strict=True)], np.int32)
        table = page_table * (kv_lens > 0)[:, None]
        metadata = AttentionMetadata(*map(jnp.asarray, (slots, cu, kv_lens, table)))
        logits_idx = jnp.asarray(np.maximum(cu[1:] - 1, 0), jnp.int32)
        logits = {}
        for name, (_, params, _) in runs.items():
            ids = np.zeros(budget, np.int32)
            for b in range(batch):
                ids[cu[b] : cu[b + 1]] = tokens[name][b][computed[b] : computed[b] + n[b]]
            out, pools[name] = steps[name](
                params, token_ids=jnp.asarray(ids), positions=jnp.asarray(positions), kv_pool=pools[name],
                metadata=metadata, logits_indices=logits_idx,
            )  # fmt: skip
            logits[name] = np.asarray(out, np.float32)
        for b in range(batch):
            computed[b] += n[b]
            if n[b] and computed[b] == lengths()[b]:  # the row reached its last known token
                yield b, lengths()[b] - prompt_lens[b], {name: x[b] for name, x in logits.items()}
                for name in runs:
                    tokens[name][b].append(int(logits[name][b].argmax()))


def check(cfg_name: str, dtype: str, opts) -> dict:
    """Pallas vs reference at `dtype`. For bf16 the tolerance is measured, not assumed: the reference's own
    bf16 error against the same model in float32 on the prompt rows (identical inputs for every run), and
    two bf16 paths each that close to the exact logits may differ by twice it."""
    cfg = dataclasses.replace(CONFIGS[cfg_name], dtype=dtype)
    params = init_params(cfg, jax.random.key(0))
    runs = {"reference": (cfg, params, "reference"), "kernel": (cfg, params, opts["attention"])}
    if dtype != "float32":
        exact = (
            dataclasses.replace(cfg, dtype="float32"),
            jax.tree.map(lambda x: x.astype(jnp.float32), params),
        )
        runs["exact"] = (*exact, "reference")
    diverged: dict[int, dict] = {}
    max_err, sq_err, sq_ref, compared, equal, noise, kernel_vs_exact = 0.0, 0.0, 0.0, 0, 0, 0.0, 0.0
    maxabs = lambda d: float(np.nan_to_num(np.abs(d), nan=np.inf).max())
    rows = list(
        generate(runs, *(opts[k] for k in ("prompt_lens", "token_budget", "new_tokens", "page_size")))
    )
    for _, index, x in rows:
        if "exact" in x and index == 0:
            noise = max(noise, maxabs(x["reference"] - x["exact"]))
            kernel_vs_exact = max(kernel_vs_exact, maxabs(x["kernel"] - x["exact"]))
    atol = LOGIT_ATOL_F32 if dtype == "float32" else 2 * noise
    for b, index, x in rows:
        ref, other = x["reference"], x["kernel"]
        if b in diverged:
            continue  # the inputs differ from here on: nothing to compare
        max_err = max(max_err, maxabs(other - ref))
        sq_err, sq_ref, compared = (
            sq_err + float(((other - ref) ** 2).sum()),
            sq_ref + float((ref**2).sum()),
            compared + 1,
        )
        if ref.argmax() != other.argmax():
            top2 = np.sort(ref)[-2:]
            gap = float(top2[1] - top2[0])
            diverged[b] = dict(request=b, token_index=index, ref_top2_gap=gap, near_tie=gap < atol)
        else:
            equal += 1
    ok = max_err <= atol and all(d["near_tie"] for d in diverged.values())
    return dict(
        config=cfg_name, dtype=dtype, ok=ok, max_abs_logit_err=max_err, logit_atol=atol,
        bf16_noise_ref_vs_f32=noise or None, kernel_vs_f32=kernel_vs_exact or None,
        rel_l2_logit_err=(sq_err / sq_ref) ** 0.5 if sq_ref else None, rows_compared=compared,
        greedy_equal=equal, divergences=list(diverged.values()),
    )  # fmt: skip


def main(argv):
    del argv
    opts = dict(
        attention=FLAGS.attention, prompt_lens=[int(p) for p in FLAGS.prompt_lens],
        token_budget=FLAGS.token_budget, new_tokens=FLAGS.new_tokens, page_size=FLAGS.page_size,
    )  # fmt: skip
    for name in FLAGS.configs:
        if name not in CONFIGS:
            raise ValueError(f"configs must be among {sorted(CONFIGS)}, got {name!r}")
    device = jax.devices()[0]
    print(f"device: {device.device_kind}, jax {jax.__version__}")
    now = datetime.datetime.now(datetime.UTC)
    out = Path(FLAGS.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device.device_kind).strip("-").lower()
    path = out / f"kernels_model_check_{slug}_{now:%Y%m%d-%H%M%S}.json"
    command = " ".join(["python scripts/check_model_gpu.py", *sys.argv[1:]])
    metadata = dict(device=device.device_kind, date=now.isoformat(timespec="seconds"), jax=jax.__version__,
                    command=command, **opts)  # fmt: skip
    results = []
    for name in FLAGS.configs:
        for dtype in FLAGS.dtypes:
            with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
                results.append(check(name, dtype, opts))
            r = results[-1]
            print(
                f"{'ok  ' if r['ok'] else 'FAIL'} {name} {dtype}: max|dlogit|={r['max_abs_logit_err']:.3g} "
                f"(tol {r['logit_atol']:.3g}; bf16 vs f32 {r['bf16_noise_ref_vs_f32']}, kernel vs f32 "
                f"{r['kernel_vs_f32']}), rel l2 {r['rel_l2_logit_err']:.3g}, greedy equal "
                f"{r['greedy_equal']}/{r['rows_compared']}, divergences {r['divergences']}",
                flush=True,
            )
            # Rewritten after every model, so a run cut short keeps what it checked.
            path.write_text(json.dumps(dict(metadata=metadata, results=results), indent=1))
    print(f"wrote {path}")
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    app.run(main)
