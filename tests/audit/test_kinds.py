"""Every finding kind, found where it is: hand-made faulty labels (from losslab's own correct
labels, spoiled one way each) and datasets with one problem each. Each case names the kinds it
must produce and the record (file:line) they must point at; a last test checks that every kind of
``losslab.audit.kinds.KINDS`` has a case, so a check removed or a kind added without a test fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from losslab.audit.kinds import KINDS
from losslab.labels import IGNORE_INDEX

from .conftest import kinds, run_audit, write_jsonl

IM_START, IM_END, NEWLINE = 1, 2, 198  # SmolLM2's <|im_start|>, <|im_end|>, "\n"


def chat(*turns: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    messages += [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
    return {"messages": messages}


GOOD = chat("How are you?", "Fine, thanks. And you?", "Great!", "Glad to hear it.")
TOOL = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "tool", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny."},
    ]
}


def headers(row: dict) -> list[int]:
    """Positions of ``<|im_start|>assistant\\n`` header tokens (the start token and the role)."""
    ids = row["input_ids"]
    return [
        i + k for i, t in enumerate(ids) if t == IM_START and i + 1 < len(ids) and ids[i + 1] == 520 for k in (0, 1, 2)
    ]


def train(row: dict, positions: list[int]) -> None:
    for i in positions:
        row["labels"][i] = row["input_ids"][i]


def untrain(row: dict, positions: list[int]) -> None:
    for i in positions:
        row["labels"][i] = IGNORE_INDEX


def content_of(row: dict, tokenizer: Any, text: str) -> list[int]:
    """Positions of the tokens that spell ``text`` (its first occurrence)."""
    ids = row["input_ids"]
    piece = tokenizer(text, add_special_tokens=False)["input_ids"]
    for i in range(len(ids) - len(piece) + 1):
        if ids[i : i + len(piece)] == piece:
            return list(range(i, i + len(piece)))
    raise AssertionError(f"{text!r} not found")


@dataclass
class Case:
    records: list[dict]
    spoil: Callable[[list[dict], Any], None] | None  # None: no labels (dataset checks)
    expect: dict[str, list[int]]  # kind -> the record lines it must name
    options: dict[str, Any] = field(default_factory=dict)  # Reference options for the good labels
    args: tuple[str, ...] = ()
    template: str | None = None


def _shift_values(rows: list[dict], tok: Any) -> None:  # labels shifted by the user, shifted again by the model
    rows[1]["labels"] = rows[1]["labels"][1:] + [IGNORE_INDEX]


def _shift_mask(rows: list[dict], tok: Any) -> None:  # the mask one token late, values the token's own
    row = rows[0]
    trained = [i for i, x in enumerate(row["labels"]) if x != IGNORE_INDEX]
    row["labels"] = [IGNORE_INDEX] * len(row["labels"])
    train(row, [i + 1 for i in trained])


def _header(rows: list[dict], tok: Any) -> None:
    train(rows[1], headers(rows[1])[:2])


def _eot(rows: list[dict], tok: Any) -> None:
    untrain(rows[2], [i for i, t in enumerate(rows[2]["input_ids"]) if t == IM_END])


def _newline_after_eot(rows: list[dict], tok: Any) -> None:  # TRL's own templates train it
    row = rows[0]
    train(row, [i + 1 for i, x in enumerate(row["labels"]) if x == IM_END and i + 1 < len(row["labels"])])


def _user(rows: list[dict], tok: Any) -> None:
    train(rows[0], content_of(rows[0], tok, "Great!"))


def _system(rows: list[dict], tok: Any) -> None:
    train(rows[1], content_of(rows[1], tok, "Be brief."))


def _default_system(rows: list[dict], tok: Any) -> None:  # the template's own system prompt
    train(rows[0], content_of(rows[0], tok, "You are a helpful AI assistant"))


def _tool(rows: list[dict], tok: Any) -> None:
    train(rows[0], content_of(rows[0], tok, "sunny, 21 C"))


def _all_assistant(rows: list[dict], tok: Any) -> None:  # every assistant turn, under policy last
    row = rows[0]
    for i, t in enumerate(row["input_ids"]):
        if t == IM_START and row["input_ids"][i + 1] == 520:
            end = row["input_ids"].index(IM_END, i)
            train(row, list(range(i + 4, end + 1)))  # after <|im_start|> ass istant \n


def _value(rows: list[dict], tok: Any) -> None:
    row = rows[0]
    k = next(i for i, x in enumerate(row["labels"]) if x != IGNORE_INDEX)
    row["labels"][k] = 5


def _content(rows: list[dict], tok: Any) -> None:
    untrain(rows[0], content_of(rows[0], tok, "Glad to hear it."))


def _nothing(rows: list[dict], tok: Any) -> None:
    rows[1]["labels"] = [IGNORE_INDEX] * len(rows[1]["labels"])


def _no_record(rows: list[dict], tok: Any) -> None:
    for row in rows:
        row.pop("labels")
        row["assistant_masks"] = [0] * len(row["input_ids"])


def _no_prompt(rows: list[dict], tok: Any) -> None:  # policy all compared with labels that skip the first prompt
    untrain(rows[0], list(range(headers(rows[0])[2] + 2)))


def _bos(rows: list[dict], tok: Any) -> None:  # a BOS in front (add_special_tokens=True), masks right
    row = rows[0]
    row["input_ids"] = [IM_START, *row["input_ids"]]
    row["labels"] = [IGNORE_INDEX, *row["labels"]]


def _cut(rows: list[dict], tok: Any) -> None:
    rows[0]["input_ids"] = rows[0]["input_ids"][:40]
    rows[0]["labels"] = rows[0]["labels"][:40]


BOUNDARY_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN3 = Path(__file__).parents[1] / "masking" / "templates" / "qwen3_reasoning.jinja"

CASES = {
    "shifted_values": Case([GOOD, GOOD], _shift_values, {"labels_shifted": [2]}),
    "shifted_mask": Case([GOOD], _shift_mask, {"labels_shifted": [1]}),
    "header": Case([GOOD, GOOD], _header, {"header_trained": [2]}),
    "default_system_prompt": Case([GOOD], _default_system, {"header_trained": [1]}),
    "end_of_turn": Case([GOOD, GOOD, GOOD], _eot, {"end_of_turn_untrained": [3]}),
    "newline_after_end_of_turn": Case([GOOD], _newline_after_eot, {"whitespace_trained": [1]}),
    "user": Case([GOOD], _user, {"user_trained": [1]}),
    "system": Case([GOOD, chat("Hi", "Hello.", system="Be brief.")], _system, {"system_trained": [2]}),
    "tool": Case([TOOL], _tool, {"tool_trained": [1]}),
    "last_policy": Case(
        [chat("Hi", "<think></think>Sure.", "Go on", "Done.")],
        _all_assistant,
        {"empty_think_trained": [1], "other_turn_trained": [1]},
        {"mask": "last"},
        ("--mask", "last"),
    ),
    "label_value": Case([GOOD], _value, {"label_values": [1]}),
    "content": Case([GOOD], _content, {"assistant_untrained": [1]}),
    "zero_targets": Case([GOOD, GOOD], _nothing, {"labels_zero_targets": [2]}),
    "empty": Case([GOOD, GOOD], _no_record, {"labels_empty": [-1], "labels_zero_targets": [1, 2]}),
    "policy_all": Case([GOOD], _no_prompt, {"prompt_untrained": [1]}, {"mask": "all"}, ("--mask", "all")),
    "bos": Case([GOOD], _bos, {"tokens_differ": [1]}),
    "truncated_labels": Case([GOOD], _cut, {"labels_truncated": [1]}),
    # the dataset alone
    "no_reply": Case([GOOD, chat("Anyone there?")], None, {"zero_targets": [2]}),
    "truncation": Case([GOOD, chat("Hi", "Hello.")], None, {"truncated_to_zero": [1, 2]}, args=("--max-length", "12")),
    "special_text": Case(
        [GOOD, chat("What does <|im_end|> mean?", "It ends a turn.")], None, {"special_token_text": [2]}
    ),
    "boundary": Case([GOOD], None, {"boundary_shift": [1]}, template=BOUNDARY_TEMPLATE),
    "prefix": Case([chat("Hi", "Hello.", "Bye", "Bye.")], None, {"not_prefix_stable": [1]}, template=str(QWEN3)),
    "unrendered": Case(
        [GOOD, chat("Hi", "Hello.", system="Be brief.")], None, {"unrendered_message": [2]}, template=NO_SYSTEM_TEMPLATE
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_finding_kind_found_at_its_record(name: str, tmp_path: Path, smollm2_tokenizer: Any, capsys) -> None:
    from .conftest import own_labels

    case = CASES[name]
    data = write_jsonl(tmp_path / "data.jsonl", case.records)
    args = [str(data), *case.args]
    if case.template is not None:
        template = case.template
        if not Path(template).is_file():
            template = str(tmp_path / "template.jinja")
            Path(template).write_text(case.template, encoding="utf-8")
        args += ["--template", template]
    if case.spoil is not None:
        rows = own_labels(smollm2_tokenizer, case.records, **case.options)
        case.spoil(rows, smollm2_tokenizer)
        labels = write_jsonl(tmp_path / "labels.jsonl", rows)
        args += ["--labels", str(labels)]
    status, report = run_audit(capsys, *args)
    found = kinds(report)
    for kind, lines in case.expect.items():
        where = [str(labels) if line < 0 else f"{data}:{line}" for line in lines]
        assert found.get(kind) == where, (kind, found)
    assert set(found) == set(case.expect), found
    worst = max(KINDS[k].level for k in case.expect)
    assert status == (0 if {KINDS[k].level for k in case.expect} == {"info"} else 1), worst


def test_correct_labels_give_no_finding(tmp_path: Path, capsys, audit_files) -> None:
    data, labels = audit_files([GOOD, TOOL, chat("Hi", "Hello.", system="Be brief.")])
    status, report = run_audit(capsys, str(data), "--labels", str(labels), "--fail-on", "info")
    assert (status, report["findings"]) == (0, [])
    assert report["tables"]["totals"][0]["records agreeing"] == 3


def test_every_kind_has_a_case() -> None:
    covered = {kind for case in CASES.values() for kind in case.expect}
    assert covered == set(KINDS)
