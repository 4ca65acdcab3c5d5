"""Every conversation prefix's render from one observed render (one-pass templates), equal to
rendering each prefix; the conservative one-pass check; masks unchanged by it."""

from __future__ import annotations

import random

import pytest

from losslab.masking.build import MaskBuilder, MaskConfig
from losslab.masking.render import ChatTemplate, plain_messages

from .conftest import FAMILIES, PHI3, REASONING, Family, family_tokenizer, template_of

ONE_PASS = [
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}",
    (
        "{% if messages[0]['role'] == 'system' %}S{% endif %}{% for m in messages %}{% if loop.first %}F{% endif %}"
        "{{ loop.index0 }}{{ m.content | trim | upper }}{{ m['content'].strip() }}{% endfor %}{{ eos_token }}"
    ),
    (
        "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}"
        "{% endif %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}A:{% else %}END{% endif %}"
    ),
]
NOT_ONE_PASS = [
    "{% for m in messages %}{{ m.content }}{% if loop.last %}LAST{% endif %}{% endfor %}",  # looks at the end
    "{% for m in messages %}{{ m.content }}{{ loop.length }}{{ loop.revindex }}{% endfor %}",
    "{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{{ messages[-1].content }}{% endfor %}",
    "{% for m in messages %}{{ m.content }}{% if not loop.first %}{{ messages[loop.index0 + 1] }}{% endif %}{% endfor %}",
    "{% for m in messages %}{{ m.content }}{% endfor %}{% for m in messages %}{{ m.role }}{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ m.content }}{% endfor %}{{ ns.n }}",
    "{% for m in messages %}{% set x = m.content %}{{ x }}{% endfor %}",
    "{% for m in messages[1:] %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{{ m.content }}{% else %}nothing{% endfor %}",
    "{% for m in messages %}{{ m.content }}{{ strftime_now('%Y') }}{% endfor %}",  # not a pure function
    "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
    "{% for m in messages %}{{ m.content }}{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}",
    "{% for m in messages %}{{ m.content }}{{ messages }}{% endfor %}",
]


def conversations(seed: int = 0, count: int = 12) -> list[list[dict]]:
    rng = random.Random(seed)
    words = ["hi", " spaced ", "\n", "", "2+2?", "<|im_end|>", "🙂 Ünïcödé", "a\nb", "x" * 50]
    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": rng.choice(words)}] if rng.random() < 0.4 else []
        for _turn in range(rng.randint(1, 6)):
            messages.append({"role": "user", "content": rng.choice(words)})
            messages.append({"role": "assistant", "content": rng.choice(words) + rng.choice(words)})
        out.append(messages)
    return out


def every_prefix(template: ChatTemplate, messages: list[dict]) -> tuple[dict[int, str], dict[int, str]]:
    plain = plain_messages(messages)
    ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return template.render_prefixes(plain, ends), {i: template.render(messages[: i + 1]) for i in ends}


@pytest.mark.parametrize("family", [*FAMILIES, REASONING, *PHI3], ids=lambda f: f.name)
def test_every_prefix_is_the_render_of_that_prefix(tokenizer, family: Family) -> None:
    template = ChatTemplate(family_tokenizer(tokenizer, family), template_of(family))
    assert template.loops_once is (family.name in ("smollm2", "phi3", "phi3_5"))
    for messages in conversations():
        if not family.system:
            messages = [m for m in messages if m["role"] != "system"]
        try:
            template.render(messages)
        except Exception:  # noqa: BLE001, S112  (a conversation this template refuses)
            continue
        derived, rendered = every_prefix(template, messages)
        assert derived == rendered


@pytest.mark.parametrize("source", ONE_PASS + NOT_ONE_PASS)
def test_the_one_pass_check(tokenizer, source: str) -> None:
    template = ChatTemplate(tokenizer, source)
    assert template.loops_once is (source in ONE_PASS)
    for messages in conversations(1, 6):
        try:
            template.render(messages)
        except Exception:  # noqa: BLE001, S112  (a conversation this template refuses)
            continue
        derived, rendered = every_prefix(template, messages)
        assert derived == rendered


def test_a_failing_render_fails_as_before(tokenizer) -> None:
    from losslab.errors import UserError

    template = ChatTemplate(tokenizer, ONE_PASS[2])
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "tool", "content": "t"},
        {"role": "assistant", "content": "b"},
    ]
    with pytest.raises(UserError, match="bad role"):
        template.render_prefixes(plain_messages(messages), [1, 3])


@pytest.mark.parametrize("family", [FAMILIES[0], *PHI3], ids=lambda f: f.name)
@pytest.mark.parametrize("strategy", ["concat", "expand", "auto"])
def test_masks_are_those_of_rendering_every_prefix(tokenizer, monkeypatch, family: Family, strategy: str) -> None:
    """The samples built with one observed render equal those built by rendering every prefix."""
    records = [{"messages": m} for m in conversations(2, 10)]
    config = MaskConfig(template=template_of(family), strategy=strategy)
    tok = family_tokenizer(tokenizer, family)
    fast = [s.__dict__ for s in MaskBuilder(tok, config).iter_sequences(records)]
    monkeypatch.setattr(ChatTemplate, "loops_once", False)
    slow = [s.__dict__ for s in MaskBuilder(tok, config).iter_sequences(records)]
    assert fast == slow and len(fast) >= 10


@pytest.mark.parametrize("family", [*FAMILIES, *PHI3], ids=lambda f: f.name)
def test_one_text_is_tokenised_as_the_tokenizer_call_does(tokenizer, family: Family) -> None:
    tok = family_tokenizer(tokenizer, family)
    builder = MaskBuilder(tok, MaskConfig(template=template_of(family)))
    template = ChatTemplate(tok, template_of(family))
    for messages in conversations(3, 6):
        try:
            text = template.render([m for m in messages if family.system or m["role"] != "system"])
        except Exception:  # noqa: BLE001, S112  (a conversation this template refuses)
            continue
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert builder._tokenize_one(text) == (enc["input_ids"], enc["offset_mapping"])
