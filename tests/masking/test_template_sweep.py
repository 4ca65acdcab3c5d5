"""Masks on the stock chat templates of 18 released model families (19 tokenizers), checked token by token.

The templates are the ``chat_template`` strings the models ship (files under
``templates/sweep/``, origins in its README). Each family's tokenizer is the builtin SmolLM2
tokenizer with that family's control strings added as special tokens and bos/eos set as the
family's own tokenizer sets them.

The expected mask is derived here without losslab's algorithm (no template probing, no
generation-prompt diffs, no marker renders), from what each family is declared to do:

- ``header``: the text the model's prompt ends with before it generates a reply (the end of the
  generation prompt, e.g. ``<|im_start|>assistant\\n``); never trained;
- ``leads``: the template text allowed between that header and the reply's content, which the
  model generates and so is trained (Mistral's and Llama 2's space after ``[/INST]``, Qwen3's
  empty ``<think>\\n\\n</think>\\n\\n`` in front of a turn that carries one);
- ``end_of_turn``: what the template puts right after an assistant content that the model
  generates before it stops (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``</s>``,
  Phi-3's ``<|end|>``, DeepSeek Coder's ``\\n<|EOT|>``); the newline between turns and the next
  turn's header are not part of it;
- ``end_of_text``: the same when the assistant message is the last one of the rendered text,
  if the template appends more there (Phi-3 / Phi-3.5 add ``\\n`` + EOS when no generation
  prompt is asked for); trailing whitespace is never trained.

In the rendered text (rendered by ``transformers``' own ``apply_chat_template``) every trained
assistant content is located in order; its trained characters run from the end of the
header before it to the end of its end-of-turn text. A token is trained iff it covers one of
those characters, except the first token, which nothing predicts. Everything else, header and
role tokens and the next turn's header included, is -100.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from losslab.masking.build import MaskBuilder, MaskConfig, MaskedSequence, build_samples
from losslab.masking.spans import IGNORE_INDEX

SWEEP = Path(__file__).parent / "templates" / "sweep"
THINK = "<think>\n\n</think>\n\n"


@dataclass(frozen=True)
class Family:
    name: str
    file: str | None  # template under templates/sweep/ (None: the builtin SmolLM2 tokenizer's own)
    header: str
    end_of_turn: str
    bos: str | None
    eos: str
    special: tuple[str, ...] = ()  # other control tokens, added as special tokens
    plain: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's <think>)
    leads: tuple[str, ...] = ("",)
    end_of_text: str | None = None  # None: same as end_of_turn
    system: bool = True  # accepts a system message
    rstrip: bool = False  # the control tokens in `special` take the whitespace on their right

    @property
    def final(self) -> str:
        return self.end_of_turn if self.end_of_text is None else self.end_of_text


CHATML = ("<|im_start|>", "<|im_end|>")
FAMILIES = [
    Family("llama2", "llama2.jinja", "[/INST]", " </s>", "<s>", "</s>", leads=(" ",)),
    Family(
        "llama3_3",
        "llama3_3.jinja",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
        "<|begin_of_text|>",
        "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"),
    ),
    Family("mistral_v0_1", "mistral_v0_1.jinja", "[/INST]", "</s>", "<s>", "</s>", leads=(" ",)),
    Family("mistral_nemo", "mistral_nemo.jinja", "[/INST]", "</s>", "<s>", "</s>", ("[INST]", "[/INST]")),
    Family(
        "gemma2",
        "gemma2.jinja",
        "<start_of_turn>model\n",
        "<end_of_turn>",
        "<bos>",
        "<eos>",
        ("<start_of_turn>", "<end_of_turn>"),
        system=False,
    ),
    Family("qwen2_5", "qwen2_5.jinja", "<|im_start|>assistant\n", "<|im_end|>", None, "<|im_end|>", CHATML),
    Family(
        "qwen3",
        "qwen3.jinja",
        "<|im_start|>assistant\n",
        "<|im_end|>",
        None,
        "<|im_end|>",
        CHATML,
        plain=("<think>", "</think>"),
        leads=("", THINK),
    ),
    Family(
        "phi3",
        "phi3.jinja",
        "<|assistant|>\n",
        "<|end|>",
        "<s>",
        "<|endoftext|>",
        ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
        end_of_text="<|end|>\n<|endoftext|>",
    ),
    # the same, with control tokens that swallow the newline after them (added tokens with rstrip)
    Family(
        "phi3_rstrip",
        "phi3.jinja",
        "<|assistant|>\n",
        "<|end|>",
        "<s>",
        "<|endoftext|>",
        ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
        end_of_text="<|end|>\n<|endoftext|>",
        rstrip=True,
    ),
    Family(
        "phi3_5",
        "phi3_5.jinja",
        "<|assistant|>\n",
        "<|end|>",
        "<s>",
        "<|endoftext|>",
        ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
        end_of_text="<|end|>\n<|endoftext|>",
    ),
    Family(
        "phi4",
        "phi4.jinja",
        "<|im_start|>assistant<|im_sep|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_end|>",
        (*CHATML, "<|im_sep|>"),
    ),
    Family(
        "deepseek_coder", "deepseek_coder.jinja", "### Response:\n", "\n<|EOT|>", "<｜begin▁of▁sentence｜>", "<|EOT|>"
    ),
    Family(
        "command_r",
        "command_r.jinja",
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        "<|END_OF_TURN_TOKEN|>",
        "<BOS_TOKEN>",
        "<|END_OF_TURN_TOKEN|>",
        ("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"),
    ),
    Family(
        "granite3_3",
        "granite3_3.jinja",
        "<|start_of_role|>assistant<|end_of_role|>",
        "<|end_of_text|>",
        "<|end_of_text|>",
        "<|end_of_text|>",
        ("<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"),
    ),
    Family("olmo2", "olmo2.jinja", "<|assistant|>\n", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
    Family("smollm2", None, "<|im_start|>assistant\n", "<|im_end|>", "<|im_start|>", "<|im_end|>", CHATML),
    Family("yi1_5", "yi1_5.jinja", "<|im_start|>assistant\n", "<|im_end|>", "<|startoftext|>", "<|im_end|>", CHATML),
    Family(
        "openchat3_5",
        "openchat3_5.jinja",
        "GPT4 Correct Assistant:",
        "<|end_of_turn|>",
        "<s>",
        "<|end_of_turn|>",
        leads=(" ",),
    ),
    Family("internlm2", "internlm2.jinja", "<|im_start|>assistant\n", "<|im_end|>", "<s>", "</s>", CHATML),
]

SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    # three rounds: two assistant turns that are not the last message
    "three_rounds": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 is 4."},
        {"role": "user", "content": "And 3×3? Ünïcödé"},
        {"role": "assistant", "content": "9, naturally. 😀"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ],
    "one_round": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ],
    # ends with a user turn: the trained text stops at the last assistant turn
    "open_question": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Ha. Another?"},
    ],
}


def messages_of(family: Family, name: str) -> list[dict[str, str]]:
    with_system = family.system and name != "one_round"
    return ([SYSTEM] if with_system else []) + CONVERSATIONS[name]


def family_tokenizer(base: Any, family: Family) -> Any:
    """The SmolLM2 tokenizer with the family's tokens; the BPE model is shared (read-only), so
    building one takes a millisecond instead of a deep copy of the whole vocabulary."""
    from tokenizers import AddedToken, Tokenizer

    backend = base.backend_tokenizer
    fresh = Tokenizer(backend.model)
    fresh.normalizer, fresh.pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    fresh.decoder, fresh.post_processor = backend.decoder, backend.post_processor
    for _, added in sorted(backend.get_added_tokens_decoder().items()):
        (fresh.add_special_tokens if added.special else fresh.add_tokens)([added])
    tok = copy.deepcopy(base, memo={id(backend): fresh})
    specials = [t for t in (family.bos, family.eos) if t is not None and t not in family.special]
    control = [AddedToken(t, rstrip=family.rstrip, special=True, normalized=False) for t in family.special]
    tok.add_special_tokens({"additional_special_tokens": [*dict.fromkeys(specials), *control]})
    if family.plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.plain])
    tok.bos_token, tok.eos_token = family.bos, family.eos
    return tok


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer: Any) -> dict[str, Any]:
    return {f.name: family_tokenizer(smollm2_tokenizer, f) for f in FAMILIES}


def template_of(family: Family) -> str | None:
    return None if family.file is None else str(SWEEP / family.file)


def render(tok: Any, family: Family, messages: Sequence[dict[str, str]]) -> str:
    source = None if family.file is None else (SWEEP / family.file).read_text(encoding="utf-8")
    text = tok.apply_chat_template(list(messages), chat_template=source, tokenize=False)
    assert isinstance(text, str)
    return text


def expected_regions(
    family: Family, text: str, messages: Sequence[dict[str, str]], trained: set[int]
) -> list[tuple[int, int]]:
    """Character regions [start, end) trained in ``text`` (the render of ``messages``)."""
    regions = []
    cursor = 0
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        at = text.find(m["content"], cursor)
        assert at >= 0, f"{family.name}: assistant message {i} not found in {text[cursor:]!r}"
        header = text.rfind(family.header, cursor, at)
        assert header >= 0, f"{family.name}: no {family.header!r} before assistant message {i}"
        start = header + len(family.header)
        assert text[start:at] in family.leads, f"{family.name}: unexpected {text[start:at]!r} before the reply"
        body_end = at + len(m["content"])
        closing = family.final if i == last and i == len(messages) - 1 else family.end_of_turn
        assert text.startswith(closing, body_end), (
            f"{family.name}: {closing!r} expected after assistant message {i}, got {text[body_end : body_end + 30]!r}"
        )
        end = body_end + len(closing)
        if i in trained:
            regions.append((start, end))
        cursor = end
    return regions


def expected_labels(
    ids: Sequence[int], offsets: Sequence[tuple[int, int]], regions: Sequence[tuple[int, int]]
) -> list[int]:
    labels = []
    for k, (tok_id, (a, b)) in enumerate(zip(ids, offsets)):
        covered = range(a, b) if b > a else range(b - 1, b)  # a zero-width token stands for the char before
        hit = k > 0 and any(start <= c < end for c in covered for start, end in regions)
        labels.append(tok_id if hit else IGNORE_INDEX)
    return labels


def describe(tok: Any, seq: MaskedSequence, expected: list[int]) -> str:
    """The tokens where the mask differs, with their text."""
    rows = []
    for k, (got, want) in enumerate(zip(seq.labels, expected)):
        if got != want:
            a, b = seq.offsets[k]
            what = "trained, should not be" if want == IGNORE_INDEX else "not trained, should be"
            rows.append(
                f"  token {k} {seq.text[a:b]!r} (id {seq.input_ids[k]}): {what}; "
                f"context {seq.text[max(0, a - 25) : b + 25]!r}"
            )
    return "\n".join(rows)


def check(tok: Any, family: Family, seq: MaskedSequence, messages: Sequence[dict[str, str]], trained: set[int]) -> None:
    text = render(tok, family, messages)
    assert seq.text == text, f"{family.name}: losslab's text differs from apply_chat_template's"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert seq.input_ids == enc["input_ids"], f"{family.name}: tokens differ from tokenising the text alone"
    expected = expected_labels(
        enc["input_ids"], enc["offset_mapping"], expected_regions(family, text, messages, trained)
    )
    assert seq.labels == expected, f"{family.name}: mask differs from the expected one:\n{describe(tok, seq, expected)}"
    assert seq.weights == [0.0 if label == IGNORE_INDEX else 1.0 for label in seq.labels]
    # the same in words: no header / role token of this family is ever trained
    closing = family.end_of_turn + (family.end_of_text or "") + "".join(family.leads)
    never = {t for t in (family.bos, *family.special) if t is not None and t not in closing}
    trained_ids = {label for label in seq.labels if label != IGNORE_INDEX}
    leaked = sorted(t for t in never if tok.convert_tokens_to_ids(t) in trained_ids)
    assert not leaked, f"{family.name}: header tokens trained: {leaked}"


def build(tok: Any, family: Family, messages: list[dict[str, str]], **config: Any) -> list[MaskedSequence]:
    builder = MaskBuilder(tok, MaskConfig(template=template_of(family), **config))
    return list(builder.iter_sequences([{"messages": messages}]))


def assistants(messages: Sequence[dict[str, str]]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_concat_trains_every_assistant_turn(tokenizers, family: Family, conversation: str) -> None:
    tok = tokenizers[family.name]
    messages = messages_of(family, conversation)
    turns = assistants(messages)
    (seq,) = build(tok, family, messages, mask="assistant", strategy="concat")
    check(tok, family, seq, messages[: turns[-1] + 1], set(turns))


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_expand_trains_each_turn_in_its_own_sample(tokenizers, family: Family, conversation: str) -> None:
    tok = tokenizers[family.name]
    messages = messages_of(family, conversation)
    turns = assistants(messages)
    seqs = build(tok, family, messages, mask="assistant", strategy="expand")
    assert [s.turn for s in seqs] == turns
    for seq, i in zip(seqs, turns):
        check(tok, family, seq, messages[: i + 1], {i})


@pytest.mark.parametrize("strategy", ["concat", "expand"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_last_trains_only_the_final_assistant_turn(tokenizers, family: Family, strategy: str) -> None:
    tok = tokenizers[family.name]
    for conversation in sorted(CONVERSATIONS):
        messages = messages_of(family, conversation)
        last = assistants(messages)[-1]
        (seq,) = build(tok, family, messages, mask="last", strategy=strategy)
        check(tok, family, seq, messages[: last + 1], {last})


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_build_samples_gives_the_same_labels(tokenizers, family: Family) -> None:
    """The trainer's entry point (build_samples) agrees with the sequences checked above."""
    tok = tokenizers[family.name]
    messages = messages_of(family, "three_rounds")
    config = MaskConfig(template=template_of(family), mask="assistant", strategy="concat")
    (sample,) = build_samples([{"messages": messages}], tok, config)
    (seq,) = build(tok, family, messages, mask="assistant", strategy="concat")
    assert (sample["input_ids"], sample["labels"]) == (seq.input_ids, seq.labels)


def test_the_sweep_covers_at_least_twelve_families_with_their_files() -> None:
    assert len({f.name for f in FAMILIES}) == len(FAMILIES) >= 12
    files = {f.file for f in FAMILIES if f.file}
    assert files == {p.name for p in SWEEP.glob("*.jinja")}
    readme = (SWEEP / "README.md").read_text(encoding="utf-8")
    assert all(name in readme for name in files)  # every template's origin is recorded
