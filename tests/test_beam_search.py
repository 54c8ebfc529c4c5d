"""Beam search: the group logic against a plain reference beam search that recomputes every hypothesis (HF's
rules), the exhaustive optimum on a tiny vocabulary, and beam groups served by the scheduler on shared,
forked pages with preemption, where the fake KV model checks every token it reads from the pages."""

import hashlib
import itertools

import numpy as np
import pytest
from beam_reference import reference_beam_search
from fake_kv_model import FakeKVModel, reference_output

from jaxpage.beam_search import BeamGroup, BeamSearch, BeamSearchParams, beam_search_params
from jaxpage.page_pool import PagePool
from jaxpage.request import Request, RequestStatus
from jaxpage.sampling_params import SamplingParams
from jaxpage.scheduler import Scheduler

VOCAB = 12
EOS = 0


def toy_logprobs(tokens: list[int], vocab: int = VOCAB) -> np.ndarray:  # f64[vocab]
    """A fixed, history-dependent next-token distribution (no ties in practice), EOS a likely candidate."""
    seed = int.from_bytes(hashlib.blake2b(repr(list(tokens)).encode(), digest_size=8).digest(), "little")
    logits = np.random.default_rng(seed).normal(size=vocab) * 2.0
    logits[EOS] += 2.0
    return logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()


def top(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:  # i64[k], f64[k]
    order = np.argsort(-logprobs, kind="stable")[:k]
    return order, logprobs[order]


def run_search(params: BeamSearchParams, prompt: list[int], logprobs_of=toy_logprobs, num_candidates=None):
    """Runs a search to its end, each beam offering its best `num_candidates` (default 2 * width) tokens."""
    search = BeamSearch(params)
    while not search.done:
        for beam in search.live_beams:
            logprobs = logprobs_of(prompt + list(search.token_ids(beam)))
            search.add_candidates(beam, *top(logprobs, num_candidates or 2 * params.width))
        search.advance()
    return search


def assert_same_hypotheses(got, expected, stop=frozenset({EOS})):
    assert [h.token_ids for h in got] == [tokens for tokens, _ in expected]
    assert [h.score for h in got] == pytest.approx([score for _, score in expected], rel=1e-12)
    for h in got:
        assert h.cumulative_logprob == pytest.approx(sum(h.logprobs), rel=1e-12)
        assert h.finish_reason == ("stop" if h.token_ids[-1] in stop else "length")


# ---- the group logic -------------------------------------------------------------------------------------


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -0.5])
def test_group_logic_equals_the_reference_beam_search(early_stopping, length_penalty):
    rounds = []  # rounds of the searches that could run 7
    for width, max_tokens, stop, prompt in itertools.product(
        [1, 2, 3, 5], [1, 9], [frozenset({EOS}), frozenset()], [[3], [5, 1, 4], [9, 9, 2, 6]]
    ):
        params = BeamSearchParams(width, width, max_tokens, length_penalty, early_stopping, stop)
        search = run_search(params, prompt)
        expected = reference_beam_search(
            toy_logprobs,
            prompt,
            width=width,
            max_tokens=max_tokens,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            stop_token_ids=stop,
            n=width,
        )
        assert_same_hypotheses(search.best(), expected, stop)
        assert run_search(params, prompt, num_candidates=VOCAB).best() == search.best()  # more change nothing
        if max_tokens == 9 and stop:
            rounds.append(search.num_generated)
    assert min(rounds) < 9, "no search ended before max_tokens: the stopping rules went untested"


def test_early_stopping_modes_end_the_same_search_at_different_rounds():
    ends = {}
    for mode in (True, False, "never"):
        ends[mode] = [
            run_search(BeamSearchParams(3, 1, 12, 1.0, mode, frozenset({EOS})), [p]).num_generated
            for p in range(1, 9)
        ]
    assert all(t <= f <= nv for t, f, nv in zip(ends[True], ends[False], ends["never"], strict=True))
    assert ends[True] != ends[False] and ends[False] != ends["never"]


def test_score_divides_by_the_generated_length_including_the_stop_token():
    table = {(7,): {4: -0.1, EOS: -2.0}, (7, 4): {EOS: -0.5, 5: -3.0}}

    def logprobs_of(tokens):
        out = np.full(VOCAB, -50.0)
        for token, lp in table.get(tuple(tokens), {5: -4.0}).items():
            out[token] = lp
        return out

    for penalty in (0.0, 1.0, 2.0):
        params = BeamSearchParams(1, 1, 5, penalty, "never", frozenset({EOS}))
        (best,) = run_search(params, [7], logprobs_of).best()
        assert best.token_ids == (4, EOS) and best.logprobs == (-0.1, -0.5)
        assert best.score == pytest.approx(-0.6 / 2**penalty)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -1.0])
def test_a_width_covering_every_continuation_returns_the_exhaustive_optimum(length_penalty):
    vocab, max_tokens, prompt = 4, 3, [1, 2]

    def logprobs_of(tokens):
        return toy_logprobs(tokens, vocab)

    hypotheses = []
    for length in range(1, max_tokens + 1):
        for tokens in itertools.product(range(vocab), repeat=length):
            if EOS in tokens[:-1] or (length < max_tokens and tokens[-1] != EOS):
                continue
            logprobs = [logprobs_of(prompt + list(tokens[:i]))[t] for i, t in enumerate(tokens)]
            hypotheses.append((tokens, sum(logprobs) / length**length_penalty))
    hypotheses.sort(key=lambda h: -h[1])
    assert len(hypotheses) == 1 + 3 + 36
    params = BeamSearchParams(64, 64, max_tokens, length_penalty, False, frozenset({EOS}))
    assert_same_hypotheses(run_search(params, prompt, logprobs_of).best(), hypotheses)


def test_a_beam_width_beyond_the_sampled_candidates_is_refused():
    params = SamplingParams(use_beam_search=True, temperature=0, n=2, best_of=11)
    message = "beam width \\(best_of, else n\\) must be <= max_logprobs / 2 \\(10\\).*got 11"
    with pytest.raises(ValueError, match=message):
        beam_search_params(params, frozenset({EOS}), max_logprobs=20, max_new_tokens=100)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(temperature=0.8), "temperature must be 0 with use_beam_search, got 0.8"),
        (dict(top_p=0.9), "top_p must be 1.0 with use_beam_search"),
        (dict(top_k=5), "top_k must be 0 with use_beam_search"),
        (dict(n=3, best_of=2), "best_of must be None or an int in \\[n \\(3\\)"),
        (dict(repetition_penalty=1.2), "repetition_penalty must be 1.0 with use_beam_search, got 1.2"),
        (dict(presence_penalty=0.5), "presence_penalty must be 0.0 with use_beam_search"),
        (dict(frequency_penalty=-1.0), "frequency_penalty must be 0.0 with use_beam_search"),
        (dict(min_tokens=2), "min_tokens must be 0 with use_beam_search, got 2"),
        (dict(stop=["x"]), "stop strings are not supported with use_beam_search"),
        (dict(logprobs=2), "logprobs must be None or 0 with use_beam_search, got 2"),
        (dict(early_stopping="sometimes"), "early_stopping must be true, false or 'never', got 'sometimes'"),
    ],
)
def test_sampling_parameters_that_contradict_beam_search_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{"use_beam_search": True, "temperature": 0, **change})


def test_beam_search_params_take_width_stops_and_the_length_cap_from_the_request():
    params = SamplingParams(
        use_beam_search=True, temperature=0, n=2, best_of=4, max_tokens=50, stop_token_ids=[9]
    )
    got = beam_search_params(params, frozenset({EOS}), max_logprobs=8, max_new_tokens=30)
    assert (got.width, got.n, got.max_tokens, got.stop_token_ids) == (4, 2, 30, frozenset({EOS, 9}))
    ignoring = SamplingParams(use_beam_search=True, temperature=0, ignore_eos=True)
    assert (
        beam_search_params(ignoring, frozenset({EOS}), max_logprobs=2, max_new_tokens=9).stop_token_ids
        == set()
    )
    for field, value in [("width", 0), ("n", 3), ("max_tokens", 0), ("early_stopping", "sometimes")]:
        fields = dict(width=2, n=1, max_tokens=4) | {field: value}
        with pytest.raises(ValueError, match=f"{field if field != 'width' else 'beam width'} must be"):
            BeamSearchParams(**fields)


# ---- beams on the scheduler's pages ---------------------------------------------------------------------


class Samples:
    def __init__(self, token_ids, logprobs):
        self.token_ids, self.logprobs = token_ids, logprobs


def serve(groups, plain, *, num_pages, page_size, max_num_seqs, budget, mode="recompute", caching=False):
    """Runs beam groups (BeamGroup) and plain requests to the end on a fake KV model; returns statistics."""
    pool = PagePool(num_pages, enable_prefix_caching=caching)
    sched = Scheduler(
        pool,
        page_size=page_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=64,
        preemption_mode=mode,
        num_swap_pages=num_pages if mode == "swap" else 0,
    )
    model = FakeKVModel(page_size)
    by_id = {group.request_id: group for group in groups}
    for group in groups:
        sched.add_request(group.first_request)
    for request in plain:
        sched.add_request(request)
    stats = dict(max_ref_count=0, max_held=0)
    while sched.has_unfinished_requests:
        out = sched.schedule()
        assert not out.is_empty, "unfinished requests but nothing scheduled: a deadlock"
        assert not any(item.request.request_id in sched.held for item in out.scheduled)
        assert out.num_scheduled_tokens <= budget and len(out.scheduled) <= max_num_seqs
        ends = [
            i.request.all_token_ids[: i.request.num_computed_tokens + i.num_new_tokens] for i in out.scheduled
        ]
        fake = model.step(out)  # checks that the pages hold every token the rows read
        candidates, token_ids, logprobs = {}, [], []
        for item, tokens, fake_token in zip(out.scheduled, ends, fake.token_ids, strict=True):
            group = by_id.get(item.request.request_id.partition("#beam")[0])
            if group is None:
                token_ids.append(fake_token)
                logprobs.append(-1.0)
                continue
            ids, lps = candidates[item.request.request_id] = top(
                toy_logprobs(tokens), 2 * group.search.params.width
            )
            token_ids.append(int(ids[0]))
            logprobs.append(float(lps[0]))
        sched.advance(out)
        for request in sched.update_from_output(out, Samples(token_ids, logprobs)):
            if request.request_id in candidates:
                group = by_id[request.request_id.partition("#beam")[0]]
                for ended in group.update(sched, request, *candidates[request.request_id]):
                    model.host.pop(ended, None)  # what the engine does with a swapped beam's host copy
        pool.check_invariants([r.page_ids for r in sched.running])
        pages = {p for r in sched.running for p in r.page_ids}
        stats["max_ref_count"] = max([stats["max_ref_count"]] + [pool.ref_count(p) for p in pages])
        stats["max_held"] = max(stats["max_held"], len(sched.held))
    assert (
        pool.num_free_pages == pool.num_usable_pages
        and sched.kv_cache.num_used_swap_pages == 0
        and not model.host
    )
    assert not sched.held and all(group.finished for group in groups)
    return stats | dict(
        preemptions=sched.num_preemptions, swap_outs=sched.num_swap_outs, copies=sched.kv_cache.num_copies
    )


def beam_group(index, prompt, width, max_tokens, length_penalty=1.0, early_stopping=False, n=None):
    params = SamplingParams(
        use_beam_search=True,
        temperature=0,
        n=n or width,
        best_of=width,
        max_tokens=max_tokens,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    beam_params = beam_search_params(params, frozenset({EOS}), max_logprobs=2 * width, max_new_tokens=64)
    return BeamGroup(f"g{index}", prompt, params, beam_params)


def expected_best(group, prompt):
    p = group.search.params
    return reference_beam_search(
        toy_logprobs,
        prompt,
        width=p.width,
        max_tokens=p.max_tokens,
        length_penalty=p.length_penalty,
        early_stopping=p.early_stopping,
        stop_token_ids=p.stop_token_ids,
        n=p.n,
    )


PROMPTS = [[3, 1, 4, 1, 5], [2, 7, 1], [9, 2, 6, 5, 3, 5, 8]]


@pytest.mark.parametrize(
    "pool_kwargs",
    [
        dict(num_pages=64, page_size=4, max_num_seqs=16, budget=64),  # roomy: every beam runs every step
        dict(num_pages=64, page_size=4, max_num_seqs=16, budget=64, caching=True),
        dict(num_pages=12, page_size=2, max_num_seqs=3, budget=5),  # beams wait for rows, tokens and pages
        dict(num_pages=12, page_size=2, max_num_seqs=3, budget=5, mode="swap"),
        dict(num_pages=14, page_size=1, max_num_seqs=2, budget=3, caching=True),
    ],
)
def test_beams_on_shared_pages_equal_the_reference_and_give_every_page_back(pool_kwargs):
    groups = [
        beam_group(0, PROMPTS[0], width=3, max_tokens=6),
        beam_group(1, PROMPTS[1], width=4, max_tokens=5, length_penalty=0.0, early_stopping="never", n=2),
        beam_group(2, PROMPTS[2], width=2, max_tokens=6, early_stopping=True),
    ]
    plain_params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    plain = [Request(f"p{i}", prompt, plain_params) for i, prompt in enumerate(PROMPTS[:2])]
    stats = serve(groups, plain, **pool_kwargs)
    for group, prompt in zip(groups, PROMPTS, strict=True):
        assert_same_hypotheses(group.best(), expected_best(group, prompt))
    for request in plain:
        assert request.output_token_ids == reference_output(request.prompt_token_ids, plain_params, 64)[0]
    assert stats["max_ref_count"] > 1, "forked beams did not share their pages"
    if pool_kwargs["page_size"] > 1:
        assert stats["copies"] > 0, "no beam wrote into a shared partly filled page"
    if pool_kwargs["num_pages"] < 64:
        assert stats["preemptions"] > 0 and stats["max_held"] > 0, "the pool was not small enough"
    if pool_kwargs.get("mode") == "swap":
        assert stats["swap_outs"] > 0


def test_aborting_a_beam_group_mid_search_frees_every_page():
    pool = PagePool(40)
    sched = Scheduler(pool, page_size=2, max_num_seqs=8, max_num_batched_tokens=3, max_model_len=64)
    group = beam_group(0, PROMPTS[0], width=4, max_tokens=8)
    sched.add_request(group.first_request)
    while not (sched.held and len(group.request_ids) > 2):  # 3 tokens a step for 4 beams: some wait
        out = sched.schedule()
        rows = [
            top(toy_logprobs(i.request.all_token_ids[: i.request.num_computed_tokens + i.num_new_tokens]), 8)
            for i in out.scheduled
        ]
        sched.advance(out)
        updated = sched.update_from_output(
            out, Samples([int(r[0][0]) for r in rows], [r[1][0] for r in rows])
        )
        for request in updated:
            row = next(b for b, item in enumerate(out.scheduled) if item.request is request)
            group.update(sched, request, *rows[row])
    beams = [sched.requests[r] for r in group.request_ids]
    assert len(beams) > 1 and sched.held and any(pool.ref_count(p) > 1 for b in beams for p in b.page_ids)
    group.abort(sched)
    assert all(beam.status == RequestStatus.FINISHED_ABORTED for beam in beams)
    assert not sched.has_unfinished_requests and not sched.held and not group.request_ids
    assert pool.num_free_pages == pool.num_usable_pages
