"""A fake model for host-side scheduler tests: it keeps a fake KV store keyed by slot and predicts from what
the pages hold, as attention would. It also carries out the step's page moves (saves to the tiers, swap out,
swap in, loads from the tiers, copy-on-write copies), so a page shared without a copy, a cached page with the
wrong tokens, a swap that loses a page, a tier that hands out another page's K/V, or a page freed too early
all change the outputs or trip an assert.
"""

import hashlib

import numpy as np

VOCAB = 50
EOS = 0


def next_token(prefix: list[int], salt: int = 0) -> int:
    """The fake model's prediction; `salt` (a request's seed) makes samples of one prompt diverge."""
    digest = hashlib.blake2b(bytes(f"{salt}:{prefix}", "ascii"), digest_size=4).digest()
    return int.from_bytes(digest, "little") % VOCAB


def reference_output(prompt: list[int], params, max_model_len: int, salt: int = 0) -> tuple[list[int], str]:
    """What one request yields run alone, without pages."""
    tokens, out = list(prompt), []
    while True:
        token = next_token(tokens, salt)
        tokens.append(token)
        out.append(token)
        stops = len(out) >= params.min_tokens and (
            (token == EOS and not params.ignore_eos) or token in params.stop_token_ids
        )
        if stops:
            return out, "stop"
        if len(out) >= params.max_tokens or len(tokens) >= max_model_len:
            return out, "length"


class FakeSamples:
    def __init__(self, token_ids):
        self.token_ids = token_ids
        self.logprobs = [-float(t) / VOCAB for t in token_ids]


class FakeKVModel:
    def __init__(self, page_size: int):
        self.page_size = page_size
        self.slots: dict[int, tuple[int, int]] = {}  # slot -> (position, token)
        self.host: dict[str, list[list]] = {}  # swapped-out pages by request id
        self.num_steps = 0

    def page(self, page_id: int) -> list:
        base = page_id * self.page_size
        return [self.slots.get(base + i) for i in range(self.page_size)]

    def _set_page(self, page_id: int, content: list) -> None:
        base = page_id * self.page_size
        for i, value in enumerate(content):
            if value is None:
                self.slots.pop(base + i, None)
            else:
                self.slots[base + i] = value

    def page_array(self, page_id: int) -> np.ndarray:
        """A page as the tiers hold it: (position, token) per slot, -1 for an empty slot."""
        return np.array([slot or (-1, -1) for slot in self.page(page_id)], np.int64)

    def step(self, output, salt_of=lambda request: 0, store=None) -> FakeSamples:
        """Runs the page moves of `output` (saves go to `store`), then its rows; returns one fake sample per
        row."""
        for page, key in output.saves:
            store.save(key, self.page_array(page))
        for request_id, pages in output.swap_out.items():
            self.host[request_id] = [self.page(p) for p in pages]
        for request_id, pages in output.swap_in.items():
            for page, content in zip(pages, self.host.pop(request_id), strict=True):
                self._set_page(page, content)
        for page, kv in output.loads:
            self._set_page(page, [None if pos < 0 else (int(pos), int(tok)) for pos, tok in np.asarray(kv)])
        for moves in output.shifts:  # a token moved keeps its token and takes its new position
            src_page, src_slot, dst_page, dst_slot, delta = (np.asarray(row).tolist() for row in moves)
            moved = [self.slots.get(p * self.page_size + i) for p, i in zip(src_page, src_slot, strict=True)]
            for page, slot, shift, value in zip(dst_page, dst_slot, delta, moved, strict=True):
                assert value is not None, "a move reads an empty slot"
                self.slots[page * self.page_size + slot] = (value[0] + shift, value[1])
        sources = {src: self.page(src) for src, _ in output.copies}  # every copy reads the pre-step pool
        for src, dst in output.copies:
            self._set_page(dst, sources[src])
        samples = []
        for item in output.scheduled:
            request, start = item.request, item.request.num_computed_tokens
            tokens = request.all_token_ids
            end = start + item.num_new_tokens
            assert 0 < item.num_new_tokens and end <= len(tokens)
            assert len(request.page_ids) * self.page_size >= end, "pages were not allocated ahead"
            assert 0 not in request.page_ids
            for pos in range(start, end):
                self.slots[self._slot(request, pos)] = (pos, tokens[pos])
            seen = [self.slots.get(self._slot(request, pos)) for pos in range(end)]
            assert seen == [(pos, tokens[pos]) for pos in range(end)], (
                f"{request}: its pages hold other tokens"
            )
            samples.append(next_token(tokens[:end], salt_of(request)))
        self.num_steps += 1
        return FakeSamples(samples)

    def _slot(self, request, pos: int) -> int:
        return request.page_ids[pos // self.page_size] * self.page_size + pos % self.page_size
