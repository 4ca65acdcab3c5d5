"""Property tests over random conversations (roles, empty strings, unicode, very long turns):
no crash, and every trained token lies in an assistant turn, checked against independent
reference renderings of ChatML (SmolLM2's own template) and Llama 3."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from losslab.errors import UserError
from losslab.masking.build import MaskBuilder, MaskConfig
from losslab.masking.spans import IGNORE_INDEX

from .conftest import FAMILIES, REASONING, family_tokenizer, template_of

SMOLLM_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
MARKER_LIKE = ["\ue000", "\ue001\ue002", "\U000f0000", "\ue0f0 \U00100001"]  # the renderer's marker alphabets

content = st.one_of(
    st.just(""),
    st.text(max_size=40),
    st.sampled_from([" ", "\n", "  padded  ", "<think>x</think>y", "<|im_end|>", "a\r\nb", "😀🙂", "\x00"]),
    st.sampled_from(MARKER_LIKE).flatmap(lambda m: st.text(max_size=5).map(lambda t: m + t)),
    st.text(min_size=1, max_size=12).map(lambda t: t * 300),  # very long turns
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": content},
    optional={"weight": st.sampled_from([0.0, 0.5, 1.0, 2.0])},
)
conversations = st.lists(message, min_size=1, max_size=7)
# LOSSLAB_HYPOTHESIS_EXAMPLES=1000 for a longer search by hand
SETTINGS = settings(
    max_examples=int(os.environ.get("LOSSLAB_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

Reference = Callable[[list[dict]], tuple[str, list[tuple[int, int]], list[tuple[int, int]]]]


def chatml_reference(messages: list[dict]) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """SmolLM2's template by hand: text, each message's content span, each message's turn span
    (content + end of turn)."""
    text = "" if messages[0]["role"] == "system" else SMOLLM_SYSTEM
    contents, turns = [], []
    for m in messages:
        text += f"<|im_start|>{m['role']}\n"
        start = len(text)
        text += m["content"]
        contents.append((start, len(text)))
        text += "<|im_end|>"
        turns.append((start, len(text)))
        text += "\n"
    return text, contents, turns


def llama3_reference(messages: list[dict]) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    text = "<|begin_of_text|>"
    contents, turns = [], []
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        start = len(text)
        text += m["content"].strip()  # jinja's trim
        contents.append((start, len(text)))
        text += "<|eot_id|>"
        turns.append((start, len(text)))
    return text, contents, turns


def trained_turns(messages: list[dict], policy: str) -> list[int]:
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    chosen = assistants[-1:] if policy == "last" else assistants
    return [i for i in chosen if m_weight(messages[i]) > 0]


def m_weight(m: dict) -> float:
    return m.get("weight", 1.0)


def check_against_reference(seqs, messages, policy: str, reference: Reference) -> None:
    expected_turns = trained_turns(messages, policy)
    seen_turns: list[int] = []
    for seq in seqs:
        # which prefix of the conversation is this sequence?
        k = next(k for k in range(1, len(messages) + 1) if reference(messages[:k])[0] == seq.text)
        _, contents, turns = reference(messages[:k])
        mine = [seq.turn] if seq.turn is not None else [i for i in expected_turns if i < k]
        seen_turns += mine
        assert k - 1 == max(mine)  # rendered exactly up to the last trained turn
        for (start, end), tok, label, weight in zip(seq.offsets, seq.input_ids, seq.labels, seq.weights):
            overlaps = [i for i, (a, b) in enumerate(turns) if start < b and end > a]
            inside = [i for i, (a, b) in enumerate(turns) if a <= start and end <= b]
            if label != IGNORE_INDEX:
                assert label == tok and weight > 0
                # a trained token lies in a trained assistant turn...
                assert any(i in mine for i in overlaps), (seq.text[start:end], overlaps)
                # ...and touches no character of any other message's content
                for i, (a, b) in enumerate(contents):
                    if i not in mine:
                        assert not (start < b and end > a), (seq.text[start:end], messages[i]["role"])
                assert weight == m_weight(messages[overlaps[-1]])
            else:
                assert weight == 0
                # every token wholly inside a trained turn is trained
                assert not any(i in mine for i in inside), (seq.text[start:end], inside)
    assert sorted(seen_turns) == expected_turns


def build(tokenizer, messages, template, **config):
    return list(
        MaskBuilder(tokenizer, MaskConfig(template=template, **config)).iter_sequences([{"messages": messages}])
    )


@pytest.mark.parametrize("family_name", ["smollm2", "llama3"])
@SETTINGS
@given(
    messages=conversations,
    policy=st.sampled_from(["assistant", "last"]),
    strategy=st.sampled_from(["auto", "concat", "expand"]),
)
def test_trained_tokens_lie_in_assistant_turns(tokenizer, family_name, messages, policy, strategy) -> None:
    family = next(f for f in FAMILIES if f.name == family_name)
    reference = chatml_reference if family_name == "smollm2" else llama3_reference
    tok = family_tokenizer(tokenizer, family)
    if not any(m["role"] == "assistant" for m in messages):
        with pytest.raises(UserError, match="no assistant turn"):
            build(tok, messages, template_of(family), mask=policy, strategy=strategy)
        return
    seqs = build(tok, messages, template_of(family), mask=policy, strategy=strategy)
    check_against_reference(seqs, messages, policy, reference)


@pytest.mark.parametrize("family", [*FAMILIES, REASONING], ids=lambda f: f.name)
@SETTINGS
@given(messages=conversations, strategy=st.sampled_from(["auto", "concat", "expand"]))
def test_no_crash_on_any_template(tokenizer, family, messages, strategy) -> None:
    tok = family_tokenizer(tokenizer, family)
    try:
        seqs = build(tok, messages, template_of(family), strategy=strategy)
    except UserError as exc:  # no assistant turn, or the template itself refuses (role order)
        assert "no assistant turn" in str(exc) or "the chat template" in str(exc)
        return
    for seq in seqs:
        # the tokens are exactly those of the text tokenised on its own (expand cuts prefixes
        # out of one tokenisation where that is exact)
        alone = tok(seq.text, add_special_tokens=False, return_offsets_mapping=True)
        assert seq.input_ids == alone["input_ids"] and seq.offsets == [tuple(o) for o in alone["offset_mapping"]]
        assert len(seq.input_ids) == len(seq.labels) == len(seq.weights) == len(seq.offsets)
        assert seq.trained > 0
        assert all(lab in (IGNORE_INDEX, tok_id) for lab, tok_id in zip(seq.labels, seq.input_ids))
