"""concat / expand / auto: prefix-stability detection per template family, and the report."""

from __future__ import annotations

import pytest

from losslab.masking.build import BuildStats, MaskBuilder, MaskConfig
from losslab.masking.policies import MaskPolicy
from losslab.masking.render import ChatTemplate
from losslab.masking.strategy import Strategy, plan_conversation

from .conftest import FAMILIES, REASONING, family_tokenizer, template_of

MESSAGES = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "6"},
]
SYSTEM = {"role": "system", "content": "Answer with a number."}


def plan(tokenizer, family, messages, strategy="auto", policy=MaskPolicy.ASSISTANT):
    template = ChatTemplate(family_tokenizer(tokenizer, family), template_of(family))
    return plan_conversation(
        template, messages, policy=policy, weights=[1.0] * len(messages), strategy=Strategy(strategy)
    )


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_real_families_are_prefix_stable_so_auto_concatenates(tokenizer, family) -> None:
    result = plan(tokenizer, family, MESSAGES)
    assert result.prefix_stable is True and result.strategy is Strategy.CONCAT and len(result.samples) == 1


def test_reasoning_template_is_not_prefix_stable_so_auto_expands(tokenizer) -> None:
    result = plan(tokenizer, REASONING, MESSAGES)
    assert result.prefix_stable is False and result.strategy is Strategy.EXPAND
    assert [s.turn for s in result.samples] == [1, 3]


def test_mistral_drops_the_system_message_of_a_training_conversation(tokenizer) -> None:
    """Mistral v0.3 renders the system message only inside the LAST user turn, so a conversation
    that ends with an assistant turn (every training sample) never shows it. Prefix-stable, and
    nothing of it is trained, but the builder counts and reports the lost message."""
    mistral = next(f for f in FAMILIES if f.name == "mistral")
    messages = [SYSTEM, *MESSAGES]
    assert plan(tokenizer, mistral, messages).prefix_stable is True
    template = ChatTemplate(family_tokenizer(tokenizer, mistral), template_of(mistral))
    assert SYSTEM["content"] not in template.render(messages)
    assert SYSTEM["content"] in template.render(messages[:-1])
    stats = BuildStats()
    builder = MaskBuilder(family_tokenizer(tokenizer, mistral), MaskConfig(template=template_of(mistral)))
    list(builder.iter_sequences([{"messages": messages}], stats))
    assert stats.unrendered == {"system": 1}
    assert "1 system message not rendered by the chat template" in stats.summary()


def test_auto_reports_its_choice(tokenizer) -> None:
    stats = BuildStats()
    tok = family_tokenizer(tokenizer, REASONING)
    records = [{"messages": MESSAGES}, {"messages": MESSAGES[:2]}]
    seqs = list(MaskBuilder(tok, MaskConfig(template=template_of(REASONING))).iter_sequences(records, stats))
    assert len(seqs) == 3  # two turns expanded + one single-turn conversation
    assert stats.strategies == {"expand": 1, "concat": 1}
    assert (
        "strategy: auto -> concat for 1 conversation, expand for 1 conversation; expand where the chat "
        "template renders a conversation prefix differently from the whole" in stats.summary()
    )
    stats = BuildStats()
    list(MaskBuilder(tokenizer).iter_sequences([{"messages": MESSAGES}], stats))
    assert stats.summary().endswith("strategy: auto -> concat for 1 conversation")


def test_concat_trains_only_up_to_the_last_trained_turn(tokenizer) -> None:
    family = FAMILIES[0]
    messages = [*MESSAGES, {"role": "user", "content": "a trailing question nobody answers"}]
    (sample,) = plan(tokenizer, family, messages).samples
    assert "trailing question" not in sample.text  # carries no loss, so it is not rendered
    last = sample.regions[-1]  # the sample ends with the last answer
    assert sample.text[last.start : last.end].startswith("6") and sample.text[last.end :].strip() == ""


def test_forced_concat_on_a_reasoning_template_follows_the_whole_rendering(tokenizer) -> None:
    result = plan(tokenizer, REASONING, MESSAGES, strategy="concat")
    (sample,) = result.samples
    assert result.strategy is Strategy.CONCAT and result.prefix_stable is False
    # the whole rendering cuts the first turn's <think> block; the final turn's (empty) block
    # is template text the model generates after the prompt, so it is trained with the content
    assert "<think>\n\n</think>\n\n6<|im_end|>" in sample.text
    assert [sample.text[r.start : r.end] for r in sample.regions] == [
        "4<|im_end|>",
        "<think>\n\n</think>\n\n6<|im_end|>",
    ]


def test_last_policy_with_expand_and_auto(tokenizer) -> None:
    for strategy in ("auto", "expand", "concat"):
        result = plan(tokenizer, REASONING, MESSAGES, strategy=strategy, policy=MaskPolicy.LAST)
        (sample,) = result.samples
        assert [sample.text[r.start : r.end] for r in sample.regions] == ["<think>\n\n</think>\n\n6<|im_end|>"]


@pytest.mark.parametrize("family", [*FAMILIES, REASONING], ids=lambda f: f.name)
def test_a_turn_trains_what_the_model_generates_after_the_generation_prompt(tokenizer, family) -> None:
    """Everything after ``render(messages[:i], add_generation_prompt=True)`` up to the end of the
    turn, template text included: Qwen3's empty <think> block in front of a plain reply,
    Mistral's space after [/INST]; nothing of the prompt."""
    messages = [
        *MESSAGES[:1],
        {"role": "assistant", "content": "4"},
        *MESSAGES[2:3],
        {"role": "assistant", "content": "42 apples"},
    ]
    template = ChatTemplate(family_tokenizer(tokenizer, family), template_of(family))
    samples = plan(tokenizer, family, messages, strategy="expand").samples
    assert [s.turn for s in samples] == [1, 3]
    for sample in samples:
        prompt = template.render(messages[: sample.turn], add_generation_prompt=True)
        (region,) = sample.regions
        assert sample.text.startswith(prompt) and region.start == len(prompt), (family.name, sample.text, prompt)
        assert sample.text[region.start : region.end] == sample.text[len(prompt) :].rstrip()


TOOL_TURNS = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "<think>r1</think>call"},
    {"role": "tool", "content": "result"},
    {"role": "assistant", "content": "<think>r2</think>answer"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "<think>r3</think>bye"},
]


@pytest.mark.parametrize("policy", [MaskPolicy.ASSISTANT, MaskPolicy.ALL])
def test_forced_concat_after_a_tool_result_trains_no_template_text(tokenizer, policy) -> None:
    """The prompt for the reply after the tool result keeps the first reply's <think> block,
    which the whole rendering cuts: the turn still starts after its own header, not where the
    text leaves that prompt (inside the first reply), nor at the end of the tool result."""
    (sample,) = plan(tokenizer, REASONING, TOOL_TURNS, strategy="concat", policy=policy).samples
    replies = [sample.text[r.start : r.end] for r in sample.regions if TOOL_TURNS[r.message]["role"] == "assistant"]
    assert replies == ["call<|im_end|>", "answer<|im_end|>", "<think>\nr3\n</think>\n\nbye<|im_end|>"]
