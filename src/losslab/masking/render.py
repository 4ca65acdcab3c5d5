"""Render chat and instruction records to text, and find where each message's content is.

A chat template is rendered once with the real contents; the spans of the contents in that
text come from a second render in which every content is wrapped in invisible markers
(private-use characters that no tokenizer sees, because they are removed again):

    lead + OPEN_i + core + CLOSE_i + trail        (core = content.strip())

The markers sit inside the content's own leading/trailing whitespace, so a template that
trims the content (``content | trim``) trims the same characters with or without markers.
The marked render, with the markers removed, must equal the real render; then the marker
positions are exact character offsets in the text the model will see. Where a template
treats marked content differently (it branches on the exact content) the messages are
marked one at a time; a message whose marker the template drops (a reasoning template
cutting ``<think>...</think>`` out of the content drops the OPEN marker with it) gets
``None`` for the lost side, and the caller falls back to the generation-prompt rule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from losslab.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Candidate marker alphabets (OPEN start, OPEN end, CLOSE start, CLOSE end); the first whose
# characters occur in no content of the conversation (and not in the template) is used.
_MARKER_SETS: tuple[tuple[str, str, str, str], ...] = (
    ("\ue000", "\ue001", "\ue002", "\ue003"),
    ("\U000f0000", "\U000f0001", "\U000f0002", "\U000f0003"),
    ("\U00100000", "\U00100001", "\U00100002", "\U00100003"),
    ("\ue0f0", "\ue0f1", "\ue0f2", "\ue0f3"),
)


@dataclass(frozen=True)
class ContentSpan:
    """Where a message's content lies in a rendered text: ``text[start:end]``.

    Either side is ``None`` when the template dropped or rewrote that end of the content
    so that it cannot be located.
    """

    start: int | None
    end: int | None

    @property
    def found(self) -> bool:
        return self.start is not None and self.end is not None


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation and one :class:`ContentSpan` per message."""

    text: str
    spans: tuple[ContentSpan, ...]


Message = Mapping[str, Any]  # {"role": str, "content": str, ...}


def load_template(template: str | Path) -> str:
    """A chat template: the Jinja text itself (anything containing ``{{`` or ``{%``) or a file."""
    if isinstance(template, str) and ("{{" in template or "{%" in template):
        return template
    path = Path(template).expanduser()
    if not path.is_file():
        raise UserError(f"chat template file not found: {path}")
    return path.read_text(encoding="utf-8")


def _compile(source: str) -> Any:
    # transformers' own sandboxed environment (trim_blocks, lstrip_blocks, loopcontrols,
    # raise_exception, tojson, strftime_now), cached by template text, so that the text
    # rendered here is exactly what ``tokenizer.apply_chat_template`` produces (tested).
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(source)


class ChatTemplate:
    """A Jinja chat template bound to a tokenizer's special-token variables."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str | Path | None = None) -> None:
        if template is None:
            source = tokenizer.chat_template
            if isinstance(source, dict):  # several named templates: take the default one
                source = source.get("default")
            if not source:
                raise UserError("the tokenizer has no chat template; give one with --template FILE (or data.template)")
        else:
            source = load_template(template)
        self.source: str = source
        self._compiled = _compile(source)
        self._variables = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages`` (roles and contents only)."""
        plain = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        try:
            return self._compiled.render(
                messages=plain, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **self._variables
            )
        except Exception as exc:  # jinja2.TemplateError from raise_exception, or a template bug
            raise UserError(f"the chat template failed on this conversation: {type(exc).__name__}: {exc}") from None

    def render_with_spans(self, messages: Sequence[Message], *, text: str | None = None) -> Rendered:
        """Render ``messages`` and locate every message's content in the text (see module doc).

        ``text``: the render of ``messages`` when the caller already has it.
        """
        if text is None:
            text = self.render(messages)
        contents = [str(m["content"]) for m in messages]
        marks = _pick_markers(contents, self.source)
        spans = _marked_spans(self, messages, range(len(messages)), marks, text)
        if spans is None:  # the template reacts to the markers: mark one message at a time
            spans = {}
            for i in range(len(messages)):
                one = _marked_spans(self, messages, (i,), marks, text)
                if one is not None:
                    spans.update(one)
        return Rendered(text, tuple(spans.get(i, ContentSpan(None, None)) for i in range(len(messages))))


def _pick_markers(contents: Sequence[str], template: str) -> tuple[str, str, str, str]:
    for marks in _MARKER_SETS:
        if not any(ch in c for c in (*contents, template) for ch in marks):
            return marks
    raise UserError("every marker character candidate occurs in this conversation; cannot locate message spans")


def _split_ws(content: str) -> tuple[str, str, str]:
    core = content.strip()
    if not core:
        return content, "", ""
    lead = content[: len(content) - len(content.lstrip())]
    trail = content[len(content.rstrip()) :]
    return lead, core, trail


def _marked_spans(
    template: ChatTemplate,
    messages: Sequence[Message],
    which: Sequence[int] | range,
    marks: tuple[str, str, str, str],
    text: str,
) -> dict[int, ContentSpan] | None:
    """Spans of the messages in ``which`` via one marked render; ``None`` if it changes the text."""
    o1, o2, c1, c2 = marks
    marked = []
    chosen = set(which)
    for i, m in enumerate(messages):
        content = str(m["content"])
        if i in chosen:
            lead, core, trail = _split_ws(content)
            content = f"{lead}{o1}{i}{o2}{core}{c1}{i}{c2}{trail}"
        marked.append({"role": m["role"], "content": content})
    rendered = template.render(marked)
    pattern = re.compile(f"{re.escape(o1)}(\\d+){re.escape(o2)}|{re.escape(c1)}(\\d+){re.escape(c2)}")
    pieces: list[str] = []
    opens: dict[int, int] = {}
    closes: dict[int, int] = {}
    pos = 0  # position in the text without markers
    last = 0
    for match in pattern.finditer(rendered):
        pieces.append(rendered[last : match.start()])
        pos += match.start() - last
        last = match.end()
        if match.group(1) is not None:
            opens[int(match.group(1))] = pos  # the last occurrence wins if a template repeats a content
        else:
            closes[int(match.group(2))] = pos
    pieces.append(rendered[last:])
    if "".join(pieces) != text:
        return None
    spans = {}
    for i in chosen:
        lead, _, trail = _split_ws(str(messages[i]["content"]))
        start, end = opens.get(i), closes.get(i)
        if start is not None and end is not None and end < start:
            start = end = None
        if start is not None and lead and text[start - len(lead) : start] == lead:
            start -= len(lead)  # the template kept the content's leading whitespace
        if end is not None and trail and text[end : end + len(trail)] == trail:
            end += len(trail)
        spans[i] = ContentSpan(start, end)
    return spans


# --- instruction records ------------------------------------------------------------------

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_STYLES = ("alpaca", "chat_template")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt (Taori et al. 2023) for an instruction and optional input."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def instruction_messages(instruction: str, input: str = "") -> list[dict[str, str]]:
    """An instruction record as a one-turn chat: the user turn is the instruction (and input)."""
    user = f"{instruction}\n\n{input}" if input else instruction
    return [{"role": "user", "content": user}]


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts a BOS token in front of plain text by itself."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == bos and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]
