"""Render chat and instruction records to text, and find where each message's content is.

A chat template is rendered once with the real contents; the spans of the contents in that
text come from a second render in which every content is wrapped in invisible markers
(private-use characters that no tokenizer sees, because they are removed again):
``OPEN_i + content + CLOSE_i``. The marked render, with the markers removed, must equal the
real render; then the marker positions are exact character offsets in the text the model
will see. A template that trims contents (``content | trim``) would keep whitespace that sits
between the markers, so the equality fails and the markers go INSIDE the whitespace instead
(``lead + OPEN_i + core + CLOSE_i + trail``), where trimming removes the same characters as
in the real render. Where a template branches on the exact content, the messages are marked
one at a time. A message whose marker the template drops (a reasoning template cutting
``<think>...</think>`` out of the content drops the OPEN marker with it) gets ``None`` for
the lost side, and the caller falls back to the generation-prompt rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from losslab.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Marker characters (OPEN start, OPEN end, CLOSE start, CLOSE end): private-use code points;
# when a conversation or the template contains any of them, others from the supplementary
# private-use planes are picked that it does not contain.
_MARKERS = ("\ue000", "\ue001", "\ue002", "\ue003")
_SPARE_MARKERS = range(0xF0000, 0x10FFFE)


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
    """A chat template: the Jinja text itself (anything containing ``{{`` or ``{%``) or a file.

    A file is compiled here, so a syntax error names the file and line (``UserError``)."""
    if isinstance(template, str) and ("{{" in template or "{%" in template):
        return template
    path = Path(template).expanduser()
    if not path.is_file():
        raise UserError(f"chat template file not found: {path}")
    raw = path.read_bytes()
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"chat template is not UTF-8 (byte {exc.start + 1})", where=f"{path}:{line}") from None
    _compile(source, origin=str(path))
    return source


def _compile(source: str, origin: str | None = None) -> Any:
    # transformers' own sandboxed environment (trim_blocks, lstrip_blocks, loopcontrols,
    # raise_exception, tojson, strftime_now), cached by template text, so that the text
    # rendered here is exactly what ``tokenizer.apply_chat_template`` produces (tested).
    # A template is untrusted input: a syntax error is a UserError naming ``origin`` (the
    # template's file) and the line.
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        return _compile_jinja_template(source)
    except TemplateSyntaxError as exc:  # TemplateAssertionError too (an unknown filter or test)
        where = f"{origin}:{exc.lineno}" if origin else f"the chat template, line {exc.lineno}"
        raise UserError(f"invalid Jinja chat template: {exc.message}", where=where) from None


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
        self._compiled = _with_cached_checks(_compile(source), source)
        self._variables = dict(tokenizer.special_tokens_map)  # bos_token, eos_token, ... as apply_chat_template
        # added tokens (<|end|>, <|user|>, ...): the tokenizer cuts a text at these before anything else,
        # so a trained region that ends inside one would be rounded up to the whole token
        added = [tok for tok in tokenizer.added_tokens_decoder.values() if tok.content]
        contents = sorted({tok.content for tok in added}, key=len, reverse=True)  # longest first: leftmost-longest
        self._added = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._added_longest = len(contents[0]) if contents else 0
        self._lstrip = frozenset(tok.content for tok in added if getattr(tok, "lstrip", False))

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages`` (roles and contents only)."""
        return self.render_plain(plain_messages(messages), add_generation_prompt=add_generation_prompt)

    def render_plain(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        """:meth:`render` for messages that are already :func:`plain_messages` (not copied again;
        the sandbox forbids a template to change them)."""
        try:
            return str(
                self._compiled.render(
                    messages=messages,
                    tools=None,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **self._variables,
                )
            )
        except Exception as exc:  # noqa: BLE001  (jinja2.TemplateError from raise_exception, or a template bug)
            raise UserError(f"the chat template failed on this conversation: {type(exc).__name__}: {exc}") from None

    def token_boundary(self, text: str, pos: int, floor: int) -> int:
        """``pos`` moved back (not below ``floor``) so that ``text[:pos]`` does not end inside an added token.

        An added token whose text ``pos`` cuts (``<|end|>\n<|`` cuts ``<|user|>``) is left out
        whole, with the whitespace in front of it when the token takes that too (``lstrip``).
        """
        if self._added is None or pos <= floor:
            return pos
        for match in self._added.finditer(text, max(0, floor - self._added_longest + 1), pos + self._added_longest):
            if match.start() >= pos:
                break
            if match.end() > pos:  # pos falls inside this token
                cut = match.start()
                if match.group() in self._lstrip:
                    cut = len(text[:cut].rstrip())
                return max(floor, cut)
        return pos

    @cached_property
    def loops_once(self) -> bool:
        """Whether the template is one pass over ``messages`` (:func:`_one_pass`), so that every
        prefix's render can be cut from one observed render of the whole (:meth:`render_prefixes`)."""
        try:
            return _one_pass(self._compiled.environment.parse(self.source))
        except Exception:  # noqa: BLE001  (a template the parser refuses is rendered prefix by prefix)
            return False

    def render_prefixes(self, messages: list[dict[str, str]], ends: Sequence[int]) -> dict[int, str]:
        """``{i: render_plain(messages[: i + 1]) for i in ends}`` (plain messages, ``i`` ascending).

        For a one-pass template (:attr:`loops_once`) the text of ``messages[:k]`` is everything
        the template writes before it asks for message ``k``, then what it writes after its
        loop (which depends on no message), so ONE render of ``messages[: max(ends) + 1]``,
        noting where each message is asked for, gives every prefix's exact text. Any other
        template, or a render that fails, is rendered prefix by prefix.
        """
        if not ends:
            return {}
        if self.loops_once:
            observed = _Observed(messages[: max(ends) + 1])
            pieces: list[str] = []
            try:
                for piece in self._compiled.generate(
                    messages=observed, tools=None, documents=None, add_generation_prompt=False, **self._variables
                ):
                    pieces.append(piece)
                    observed.written += len(piece)
            except Exception:  # noqa: BLE001, S110  (rendered one by one below, for the same error as before)
                pass
            else:
                text, asked = "".join(pieces), observed.asked
                if len(asked) == len(observed) + 1:  # the loop asked for every message, then for the end
                    after = text[asked[-1] :]
                    return {i: text[: asked[i + 1]] + after for i in ends}
        return {i: self.render_plain(messages[: i + 1]) for i in ends}

    @cached_property
    def reply_header(self) -> tuple[str, bool] | None:
        """``(header, prompted)``: what the prompt for a reply adds after a user turn (probe ``x``).

        ``prompted``: the generation prompt adds it (``<|im_start|>assistant\n``). A template
        without a generation prompt gives the text a probe reply's content follows, less its
        trailing whitespace, which the model generates: Mistral's prompt ends with ``[/INST]``
        and the reply with ``" "`` in front is generated, so its header is "". None if the
        template refuses the probe.
        """
        user = [{"role": "user", "content": "x"}]
        try:
            before, prompt = self.render(user), self.render(user, add_generation_prompt=True)
            if prompt != before:
                return (prompt[len(before) :], True) if prompt.startswith(before) else None
            probe = self.render_with_spans([*user, {"role": "assistant", "content": "x"}])
        except UserError:
            return None
        header_end = probe.spans[1].start
        if header_end is None:
            return None
        return probe.text[common_prefix_len(before, probe.text) : header_end].rstrip(), False

    def render_with_spans(self, messages: Sequence[Message], *, text: str | None = None) -> Rendered:
        """Render ``messages`` and locate every message's content in the text (see module doc).

        ``text``: the render of ``messages`` when the caller already has it.
        """
        if text is None:
            text = self.render(messages)
        contents = [str(m["content"]) for m in messages]
        marks = _pick_markers(contents, self.source)
        everything = range(len(messages))
        spans = _marked_spans(self, messages, everything, marks, text, inner=False)
        if spans is None:  # the template trims contents: markers inside the whitespace
            spans = _marked_spans(self, messages, everything, marks, text, inner=True)
        if spans is None:  # the template reacts to the markers: mark one message at a time
            spans = {}
            for i in everything:
                one = _marked_spans(self, messages, (i,), marks, text, inner=False)
                one = one if one is not None else _marked_spans(self, messages, (i,), marks, text, inner=True)
                spans.update(one or {})
        return Rendered(text, tuple(spans.get(i, ContentSpan(None, None)) for i in everything))


def plain_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Messages as the template sees them: plain dicts of a ``str`` role and content."""
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def _with_cached_checks(compiled: Any, source: str) -> Any:
    """The same template, compiled in a copy of its sandboxed environment that remembers its
    attribute checks.

    Every ``loop.first`` or ``message.content`` in a template costs a sandbox check
    (``is_safe_attribute``), which for Jinja's sandboxes depends only on the object's type and
    the attribute's name (internal attributes, underscores, methods that modify a list, dict
    or set), never on the value; rendering every prefix of a conversation spends most of its
    time there. The answer is kept per (type, name) and computed by the sandbox itself the
    first time, so the same accesses are allowed and refused as before. An environment whose
    check is not one of Jinja's own (it might look at the value) is left as it is. The
    environment is an overlay: the template that ``transformers`` caches for
    ``apply_chat_template`` is not changed.
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment

    env = compiled.environment
    check = type(env).is_safe_attribute
    if check not in (ImmutableSandboxedEnvironment.is_safe_attribute, SandboxedEnvironment.is_safe_attribute):
        return compiled
    fast = env.overlay()
    known: dict[tuple[type, str], bool] = {}

    def is_safe_attribute(obj: Any, attr: str, value: Any) -> bool:
        kind = type(obj)
        safe = known.get((kind, attr))
        if safe is None:
            safe = bool(check(fast, obj, attr, value))
            if obj.__class__ is kind:  # an object that reports another class is checked every time
                known[(kind, attr)] = safe
        return safe

    fast.is_safe_attribute = is_safe_attribute
    return fast.from_string(source)


class _Observed(list):  # type: ignore[type-arg]
    """The messages list of a render that notes how much text was written when the template's
    loop asked for each message (``asked[k]``) and for the end of the list (``asked[-1]``)."""

    def __init__(self, items: list[dict[str, str]]) -> None:
        super().__init__(items)
        self.written = 0
        self.asked: list[int] = []

    def __iter__(self) -> Iterator[dict[str, str]]:
        for item in list.__iter__(self):
            self.asked.append(self.written)
            yield item
        self.asked.append(self.written)


# What a one-pass template may contain (module jinja2.nodes): output, conditions, and
# expressions without side effects. No assignment, macro, call block ({% generation %}),
# include, filter block, break/continue, ...
_ONE_PASS_NODES = (
    "Template",
    "Output",
    "TemplateData",
    "Const",
    "If",
    "For",
    "Name",
    "Getattr",
    "Getitem",
    "Slice",
    "BinExpr",
    "UnaryExpr",
    "Concat",
    "Compare",
    "Operand",
    "CondExpr",
    "Filter",
    "Test",
    "Call",
    "Keyword",
    "List",
    "Tuple",
    "Dict",
    "Pair",
)
_PURE_FILTERS = frozenset(
    {
        "trim",
        "length",
        "count",
        "upper",
        "lower",
        "string",
        "tojson",
        "replace",
        "default",
        "d",
        "first",
        "last",
        "join",
        "list",
        "capitalize",
        "title",
        "int",
        "float",
        "abs",
        "round",
        "indent",
        "wordcount",
        "safe",
        "items",
        "e",
        "escape",
        "center",
        "truncate",
        "striptags",
        "reverse",
        "sort",
        "unique",
        "min",
        "max",
        "sum",
        "map",
        "select",
        "reject",
        "selectattr",
        "rejectattr",
        "attr",
        "batch",
        "slice",
        "dictsort",
        "format",
        "groupby",
    }
)
_PURE_METHODS = frozenset(
    {
        "strip",
        "lstrip",
        "rstrip",
        "split",
        "rsplit",
        "splitlines",
        "startswith",
        "endswith",
        "upper",
        "lower",
        "title",
        "capitalize",
        "replace",
        "find",
        "rfind",
        "count",
        "join",
        "partition",
        "rpartition",
        "get",
        "items",
        "keys",
        "values",
    }
)
_PREFIX_LOOP_ATTRIBUTES = frozenset({"first", "index", "index0"})  # never loop.last, loop.length, loop.revindex


def _one_pass(template: Any) -> bool:
    """Whether a parsed template is ``pre + for message in messages: body + post`` where ``pre``
    and ``body`` see of ``messages`` only ``messages[0]`` and the loop's own message, ``body``
    sees of the loop only ``loop.first`` / ``loop.index`` / ``loop.index0`` (nothing about the
    messages after it), nothing is assigned, and every call, filter and test is a pure function
    (or ``raise_exception``). Then a template run on ``messages[:k]`` runs exactly as on the
    whole list until its loop asks for message ``k``, and writes the same ``post`` after its
    loop. A conservative check: anything else, e.g. ``loop.last``, ``messages | length``,
    ``messages[-1]``, ``{% set %}``, a namespace, is False.
    """
    from jinja2 import nodes

    allowed = tuple(getattr(nodes, name) for name in _ONE_PASS_NODES)
    loops = list(template.find_all(nodes.For))
    if len(loops) != 1 or loops[0] not in template.body:  # one loop, at the top level
        return False
    (loop,) = loops
    if not (
        isinstance(loop.target, nodes.Name)
        and isinstance(loop.iter, nodes.Name)
        and loop.iter.name == "messages"
        and not loop.recursive
        and loop.test is None
        and not loop.else_
    ):
        return False

    def ok(node: Any, parent: Any, in_loop: bool) -> bool:
        if not isinstance(node, allowed):
            return False
        if isinstance(node, nodes.Name):
            if node.ctx != "load":
                return node is loop.target
            if node.name == "messages":
                return node is loop.iter or (
                    isinstance(parent, nodes.Getitem)
                    and parent.node is node
                    and isinstance(parent.arg, nodes.Const)
                    and type(parent.arg.value) is int
                    and parent.arg.value == 0
                )
            if node.name == "loop":
                return in_loop and isinstance(parent, nodes.Getattr) and parent.attr in _PREFIX_LOOP_ATTRIBUTES
            return node.name not in ("self", "varargs", "kwargs", "caller")
        if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            return False
        if isinstance(node, nodes.Filter) and (node.node is None or node.name not in _PURE_FILTERS):
            return False
        if isinstance(node, nodes.Call):
            if node.dyn_args is not None or node.dyn_kwargs is not None:
                return False
            callee = node.node
            if not (
                (isinstance(callee, nodes.Name) and callee.name == "raise_exception")
                or (isinstance(callee, nodes.Getattr) and callee.attr in _PURE_METHODS)
            ):
                return False
        inside = in_loop or node is loop
        return all(
            ok(child, node, inside and not (node is loop and child is loop.iter)) for child in node.iter_child_nodes()
        )

    return ok(template, None, False)


def common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search over C-level slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _pick_markers(contents: Sequence[str], template: str) -> tuple[str, str, str, str]:
    texts = (*contents, template)
    if not any(ch in t for t in texts for ch in _MARKERS):
        return _MARKERS
    used = set().union(*map(set, texts))
    spare = (chr(c) for c in _SPARE_MARKERS if chr(c) not in used)
    return next(spare), next(spare), next(spare), next(spare)


def _wrap(content: str, i: int, marks: tuple[str, str, str, str], *, inner: bool) -> str:
    o1, o2, c1, c2 = marks
    if not inner:
        return f"{o1}{i}{o2}{content}{c1}{i}{c2}"
    core = content.strip()
    if not core:  # whitespace only: a trimming template renders nothing of it
        return f"{content}{o1}{i}{o2}{c1}{i}{c2}"
    lead = content[: len(content) - len(content.lstrip())]
    trail = content[len(content.rstrip()) :]
    return f"{lead}{o1}{i}{o2}{core}{c1}{i}{c2}{trail}"


def _marked_spans(
    template: ChatTemplate,
    messages: Sequence[Message],
    which: Sequence[int] | range,
    marks: tuple[str, str, str, str],
    text: str,
    *,
    inner: bool,
) -> dict[int, ContentSpan] | None:
    """Spans of the messages in ``which`` from one marked render; ``None`` if the marked render,
    markers removed, is not ``text`` (the template reacts to the markers)."""
    o1, o2, c1, c2 = marks
    chosen = set(which)
    marked = [
        {
            "role": str(m["role"]),
            "content": _wrap(str(m["content"]), i, marks, inner=inner) if i in chosen else str(m["content"]),
        }
        for i, m in enumerate(messages)
    ]
    try:
        rendered = template.render_plain(marked)
    except UserError:  # the template refuses the marked contents: as good as a different text
        return None
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
        start, end = opens.get(i), closes.get(i)
        if start is not None and end is not None and end < start:
            start = end = None
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
    return (
        bool(with_special)
        and with_special[0] == bos
        and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]
    )
