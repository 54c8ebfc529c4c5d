"""A plain reference beam search that recomputes every hypothesis from scratch, and a next-token scorer for
it that runs the model's forward on one sequence alone.

`reference_beam_search` follows HF transformers' `_beam_search` (5.x) step by step, with its fixed number of
beams (the first round's extra beams are copies scored -1e9) and its full-vocabulary ranking, written
independently of `jaxpage.beam_search`. The two agree whenever the vocabulary has at least 2 * width tokens
and at most one stop token exists; that module's docstring names the differences outside that.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models.attention import AttentionMetadata
from models.config import ModelConfig
from models.llama import forward, init_kv_pool

NEG = -1e9  # HF's score for "not a hypothesis"


def reference_beam_search(
    logprobs_of: Callable[[list[int]], np.ndarray],  # tokens -> f64[V], log-softmax of the next token
    prompt: list[int],
    *,
    width: int,
    max_tokens: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    stop_token_ids: frozenset[int] = frozenset(),
    n: int = 1,
) -> list[tuple[tuple[int, ...], float]]:
    """The n best finished hypotheses as (generated tokens, score), best first."""
    num_candidates = 2 * width
    running = [tuple(prompt)] * width
    running_scores = np.full(width, NEG)
    running_scores[0] = 0.0
    finished = [()] * width
    finished_scores = np.full(width, NEG)
    is_finished = np.zeros(width, bool)
    improvement_possible = True
    length = 0  # generated tokens of the running beams
    while True:
        scores = np.stack([logprobs_of(list(seq)) for seq in running]) + running_scores[:, None]  # [W, V]
        vocab = scores.shape[1]
        flat = scores.reshape(-1)
        top = np.argsort(-flat, kind="stable")[:num_candidates]
        top_scores = flat[top]
        seqs = [running[i // vocab] + (int(i % vocab),) for i in top]
        hits = np.array([s[-1] in stop_token_ids or length + 1 >= max_tokens for s in seqs])

        # The best beams that did not stop go on.
        going_on = top_scores + NEG * hits
        order = np.argsort(-going_on, kind="stable")[:width]
        running, running_scores = [seqs[i] for i in order], going_on[order]

        # Stopped candidates among the first `width` ranks compete with the finished ones.
        new_scores = top_scores / (length + 1) ** length_penalty
        new_scores = new_scores + NEG * ~(hits & (np.arange(num_candidates) < width))
        if is_finished.all() and early_stopping is True or not improvement_possible:
            new_scores = new_scores + NEG
        merged_scores = np.concatenate([finished_scores, new_scores])
        keep = np.argsort(-merged_scores, kind="stable")[:width]
        merged = finished + seqs
        merged_finished = np.concatenate([is_finished, hits & (np.arange(num_candidates) < width)])
        finished = [merged[i] for i in keep]
        finished_scores, is_finished = merged_scores[keep], merged_finished[keep]

        length += 1
        if early_stopping == "never" and length_penalty > 0:
            best_length = max_tokens
        else:
            best_length = length
        best_possible = running_scores[0] / best_length**length_penalty
        worst_finished = np.where(is_finished, finished_scores.min(), NEG)
        improvement_possible = improvement_possible and bool(np.any(best_possible > worst_finished))
        open_beam = not (is_finished.all() and early_stopping is True)
        if not (improvement_possible and open_beam and not hits.all()):
            break
    assert is_finished[:n].all(), "fewer finished hypotheses than n"
    return [(finished[i][len(prompt) :], float(finished_scores[i])) for i in range(n)]


def model_logprobs(params: dict, cfg: ModelConfig, max_len: int) -> Callable[[list[int]], np.ndarray]:
    """A `logprobs_of` for `reference_beam_search`: the model's next-token log-probabilities after a sequence
    of at most `max_len` tokens, from the model's forward over that sequence alone, in a fresh pool of its
    own (nothing cached, shared or reused between calls)."""
    page_size = 8
    num_pages = -(-max_len // page_size)
    pages = np.arange(1, num_pages + 1, dtype=np.int32)

    @jax.jit
    def last_logprobs(token_ids, length):  # i32[max_len] padded with 0, i32[] -> f32[V]
        pool = init_kv_pool(cfg, num_pages + 1, page_size)
        pos = jnp.arange(max_len, dtype=jnp.int32)
        real = pos < length
        slots = jnp.where(real, jnp.asarray(pages)[pos // page_size] * page_size + pos % page_size, 0)
        metadata = AttentionMetadata(
            slots,
            jnp.stack([0, length]).astype(jnp.int32),
            length[None].astype(jnp.int32),
            jnp.asarray(pages)[None],
        )
        logits, _ = forward(params, cfg, token_ids, jnp.where(real, pos, 0), pool, metadata, length[None] - 1)
        return jax.nn.log_softmax(logits[0].astype(jnp.float32))

    @functools.cache
    def cached(tokens: tuple[int, ...]) -> np.ndarray:
        assert 0 < len(tokens) <= max_len, len(tokens)
        padded = np.zeros(max_len, np.int32)
        padded[: len(tokens)] = tokens
        return np.asarray(last_logprobs(padded, np.int32(len(tokens))), np.float64)

    return lambda tokens: cached(tuple(tokens))
