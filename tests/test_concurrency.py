"""Interleaved `LLM` calls and threads: each call sees only its own requests' outputs, and `add_request` /
`abort` from other threads while one thread steps neither fail the engine nor lose a request."""

import random
import threading
import time

import pytest

from jaxpage import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def llm():
    return LLM.from_gin(["configs/tiny_test.gin"])


def drain(stream, seconds: float = 60.0) -> list:
    """The stream's remaining items; fails instead of hanging if it does not end (it used to spin)."""
    items = []
    thread = threading.Thread(target=lambda: items.extend(stream), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the stream did not end"
    return items


def test_a_stream_yields_only_its_own_outputs_while_generate_runs_inside_it(llm):
    stream = llm.generate_stream(["a", "b"], GREEDY)
    first = next(stream)
    inner = llm.generate(["c", "d", "e"], SamplingParams(max_tokens=12, temperature=0))
    rest = drain(stream)  # the stream's requests finished during `inner`: it must end, not spin
    mine = {first.request_id} | {output.request_id for output in rest}
    assert len(mine) == 2 and not mine & {output.request_id for output in inner}
    assert sum(output.finished for output in [first, *rest]) == 2
    # Each stream's deltas still add up to its final text.
    for request_id in mine:
        deltas = "".join(o.outputs[0].new_text for o in [first, *rest] if o.request_id == request_id)
        final = next(o for o in rest if o.request_id == request_id and o.finished)
        assert deltas == final.outputs[0].text


def test_two_half_consumed_streams_each_finish(llm):
    one = llm.generate_stream(["a"], GREEDY)
    two = llm.generate_stream(["b"], SamplingParams(max_tokens=3, temperature=0))
    next(one)
    finals_two = [o for o in drain(two) if o.finished]
    finals_one = [o for o in drain(one) if o.finished]
    assert len(finals_one) == len(finals_two) == 1
    assert finals_one[0].request_id != finals_two[0].request_id


def test_adding_and_aborting_from_other_threads_while_one_thread_steps(llm):
    engine = llm.engine
    num_adders, per_adder = 2, 15
    added: list[str] = []
    aborted: set[str] = set()
    errors: list[BaseException] = []
    finals: dict[str, object] = {}
    num_finals = 0
    done = threading.Event()

    def add(seed: int):
        rng = random.Random(seed)
        try:
            for i in range(per_adder):
                params = SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0, 1.0]))
                request_id = engine.add_request(f"thread {seed} prompt {i} " * rng.randint(1, 8), params)
                added.append(request_id)
                if rng.random() < 0.3:
                    victim = rng.choice(added)
                    if engine.abort(victim):
                        aborted.add(victim)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    def abort_some():
        rng = random.Random(99)
        while not done.is_set():
            if added:
                request_id = rng.choice(added)
                if engine.abort(request_id):
                    aborted.add(request_id)

    adders = [threading.Thread(target=add, args=(seed,)) for seed in range(num_adders)]
    aborter = threading.Thread(target=abort_some)
    for thread in [*adders, aborter]:
        thread.start()
    while any(thread.is_alive() for thread in adders) or engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
                num_finals += 1
    done.set()
    aborter.join()
    for output in engine.stream():  # an abort that raced the last step reports in one more
        finals[output.request_id] = output
        num_finals += 1
    assert not errors
    # Every request ends with exactly one final output; an abort that took effect is its reason.
    assert sorted(finals) == sorted(added) and num_finals == len(added)
    assert aborted and all(finals[i].outputs[0].finish_reason == "abort" for i in aborted)
    assert all(finals[i].outputs[0].finish_reason in ("length", "stop") for i in set(added) - aborted)
    assert engine.pool.num_free_pages == engine.pool.num_usable_pages


def test_threads_sharing_an_llm_never_lose_an_output_that_another_call_stepped(llm, monkeypatch):
    # Both calls' requests finish in the same last step. Whichever thread runs it must hand the other its
    # output before that thread can find its mailbox empty and the engine idle (which reads as "lost").
    engine_step = llm.engine.step

    def slow_step():
        outputs = engine_step()
        if outputs:  # widens the window between a step and the delivery of its outputs
            time.sleep(0.05)
        return outputs

    monkeypatch.setattr(llm.engine, "step", slow_step)
    barrier, results, errors = threading.Barrier(2), {}, []

    def consume(name: str):
        try:
            stream = llm.generate_stream([name], SamplingParams(max_tokens=4, temperature=0))
            barrier.wait()  # both queued before either steps: they run in the same steps
            results[name] = [o for o in stream if o.finished]
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    for _ in range(3):
        threads = [threading.Thread(target=consume, args=(name,)) for name in ("ab", "cd")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors
        assert sorted(results) == ["ab", "cd"] and all(len(finals) == 1 for finals in results.values())
