"""Chunked prefill under a token budget: a long prompt never stalls the requests that are decoding."""

from fake_kv_model import FakeKVModel, reference_output

from jaxpage.page_pool import PagePool
from jaxpage.request import Request
from jaxpage.sampling_params import SamplingParams
from jaxpage.scheduler import Scheduler

BUDGET = 256
PAGE_SIZE = 16


def test_a_4k_prompt_never_stops_16_decoding_requests():
    pool = PagePool(1024)
    sched = Scheduler(
        pool, page_size=PAGE_SIZE, max_num_seqs=32, max_num_batched_tokens=BUDGET, max_model_len=8192
    )
    model = FakeKVModel(PAGE_SIZE)
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    decoders = [Request(f"d{i}", [1 + i, 2, 3, 4 + i], params) for i in range(16)]
    for request in decoders:
        sched.add_request(request)
    out = sched.schedule()  # the 16 short prompts are prefilled together
    samples = model.step(out)
    sched.advance(out)
    sched.update_from_output(out, samples)
    assert all(r.num_output_tokens == 1 for r in decoders)

    long_prompt = [(7 * j) % 47 + 1 for j in range(4096)]
    long = Request("long", long_prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    sched.add_request(long)
    steps = 0
    while long.num_output_tokens == 0:
        before = [r.num_output_tokens for r in decoders]
        out = sched.schedule()
        assert out.num_scheduled_tokens <= BUDGET
        samples = model.step(out)
        sched.advance(out)
        sched.update_from_output(out, samples)
        steps += 1
        assert [r.num_output_tokens for r in decoders] == [b + 1 for b in before], (
            f"a decode stalled at {steps}"
        )
    # Every step but the budget's share for the decoders went to the prompt.
    assert steps == -(-4096 // (BUDGET - 16))
    while sched.has_unfinished_requests:
        out = sched.schedule()
        samples = model.step(out)
        sched.advance(out)
        sched.update_from_output(out, samples)
    for request in [*decoders, long]:
        assert (
            request.output_token_ids
            == reference_output(request.prompt_token_ids, request.sampling_params, 8192)[0]
        )
    assert pool.num_free_pages == pool.num_usable_pages
