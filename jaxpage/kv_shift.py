"""Reusing a conversation's K/V after its oldest turns were dropped (AttentionStore's positional decoupling,
llama.cpp's K-shift).

When a conversation outgrows the context, its oldest turns are dropped: the new prompt is the old tokens with
`drop` of them cut out after the first `keep` (the system prompt), then the new turn. The kept tokens' V is
unchanged, and their K differs from what the cache holds only by the rotary position: a token that moves from
position p to p - drop has K rotated by -drop (rotations compose, so re-rotating the cached K equals rotating
the pre-RoPE K to the new position). The result is still approximate: the kept tokens once attended to the
dropped ones. So the shifted pages are cached under a salt of their own (`cache_salt`), never where an exact
computation of the same tokens would find them, and requests reuse them only when they ask to.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class KVShift:
    """A request's prompt is `source_token_ids` without the tokens `keep : keep + drop`, then more tokens.

    source_token_ids: tokens whose K/V the cache may hold (a conversation's last prompt and reply).
    source_salt: the `cache_salt` under which they were run (None: the plain prefix cache).
    """

    source_token_ids: tuple[int, ...]
    keep: int
    drop: int
    source_salt: str | None = None

    def check(self, prompt_token_ids: list[int], cache_salt: str | None) -> None:
        """Raises ValueError naming the field when the shift does not describe this prompt."""
        for name in ("keep", "drop"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "keep" else 1):
                raise ValueError(
                    f"kv_shift.{name} must be an int >= {0 if name == 'keep' else 1}, got {value!r}"
                )
        source = self.source_token_ids
        if not isinstance(source, tuple | list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in source
        ):
            raise ValueError(f"kv_shift.source_token_ids must be a list of token ids, got {source!r:.200}")
        if self.keep + self.drop > len(source):
            raise ValueError(
                f"kv_shift: keep ({self.keep}) + drop ({self.drop}) exceeds the {len(source)} source tokens"
            )
        kept = list(source[: self.keep]) + list(source[self.keep + self.drop :])
        if list(prompt_token_ids[: len(kept)]) != kept:
            raise ValueError(
                "kv_shift: the prompt does not start with source_token_ids without tokens "
                f"{self.keep}:{self.keep + self.drop}"
            )
        if cache_salt is None or cache_salt == self.source_salt:
            raise ValueError(
                f"kv_shift needs a cache_salt other than its source_salt ({self.source_salt!r}), got "
                f"{cache_salt!r}: shifted K/V is approximate and must not be found by exact lookups"
            )

    def source_position(self, positions: np.ndarray) -> np.ndarray:
        """Where the tokens at these (new) positions were in the source."""
        return np.where(positions < self.keep, positions, positions + self.drop)

    def num_reusable(self, num_source_tokens: int) -> int:
        """New positions `[0, n)` whose K/V the first `num_source_tokens` of the source hold."""
        if num_source_tokens >= self.keep + self.drop:
            return num_source_tokens - self.drop
        return min(num_source_tokens, self.keep)


def token_moves(
    shift: KVShift, first: int, end: int, dst_pages: list[int], src_pages: list[int], page_size: int
) -> np.ndarray:
    """i32[5, end - first]: for the new positions `first .. end`, rows (source page, source slot, destination
    page, destination slot, position delta). `dst_pages` and `src_pages` are the page tables of the new
    request and of the source (covering what the positions need)."""
    positions = np.arange(first, end)
    source = shift.source_position(positions)
    src, dst = np.asarray(src_pages, np.int64), np.asarray(dst_pages, np.int64)
    return np.stack(
        [
            src[source // page_size],
            source % page_size,
            dst[positions // page_size],
            positions % page_size,
            positions - source,
        ]
    ).astype(np.int32)
