"""Preference records as token ids: truncation keeps the end of the prompt and the start of each
reply, never leaves a prompt or a reply empty, and records what it cut (property-based), on the
real SmolLM2 tokenizer and chat template."""

from __future__ import annotations

from functools import cache

from hypothesis import given, settings
from hypothesis import strategies as st

from losslab.data.records import Source
from losslab.data.schemas import PreferenceRecord, UnpairedPreferenceRecord
from losslab.models import load_tokenizer
from losslab.train.tasks.preference_data import (
    KEEP_PROMPT,
    PreferenceEncoder,
    add_mismatched,
    encode_pair,
    encode_unpaired,
)

HERE = Source("prefs.jsonl", 7)


@cache
def tokenizer():
    return load_tokenizer("builtin:tiny-llama")


def ids(n: int, start: int) -> list[int]:
    return list(range(start, start + n))


@settings(max_examples=200, deadline=None)
@given(
    max_length=st.integers(8, 64),
    prompt=st.integers(1, 80),
    chosen=st.integers(1, 80),
    rejected=st.integers(1, 80),
)
def test_fit_cuts_the_prompt_start_first_and_never_empties_a_part(
    max_length: int, prompt: int, chosen: int, rejected: int
) -> None:
    encoder = PreferenceEncoder(tokenizer(), template=None, max_length=max_length)
    p, c, r = ids(prompt, 1000), ids(chosen, 2000), ids(rejected, 3000)
    kept, cut = encoder.fit(HERE, p, {"chosen": c, "rejected": r})
    assert len(kept) >= KEEP_PROMPT and kept == p[len(p) - len(kept) :]  # the prompt's end survives
    for name, full in (("chosen", c), ("rejected", r)):
        assert len(cut[name]) >= 1 and cut[name] == full[: len(cut[name])]  # a reply's start survives
        assert len(kept) + len(cut[name]) <= max_length
    fits = max(len(c), len(r)) + len(p) <= max_length
    if fits:
        assert (kept, cut) == (p, {"chosen": c, "rejected": r}) and encoder.truncations.log.count == 0
    else:
        assert encoder.truncations.log.count == 1


@settings(max_examples=100, deadline=None)
@given(
    max_length=st.integers(8, 48),
    lengths=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60)), min_size=2, max_size=6),
)
def test_mismatched_replies_for_kto_fit_beside_each_prompt(max_length: int, lengths: list[tuple[int, int]]) -> None:
    encoder = PreferenceEncoder(tokenizer(), template=None, max_length=max_length)
    items = []
    for k, (prompt, completion) in enumerate(lengths):
        kept, cut = encoder.fit(HERE, ids(prompt, 1000 * k), {"completion": ids(completion, 1000 * k + 500)})
        items.append({"prompt": kept, "completion": cut["completion"], "desirable": k % 2 == 0})
    for i, item in enumerate(add_mismatched(items, max_length)):
        other = items[(i + 1) % len(items)]["completion"]
        assert item["kl_completion"] == other and item["completion"] == items[i]["completion"]
        assert len(item["prompt"]) >= KEEP_PROMPT and item["prompt"] == items[i]["prompt"][-len(item["prompt"]) :]
        assert len(item["prompt"]) + max(len(item["completion"]), len(other)) <= max_length


def test_a_long_unpaired_reply_is_cut_at_its_end_like_a_paired_one() -> None:
    encoder = PreferenceEncoder(tokenizer(), template=None, max_length=24)
    long = " ".join(f"word{i}" for i in range(60))
    item = encode_unpaired(
        encoder, HERE, UnpairedPreferenceRecord(prompt="Say something.", completion=long, desirable=True)
    )
    pair = encode_pair(encoder, HERE, PreferenceRecord(prompt="Say something.", chosen=long, rejected="Fine."))
    assert len(item["prompt"]) + len(item["completion"]) <= 24 and len(item["prompt"]) >= KEEP_PROMPT
    assert item["completion"] == pair["chosen"] and item["prompt"] == pair["prompt"]
    assert [line.split(":")[:2] for line in encoder.truncations.log.to_dict()["records"]] == [["prefs.jsonl", "7"]] * 2
