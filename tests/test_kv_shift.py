"""A conversation truncated in the middle keeps its history's K/V: moved tokens' K is re-rotated to the new
positions exactly, the moved pages live under a cache salt of their own, and bad shifts are refused."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage import LLM, SamplingParams, page_copy
from jaxpage.kv_shift import KVShift, token_moves
from jaxpage.page_pool import page_hashes
from models.layers import apply_rope

HEADS, PAGE, DIM, LAYERS = 2, 4, 8, 2
INV_FREQ = 1.0 / (10000.0 ** (np.arange(0, DIM, 2) / DIM))


def test_moved_k_equals_k_rotated_at_the_new_positions_from_the_same_pre_rope_k():
    rng = np.random.default_rng(0)
    shift = KVShift(tuple(range(20)), keep=3, drop=6)  # 20 source tokens: 0..2 stay, 9..19 move to 3..13
    pre_k = rng.standard_normal((20, HEADS, DIM)).astype(np.float32)  # K before RoPE, per source token
    values = rng.standard_normal((20, HEADS, DIM)).astype(np.float32)
    src_pages, dst_pages = [1, 2, 3, 4, 5], [6, 7, 8, 9]
    rope_k = np.asarray(apply_rope(jnp.asarray(pre_k), jnp.arange(20), INV_FREQ))

    def pool_of(per_token, pages):  # [HEADS, num_pages, PAGE, DIM] with the tokens in `pages`
        layer = np.zeros((HEADS, 12, PAGE, DIM), np.float32)
        for t, row in enumerate(per_token):
            layer[:, pages[t // PAGE], t % PAGE] = row
        return layer

    pool = tuple((jnp.asarray(pool_of(rope_k * (i + 1), src_pages)), jnp.asarray(pool_of(values, src_pages)))
                 for i in range(LAYERS))  # fmt: skip
    moves = token_moves(shift, 0, 12, dst_pages, src_pages, PAGE)  # the new positions 0..11: three pages
    pool = page_copy.shift_tokens(pool, moves, INV_FREQ)
    new_positions = np.arange(12)
    source = shift.source_position(new_positions)
    expected_k = np.asarray(apply_rope(jnp.asarray(pre_k[source]), jnp.asarray(new_positions), INV_FREQ))
    for i, (k, v) in enumerate(pool):
        k, v = np.asarray(k), np.asarray(v)
        got_k = np.stack([k[:, dst_pages[p // PAGE], p % PAGE] for p in new_positions])
        got_v = np.stack([v[:, dst_pages[p // PAGE], p % PAGE] for p in new_positions])
        np.testing.assert_allclose(got_k, expected_k * (i + 1), rtol=0, atol=2e-5)
        np.testing.assert_array_equal(got_v, values[source])
        np.testing.assert_array_equal(k[:, src_pages], pool_of(rope_k * (i + 1), src_pages)[:, src_pages])
        assert not k[:, dst_pages[3]].any()  # nothing past the moves


def send(llm, chat, text, params):
    turn = chat.next_turn(text, params.max_tokens)
    out = llm.generate(turn.prompt_token_ids, params, **turn.request_options)[0]
    chat.add_reply(turn, out)
    return turn, out


PARAMS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
QUESTIONS = [f"Question number {i}: tell me about pages, page tables and caches." for i in range(8)]


def converse_until_truncated(llm, shift_kv: bool):
    chat = llm.conversation(system="Be brief.", drop_oldest_turns=True, shift_kv=shift_kv)
    history = []
    for question in QUESTIONS:
        source = list(chat.token_ids)
        turn, out = send(llm, chat, question, PARAMS)
        history.append((turn, out, source))
        if turn.num_dropped_turns:
            return chat, history
    raise AssertionError("the conversation never outgrew max_model_len")


@pytest.fixture(scope="module")
def shifted():
    llm = LLM.from_gin(["configs/tiny_test.gin"], ["EngineConfig.max_model_len = 160"])
    chat, history = converse_until_truncated(llm, shift_kv=True)
    return llm, chat, history


def test_a_truncated_turn_moves_the_kept_history_and_caches_it_under_its_own_salt(shifted):
    llm, chat, history = shifted
    turn, out, source = history[-1]
    shift = turn.kv_shift
    assert shift is not None and turn.cache_salt is not None and chat.cache_salt == turn.cache_salt
    assert list(shift.source_token_ids) == source and shift.keep > 0
    # The prompt is the source without the dropped turns, then the new turn; all fits the context.
    kept = source[: shift.keep] + source[shift.keep + shift.drop :]
    assert turn.prompt_token_ids[: len(kept)] == kept
    assert len(turn.prompt_token_ids) + PARAMS.max_tokens <= llm.engine.max_model_len
    # The kept history's tokens in the source's cached pages (full pages of computed tokens: all but the
    # reply's last) move, in whole pages of the new prompt.
    page = llm.engine.config.page_size
    cached_source = (len(source) - 1) // page * page
    assert out.metrics.num_shifted_tokens == (cached_source - shift.drop) // page * page > 0
    assert out.metrics.num_cached_tokens == out.metrics.num_shifted_tokens
    # The moved pages hold the source's K/V rotated by the shift: check the whole plumbing on the pool.
    pool, engine_pool = llm.engine.runner.kv_pool, llm.engine.pool
    num_moved = out.metrics.num_shifted_tokens // page
    src_keys = page_hashes(source, page, shift.source_salt)
    new_keys = page_hashes(turn.prompt_token_ids, page, turn.cache_salt)[:num_moved]
    last_source = int(shift.source_position(np.array([num_moved * page - 1]))[0])
    src_pages = [engine_pool._page_of[key.digest] for key in src_keys[: last_source // page + 1]]
    dst_pages = [engine_pool._page_of[key.digest] for key in new_keys]
    moves = token_moves(shift, 0, num_moved * page, dst_pages, src_pages, page)
    inv_freq = jnp.asarray(llm.engine._inv_freq)
    for k, v in pool:
        source_k = k[:, moves[0], moves[1]].transpose(1, 0, 2)
        expected = apply_rope(source_k, jnp.asarray(moves[4]), inv_freq).transpose(1, 0, 2)
        np.testing.assert_allclose(k[:, moves[2], moves[3]], expected, atol=1e-5)
        np.testing.assert_array_equal(v[:, moves[2], moves[3]], v[:, moves[0], moves[1]])


def test_the_next_turn_reuses_the_moved_pages_and_exact_requests_never_see_them(shifted):
    llm, chat, history = shifted
    turn, out, _ = history[-1]
    _, nxt = send(llm, chat, "One more question.", PARAMS)
    page = llm.engine.config.page_size
    previous = turn.prompt_token_ids + list(out.outputs[0].token_ids)
    if not nxt.metrics.num_shifted_tokens:  # not truncated again: the salted history is reused
        assert nxt.metrics.num_cached_tokens == (len(previous) - 1) // page * page
    # The same truncated prompt without the salt: computed exactly, only the system prompt's pages reused.
    exact = llm.generate(turn.prompt_token_ids, PARAMS)[0]
    assert exact.metrics.num_cached_tokens <= turn.kv_shift.keep
    assert exact.metrics.num_shifted_tokens == 0
    # Nothing is left held: every page is free (perhaps cached).
    assert llm.engine.pool.num_used_pages == 0


def test_without_shift_kv_the_truncated_history_is_recomputed():
    llm = LLM.from_gin(["configs/tiny_test.gin"], ["EngineConfig.max_model_len = 160"])
    _, history = converse_until_truncated(llm, shift_kv=False)
    turn, out, _ = history[-1]
    assert turn.kv_shift is None and turn.cache_salt is None
    assert out.metrics.num_shifted_tokens == 0 and out.metrics.num_cached_tokens <= 8


def test_bad_shifts_are_refused_naming_the_field():
    llm = LLM.from_gin(["configs/tiny_test.gin"])
    engine = llm.engine
    source = (5, 6, 7, 8, 9, 10)
    good = KVShift(source, keep=1, drop=2)
    prompt = [5, 8, 9, 10, 11]
    engine.add_request(prompt, kv_shift=good, cache_salt="s")  # accepted
    cases = [
        (dict(kv_shift=good), "kv_shift needs a cache_salt"),
        (dict(kv_shift=good, cache_salt=""), "cache_salt must be a non-empty str"),
        (dict(kv_shift=KVShift(source, keep=1, drop=0), cache_salt="s"), "kv_shift.drop must be an int >= 1"),
        (
            dict(kv_shift=KVShift(source, keep=-1, drop=2), cache_salt="s"),
            "kv_shift.keep must be an int >= 0",
        ),
        (dict(kv_shift=KVShift(source, keep=4, drop=3), cache_salt="s"), "exceeds the 6 source tokens"),
        (dict(kv_shift=KVShift(source, keep=2, drop=2), cache_salt="s"), "the prompt does not start with"),
        (dict(kv_shift=(1, 2), cache_salt="s"), "kv_shift must be a KVShift"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.add_request(prompt, **options)
    with pytest.raises(ValueError, match="beam search"):
        beams = SamplingParams(n=2, use_beam_search=True, temperature=0)
        engine.add_request(prompt, beams, kv_shift=good, cache_salt="s")
    with pytest.raises(ValueError, match="prompt_logprobs"):
        engine.add_request(prompt, SamplingParams(prompt_logprobs=1), kv_shift=good, cache_salt="s")
    with pytest.raises(ValueError, match="shift_kv needs drop_oldest_turns"):
        llm.conversation(shift_kv=True)
    with pytest.raises(ValueError, match="drop_oldest_turns must be a bool"):
        llm.conversation(drop_oldest_turns="yes")
    assert len(llm.generate([5, 6, 7], SamplingParams(max_tokens=2))) == 1  # the engine serves on


def test_shift_moves_need_the_prefix_cache():
    llm = LLM.from_gin(["configs/tiny_test.gin"], ["EngineConfig.enable_prefix_caching = False"])
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        llm.engine.add_request([5, 8], kv_shift=KVShift((5, 6, 8), keep=1, drop=1), cache_salt="s")
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        llm.conversation(drop_oldest_turns=True, shift_kv=True)
