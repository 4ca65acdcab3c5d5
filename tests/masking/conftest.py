"""Shared helpers for the masking tests: the real template families on the SmolLM2 tokenizer.

Each family's control strings are added to a copy of the SmolLM2 tokenizer as special tokens
(as in that family's real tokenizer), so turn boundaries are token boundaries; Zephyr's
``<|user|>`` headers stay plain text, as they are in Zephyr's own tokenizer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenizers import AddedToken

from losslab.masking.build import MaskedSequence
from losslab.masking.spans import IGNORE_INDEX

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Family:
    name: str
    file: str | None  # None: the tokenizer's own (SmolLM2) template
    end_of_turn: str  # what closes an assistant turn
    special: dict  # tokenizer.add_special_tokens argument
    system: bool = True  # accepts a system message


FAMILIES = [
    Family("smollm2", None, "<|im_end|>", {}),
    Family("chatml_qwen2", "chatml_qwen2.jinja", "<|im_end|>", {}),
    Family(
        "llama3",
        "llama3.jinja",
        "<|eot_id|>",
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
        },
    ),
    Family(
        "gemma",
        "gemma.jinja",
        "<end_of_turn>",
        {"bos_token": "<bos>", "eos_token": "<eos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
        system=False,
    ),
    Family(
        "mistral",
        "mistral.jinja",
        "</s>",
        {"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["[INST]", "[/INST]"]},
    ),
    Family("zephyr", "zephyr.jinja", "</s>", {"bos_token": "<s>", "eos_token": "</s>"}),
]
REASONING = Family(
    "qwen3_reasoning", "qwen3_reasoning.jinja", "<|im_end|>", {"additional_special_tokens": ["<think>", "</think>"]}
)
# Phi-3 style: the end of the conversation is `<|end|>\n` + EOS (`<|endoftext|>`) where a continuing one
# has `<|end|>\n<|user|>`, so a conversation prefix is not a prefix of the whole (auto expands). Phi-3-mini's
# tokenizer marks its role and end tokens rstrip (each takes the whitespace after it); Phi-3.5 is tested with
# plain special tokens, so both tokenisations of `<|end|>\n` are covered.
_PHI_ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
PHI3 = [
    Family(
        "phi3",
        "phi3.jinja",
        "<|end|>",
        {
            "bos_token": "<s>",
            "eos_token": "<|endoftext|>",
            "additional_special_tokens": [
                AddedToken(t, rstrip=True, normalized=False, special=True) for t in _PHI_ROLES
            ],
        },
    ),
    Family(
        "phi3_5",
        "phi3_5.jinja",
        "<|end|>",
        {
            "bos_token": "<s>",
            "eos_token": "<|endoftext|>",
            "additional_special_tokens": _PHI_ROLES,
        },
    ),
]
_TOKENIZERS: dict[str, object] = {}


def family_tokenizer(base, family: Family):
    """A copy of the SmolLM2 tokenizer with the family's special tokens (cached per family)."""
    if family.name not in _TOKENIZERS:
        tok = copy.deepcopy(base)
        if family.special:
            tok.add_special_tokens(dict(family.special))
        _TOKENIZERS[family.name] = tok
    return _TOKENIZERS[family.name]


def template_of(family: Family) -> str | None:
    return None if family.file is None else str(TEMPLATES / family.file)


def trained_runs(seq: MaskedSequence) -> list[str]:
    """The text of each maximal run of trained tokens: from its first token's start to its
    last token's end (byte tokens of one character share offsets, so no character repeats)."""
    runs: list[list[int]] = []  # [start, end] per run
    previous = False
    for (start, end), label in zip(seq.offsets, seq.labels):
        trained = label != IGNORE_INDEX
        if trained and previous:
            runs[-1][1] = max(runs[-1][1], end)
        elif trained:
            runs.append([start, end])
        previous = trained
    return [seq.text[a:b] for a, b in runs]


@pytest.fixture(scope="session")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture
def cached_tokenizer(monkeypatch, tokenizer):
    """`losslab inspect` runs without loading the SmolLM2 tokenizer again for every call."""
    import losslab.models

    real = losslab.models.load_tokenizer

    def load(name: str, **kwargs):
        return tokenizer if name == "builtin:smollm2-135m-instruct" else real(name, **kwargs)

    monkeypatch.setattr(losslab.models, "load_tokenizer", load)


def write_jsonl(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
