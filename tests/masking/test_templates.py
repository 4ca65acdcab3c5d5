"""Acceptance on real chat template families: the trained tokens of every assistant turn decode
to exactly its content plus the template's end-of-turn text, and nothing else is trained."""

from __future__ import annotations

import pytest

from losslab.masking.build import BuildStats, MaskBuilder, MaskConfig
from losslab.masking.render import ChatTemplate
from losslab.masking.spans import IGNORE_INDEX

from .conftest import FAMILIES, REASONING, Family, family_tokenizer, template_of

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
    {"role": "user", "content": "And 3×3? 🙂 Ünïcödé"},
    {"role": "assistant", "content": "9, naturally. 😀"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


def conversation(family: Family) -> list[dict]:
    return ([SYSTEM] if family.system else []) + TURNS


def decoded_runs(tokenizer, seq) -> list[str]:
    """Decode every maximal run of trained token ids."""
    runs: list[list[int]] = []
    previous = False
    for tok, label in zip(seq.input_ids, seq.labels):
        if label != IGNORE_INDEX:
            if previous:
                runs[-1].append(tok)
            else:
                runs.append([tok])
        previous = label != IGNORE_INDEX
    return [tokenizer.decode(r, clean_up_tokenization_spaces=False) for r in runs]


def build(tokenizer, family: Family, records, **config):
    builder = MaskBuilder(family_tokenizer(tokenizer, family), MaskConfig(template=template_of(family), **config))
    return list(builder.iter_sequences(records))


def assert_turn(run: str, content: str, end_of_turn: str) -> None:
    # A header that ends in a space (Mistral's "[/INST] ") shares the reply's first token
    # (" 2"); that token is trained, so the run may start with that one space.
    assert run in (content + end_of_turn, " " + content + end_of_turn), (run, content + end_of_turn)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_template_text_is_what_transformers_renders(tokenizer, family: Family) -> None:
    tok = family_tokenizer(tokenizer, family)
    template = ChatTemplate(tok, template_of(family))
    for messages in (conversation(family), conversation(family)[:-2], TURNS[:2]):
        expected = tok.apply_chat_template(messages, chat_template=template.source, tokenize=False)
        assert template.render(messages) == expected


@pytest.mark.parametrize("strategy", ["concat", "expand"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_trained_tokens_are_exactly_assistant_content_plus_end_of_turn(tokenizer, family, strategy) -> None:
    seqs = build(tokenizer, family, [{"messages": conversation(family)}], strategy=strategy)
    replies = [m["content"] for m in TURNS if m["role"] == "assistant"]
    runs = [run for seq in seqs for run in decoded_runs(family_tokenizer(tokenizer, family), seq)]
    assert len(seqs) == (1 if strategy == "concat" else len(replies))
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert_turn(run, reply, family.end_of_turn)
    trained_text = "".join(runs)
    for m in conversation(family):
        if m["role"] != "assistant":
            assert m["content"] not in trained_text  # no user/system token is trained


def test_mistral_trains_the_space_token_in_front_of_a_reply(tokenizer) -> None:
    """Mistral's prompt ends with [/INST] and the template puts " " in front of the reply: where
    BPE makes that space a token of its own (" ", "4", "2"), the model generates it, so it is trained."""
    mistral = next(f for f in FAMILIES if f.name == "mistral")
    tok = family_tokenizer(tokenizer, mistral)
    messages = [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "42 apples"}]
    for strategy in ("concat", "expand"):
        (seq,) = build(tokenizer, mistral, [{"messages": messages}], strategy=strategy)
        assert decoded_runs(tok, seq) == [" 42 apples</s>"]
        first = next(k for k, lab in enumerate(seq.labels) if lab != IGNORE_INDEX)
        assert tok.decode(seq.input_ids[first : first + 1]) == " "


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_last_trains_only_the_final_turn(tokenizer, family) -> None:
    for strategy in ("concat", "expand"):
        seqs = build(tokenizer, family, [{"messages": conversation(family)}], mask="last", strategy=strategy)
        runs = [run for seq in seqs for run in decoded_runs(family_tokenizer(tokenizer, family), seq)]
        assert len(seqs) == 1 and len(runs) == 1
        assert_turn(runs[0], TURNS[-1]["content"], family.end_of_turn)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_empty_assistant_content_trains_its_end_of_turn(tokenizer, family) -> None:
    messages = [*TURNS[:3], {"role": "assistant", "content": ""}]
    (seq,) = build(tokenizer, family, [{"messages": messages}])
    runs = decoded_runs(family_tokenizer(tokenizer, family), seq)
    assert len(runs) == 2
    assert_turn(runs[0], TURNS[1]["content"], family.end_of_turn)
    assert runs[1].strip() == family.end_of_turn  # "reply with nothing" = stop at once


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_policy_all_trains_every_token(tokenizer, family) -> None:
    """Every token but the first, which no token predicts."""
    (seq,) = build(tokenizer, family, [{"messages": conversation(family)}], mask="all")
    assert seq.labels == [IGNORE_INDEX, *seq.input_ids[1:]] and seq.weights[0] == 0.0
    (seq,) = build(tokenizer, family, [{"messages": conversation(family)}], mask_prompt=False)
    assert seq.labels == [IGNORE_INDEX, *seq.input_ids[1:]]


def test_trims_only_what_the_template_trims(tokenizer) -> None:
    """Llama 3 trims contents, ChatML keeps them: the trained text follows the template."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  spaced out \n"}]
    llama3, chatml = FAMILIES[2], FAMILIES[1]
    (seq,) = build(tokenizer, llama3, [{"messages": messages}])
    assert decoded_runs(family_tokenizer(tokenizer, llama3), seq) == ["spaced out<|eot_id|>"]
    (seq,) = build(tokenizer, chatml, [{"messages": messages}])
    # the header's "\n" and the leading spaces are one BPE token ("\n  "): trained whole
    assert decoded_runs(family_tokenizer(tokenizer, chatml), seq) == ["\n  spaced out \n<|im_end|>"]


def test_reasoning_template_trains_the_turn_as_rendered(tokenizer) -> None:
    """Earlier turns lose their <think> block in the whole conversation but keep it when the
    conversation ends there: expand trains each turn as the model sees it when generating it."""
    tok = family_tokenizer(tokenizer, REASONING)
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>add again</think>6"},
    ]
    expand = build(tokenizer, REASONING, [{"messages": messages}], strategy="expand")
    assert [decoded_runs(tok, s) for s in expand] == [
        ["<think>\nadd them\n</think>\n\n4<|im_end|>"],
        ["<think>\nadd again\n</think>\n\n6<|im_end|>"],
    ]
    (concat,) = build(tokenizer, REASONING, [{"messages": messages}], strategy="concat")
    assert decoded_runs(tok, concat) == ["4<|im_end|>", "<think>\nadd again\n</think>\n\n6<|im_end|>"]


@pytest.mark.parametrize("style", ["alpaca", "chat_template"])
def test_instruction_records_mask_the_prompt_by_default(tokenizer, style) -> None:
    record = {"instruction": "Translate to French", "input": "good morning", "output": "bonjour"}
    builder = MaskBuilder(tokenizer, MaskConfig(prompt_style=style))
    (seq,) = builder.iter_sequences([record])
    trained = tokenizer.decode([t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE_INDEX])
    assert trained == "bonjour<|im_end|>"
    assert "Translate to French" in seq.text and "good morning" in seq.text
    (seq,) = MaskBuilder(tokenizer, MaskConfig(prompt_style=style, mask_prompt=False)).iter_sequences([record])
    assert seq.labels == [IGNORE_INDEX, *seq.input_ids[1:]]  # mask_prompt: false trains the prompt too


def test_alpaca_prompt_text(tokenizer) -> None:
    (seq,) = MaskBuilder(tokenizer, MaskConfig(prompt_style="alpaca")).iter_sequences(
        [{"instruction": "Say hi", "output": "hi"}]
    )
    assert seq.text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi\n\n### Response:\nhi<|im_end|>"
    )


def test_weights_multiply_role_and_message_weights(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "first", "weight": 0.5},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "second", "weight": 0},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "third"},
    ]
    (seq,) = MaskBuilder(tokenizer, MaskConfig(role_weights={"assistant": 2.0})).iter_sequences(
        [{"messages": messages}]
    )
    by_weight: dict[float, str] = {}
    for (start, end), w in zip(seq.offsets, seq.weights):
        if w:
            by_weight[w] = by_weight.get(w, "") + seq.text[start:end]
    assert by_weight == {1.0: "first<|im_end|>", 2.0: "third<|im_end|>"}  # weight 0 turn: not trained
    assert all((w == 0) == (lab == IGNORE_INDEX) for w, lab in zip(seq.weights, seq.labels))


def test_policy_all_weights_roles_and_keeps_template_text_at_one(tokenizer) -> None:
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]
    config = MaskConfig(mask="all", role_weights={"user": 0.25, "system": 0})
    (seq,) = MaskBuilder(tokenizer, config).iter_sequences([{"messages": messages}])
    weights = {seq.text[s:e]: w for (s, e), w in zip(seq.offsets, seq.weights)}
    assert weights["question"] == 0.25 and weights["answer"] == 1.0 and weights["<|im_start|>"] == 1.0


@pytest.mark.parametrize("family", FAMILIES[1:], ids=lambda f: f.name)
def test_control_strings_as_plain_text(tokenizer, family) -> None:
    """On the bare SmolLM2 tokenizer the families' control strings are ordinary text, so BPE
    may merge a turn's edge with its neighbour ("|><|"): the run then holds the whole turn
    plus the rest of the edge token, never more."""
    builder = MaskBuilder(tokenizer, MaskConfig(template=template_of(family)))
    (seq,) = builder.iter_sequences([{"messages": conversation(family)}])
    end = family.end_of_turn.replace("</s>", tokenizer.eos_token)  # Mistral, Zephyr: the eos_token variable
    replies = [m["content"] + end for m in TURNS if m["role"] == "assistant"]
    runs = decoded_runs(tokenizer, seq)
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert reply in run and len(run) - len(reply) <= 2, (run, reply)


def test_special_token_text_in_a_message_is_counted_and_reported(tokenizer) -> None:
    """A reply that mentions <|im_end|> holds that special token, trained mid-reply. The tokens
    stay as the text says; the records are counted and the first one is named."""
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    mention = {
        "messages": [
            {"role": "user", "content": "How do turns end?"},
            {"role": "assistant", "content": "With <|im_end|>, then <|im_start|>."},
        ]
    }
    stats = BuildStats()
    _, seq, _ = MaskBuilder(tokenizer).iter_sequences([plain, mention, mention], stats)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE_INDEX].count(im_end) == 2
    assert stats.control.count == 2
    assert stats.summary().endswith(
        "; warning: 2 records with a special token's text in a message, tokenised as "
        "that token (first: <records>:2, '<|im_end|>')"
    )
    stats = BuildStats()  # the template's own control tokens, and the EOS after an Alpaca response, are not counted
    list(MaskBuilder(tokenizer).iter_sequences([plain], stats))
    alpaca = MaskBuilder(tokenizer, MaskConfig(prompt_style="alpaca"))
    list(alpaca.iter_sequences([{"instruction": "a", "output": "b"}], stats))
    assert stats.control.count == 0 and "warning" not in stats.summary()
