"""Finding content spans: outer markers, markers inside whitespace for trimming templates,
one message at a time for templates that branch on the content, lost markers."""

from __future__ import annotations

from losslab.masking.build import BuildStats, MaskBuilder, MaskConfig
from losslab.masking.render import ChatTemplate, ContentSpan

from .conftest import FAMILIES, family_tokenizer, template_of

BRANCHING = (
    "{% for m in messages %}<{{ m['role'] }}>"
    "{% if m['content'] == 'skip me' %}{% elif m['content'] | length > 40 %}{{ raise_exception('too long') }}"
    "{% else %}{{ m['content'] }}{% endif %}</{{ m['role'] }}>\n{% endfor %}"
)
TRIMMING = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | trim }}[end]{% endfor %}"


def test_spans_with_a_plain_template(tokenizer) -> None:
    template = ChatTemplate(tokenizer, TRIMMING.replace(" | trim", ""))
    messages = [{"role": "user", "content": " a "}, {"role": "assistant", "content": "\n"}]
    rendered = template.render_with_spans(messages)
    assert rendered.text == "[user] a [end][assistant]\n[end]"
    assert [rendered.text[s.start : s.end] for s in rendered.spans] == [" a ", "\n"]


def test_spans_with_a_trimming_template(tokenizer) -> None:
    template = ChatTemplate(tokenizer, TRIMMING)
    messages = [{"role": "user", "content": " a "}, {"role": "assistant", "content": "\n\n"}]
    rendered = template.render_with_spans(messages)
    assert rendered.text == "[user]a[end][assistant][end]"
    assert rendered.spans == (ContentSpan(6, 7), ContentSpan(23, 23))


def test_a_template_that_branches_on_the_content(tokenizer) -> None:
    template = ChatTemplate(tokenizer, BRANCHING)
    messages = [
        {"role": "user", "content": "skip me"},  # rendered as nothing: not found
        {"role": "assistant", "content": "x" * 38},  # refused with markers: they make it "too long"
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "bye"},
    ]
    rendered = template.render_with_spans(messages)
    assert rendered.spans[:2] == (ContentSpan(None, None), ContentSpan(None, None))
    assert [rendered.text[s.start : s.end] for s in rendered.spans[2:]] == ["q", "bye"]
    # message 2's turn is still found: the template has no generation prompt, so the header
    # comes from a probe reply, and the end of turn from the conversation ending there
    stats = BuildStats()
    (seq,) = MaskBuilder(tokenizer, MaskConfig(template=BRANCHING)).iter_sequences([{"messages": messages}], stats)
    trained = "".join(seq.text[s:e] for (s, e), lab in zip(seq.offsets, seq.labels) if lab != -100)
    assert trained == "x" * 38 + "</assistant>" + "bye</assistant>"
    assert stats.unrendered == {"user": 1}


def test_reply_header(tokenizer) -> None:
    """What the prompt for a reply adds after a user turn; without a generation prompt, the text a
    reply follows less its trailing whitespace (Mistral: the model generates the space after [/INST])."""
    assert ChatTemplate(tokenizer).reply_header == ("<|im_start|>assistant\n", True)
    assert ChatTemplate(tokenizer, BRANCHING).reply_header == ("<assistant>", False)
    headers = {f.name: ChatTemplate(family_tokenizer(tokenizer, f), template_of(f)).reply_header for f in FAMILIES}
    assert headers["gemma"] == ("<start_of_turn>model\n", True) and headers["mistral"] == ("", False)


ESCAPES = [
    "{{ messages.append('x') }}",  # a method that modifies a list (the immutable sandbox)
    "{{ messages[0].clear() }}",
    "{{ messages[0].update(role='system') }}",
    "{{ raise_exception.__code__.co_consts }}",  # internal attributes
    "{% for m in messages %}{{ m.__class__.__init__.__globals__['os'] }}{% endfor %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
]


def _outcome(render) -> str:
    try:
        return "text: " + render()
    except Exception as exc:  # noqa: BLE001
        return "refused: " + str(exc).split("SecurityError: ")[-1]


def test_the_remembered_attribute_checks_refuse_what_the_sandbox_refuses(tokenizer) -> None:
    """Templates are untrusted: the sandbox's attribute checks are kept per (type, name), and each
    render, first or later, gives what transformers' own sandbox gives (the text, or the refusal)."""
    from jinja2.exceptions import SecurityError

    messages = [{"role": "user", "content": "hi"}]
    refused = 0
    for escape in ESCAPES:
        template = ChatTemplate(tokenizer, "{% for m in messages %}{{ loop.first }}{% endfor %}" + escape)
        expected = _outcome(
            lambda t=template: tokenizer.apply_chat_template(messages, chat_template=t.source, tokenize=False)
        )
        for _ in range(3):
            assert _outcome(lambda t=template: t.render(messages)) == expected, escape
        try:
            template._compiled.render(messages=messages)
        except SecurityError:
            refused += 1
    assert refused >= 4
    allowed = ChatTemplate(
        tokenizer,
        "{% for m in messages %}{{ loop.first }}{{ m.items() | list | length }}{{ m['content'].upper() }}{% endfor %}",
    )
    for _ in range(2):
        assert allowed.render(messages) == "True2HI"
