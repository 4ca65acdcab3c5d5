"""The end of an assistant turn ends on a token boundary, never inside a special token.

Phi-3 / Phi-3.5 close a turn with ``<|end|>\\n``; a continuing conversation goes on with
``<|user|>`` and the end of the conversation with ``<|endoftext|>``. The text both share after
a turn is ``<|end|>\\n<|``, which cuts ``<|user|>`` in two: the turn must end before that token,
so every non-final turn trains ``<|end|>`` and never the next turn's ``<|user|>`` header.
"""

from __future__ import annotations

import copy

import pytest
from tokenizers import AddedToken

from losslab.masking.build import MaskBuilder, MaskConfig
from losslab.masking.policies import MaskPolicy
from losslab.masking.render import ChatTemplate
from losslab.masking.spans import IGNORE_INDEX
from losslab.masking.strategy import Strategy, plan_conversation

from .conftest import PHI3, Family, family_tokenizer, template_of

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
    {"role": "user", "content": "And 3×3? 🙂"},
    {"role": "assistant", "content": "9, naturally."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


def build(tokenizer, family: Family, messages, strategy: str):
    builder = MaskBuilder(
        family_tokenizer(tokenizer, family), MaskConfig(template=template_of(family), strategy=strategy)
    )
    return list(builder.iter_sequences([{"messages": messages}]))


def expected_labels(tok, input_ids: list[int], *, only_last: bool = False) -> list[int]:
    """The mask derived from the token ids alone: after each ``<|assistant|>`` token (and the newline
    token the template puts after it, unless the header token took it), every token up to and
    including ``<|end|>`` is trained; after the conversation's last ``<|end|>``, the rest of the
    text too (the newline and ``<|endoftext|>``: what ends a conversation). ``only_last``: only the
    last assistant turn is trained (an expanded sample)."""
    assistant, end, user = (tok.convert_tokens_to_ids(t) for t in ("<|assistant|>", "<|end|>", "<|user|>"))
    labels = [IGNORE_INDEX] * len(input_ids)
    inside = False
    last_header = max(k for k, t in enumerate(input_ids) if t == assistant)
    for k, token in enumerate(input_ids):
        if token == assistant and (k == last_header or not only_last):
            inside = True
            continue
        if inside and labels[k - 1] == IGNORE_INDEX and input_ids[k - 1] == assistant and tok.decode([token]) == "\n":
            continue  # the header's own newline
        if inside:
            labels[k] = token
            inside = token != end
    last_end = max(k for k, t in enumerate(input_ids) if t == end)
    if labels[last_end] != IGNORE_INDEX:
        labels[last_end + 1 :] = input_ids[last_end + 1 :]
    assert user not in [t for t in labels if t != IGNORE_INDEX]
    return labels


@pytest.mark.parametrize("family", PHI3, ids=lambda f: f.name)
def test_template_text_is_what_transformers_renders(tokenizer, family: Family) -> None:
    tok = family_tokenizer(tokenizer, family)
    template = ChatTemplate(tok, template_of(family))
    for messages in (MESSAGES, MESSAGES[:3], MESSAGES[1:5]):
        for prompt in (False, True):
            expected = tok.apply_chat_template(
                messages, chat_template=template.source, tokenize=False, add_generation_prompt=prompt
            )
            assert template.render(messages, add_generation_prompt=prompt) == expected


@pytest.mark.parametrize("family", PHI3, ids=lambda f: f.name)
def test_concat_trains_end_of_turn_and_not_the_next_user_header(tokenizer, family: Family) -> None:
    tok = family_tokenizer(tokenizer, family)
    (seq,) = build(tokenizer, family, MESSAGES, "concat")
    assert seq.labels == expected_labels(tok, seq.input_ids)
    user, end = tok.convert_tokens_to_ids("<|user|>"), tok.convert_tokens_to_ids("<|end|>")
    trained = [t for t, label in zip(seq.input_ids, seq.labels) if label != IGNORE_INDEX]
    assert user not in trained and trained.count(end) == 3
    runs = _decoded_runs(tok, seq)
    assert runs[:2] == ["2+2 is 4.<|end|>", "9, naturally.<|end|>"]
    assert runs[2].replace("\n", "") == "You're welcome.<|end|><|endoftext|>"


@pytest.mark.parametrize("strategy", ["expand", "auto"])
@pytest.mark.parametrize("family", PHI3, ids=lambda f: f.name)
def test_expand_trains_each_turn_to_the_end_of_its_conversation(tokenizer, family: Family, strategy: str) -> None:
    """A prefix ends with EOS where the whole goes on with <|user|>: not prefix-stable, so auto expands."""
    tok = family_tokenizer(tokenizer, family)
    seqs = build(tokenizer, family, MESSAGES, strategy)
    assert [seq.turn for seq in seqs] == [2, 4, 6]
    for seq in seqs:
        assert seq.labels == expected_labels(tok, seq.input_ids, only_last=True)
        (run,) = _decoded_runs(tok, seq)
        assert run.replace("\n", "") == MESSAGES[seq.turn]["content"] + "<|end|><|endoftext|>"  # type: ignore[index]


def test_auto_expands_phi3(tokenizer) -> None:
    family = PHI3[0]
    template = ChatTemplate(family_tokenizer(tokenizer, family), template_of(family))
    plan = plan_conversation(
        template, MESSAGES, policy=MaskPolicy.ASSISTANT, weights=[1.0] * len(MESSAGES), strategy=Strategy.AUTO
    )
    assert plan.prefix_stable is False and plan.strategy is Strategy.EXPAND


def test_token_boundary_never_cuts_an_added_token(tokenizer) -> None:
    template = ChatTemplate(family_tokenizer(tokenizer, PHI3[1]), template_of(PHI3[1]))
    text = "a<|end|>\n<|user|>\nq"
    user = text.index("<|user|>")
    assert template.token_boundary(text, user + 2, 1) == user
    assert template.token_boundary(text, text.index("<|end|>") + 3, 1) == 1
    assert template.token_boundary(text, text.index("<|end|>") + 3, 3) == 3  # never below the floor
    assert template.token_boundary(text, user - 1, 1) == user - 1  # a token boundary already
    assert template.token_boundary(text, user, 1) == user
    # a token that takes the whitespace in front of it (lstrip): the cut goes before that whitespace too
    lstrip = copy.deepcopy(tokenizer)
    lstrip.add_special_tokens({"additional_special_tokens": [AddedToken("<|user|>", lstrip=True, special=True)]})
    template = ChatTemplate(lstrip, template_of(PHI3[1]))
    assert template.token_boundary(text, user + 2, 1) == user - 1


def _decoded_runs(tok, seq) -> list[str]:
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(seq.input_ids, seq.labels):
        if label != IGNORE_INDEX:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return [tok.decode(r, clean_up_tokenization_spaces=False) for r in runs]
