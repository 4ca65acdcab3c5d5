"""Multi-turn strategies, the trained region of an assistant turn, and prefix stability.

Trained region of assistant turn ``i`` in a rendered text (character offsets):

- start: where the text leaves the prompt the model is given at inference,
  ``render(messages[:i], add_generation_prompt=True)``: everything the model has to generate
  after it is trained, template text included (Qwen3's empty ``<think>\n\n</think>\n\n`` in
  front of a plain reply, Mistral's space after ``[/INST]``). Never before the end of the
  message before, nor before the prompt's header (:attr:`ChatTemplate.reply_header`), nor
  after the content's start (marker render, :mod:`losslab.masking.render`). Where the prompt
  shows the history differently from the text (a reasoning template keeps a ``<think>`` block
  there that the whole conversation cuts), the text leaves it after the turn's header (else
  the turn starts with its content). A template without a generation prompt
  gets the header a probe reply follows (``[user, assistant "x"]``), less its trailing
  whitespace, added to its prompt: the model generates Mistral's space, not a header.
- end of turn ("close"): the text the template emits after the content both in this
  rendering and when the conversation ENDS at turn ``i`` (the common prefix of the two
  tails), with trailing whitespace removed unless it is all there is. That is
  ``<|im_end|>`` (ChatML), ``<|eot_id|>`` (Llama 3), ``<end_of_turn>`` (Gemma), ``</s>``
  (Mistral, Zephyr); never the next role header, which is absent when the conversation
  ends there, nor the newline between turns, which the model never generates (it stops
  at the end-of-turn token). Where the two tails part inside a token the tokenizer adds
  (Phi-3: ``<|end|>\n<|user|>`` against ``<|end|>\n<|endoftext|>`` share ``<|end|>\n<|``),
  the common text is cut back to before that token (:meth:`ChatTemplate.token_boundary`),
  so the turn trains ``<|end|>`` and never the next header, which rounding the region to
  whole tokens would otherwise take.

Strategies: ``concat`` renders the conversation up to its last trained turn once and
trains every trained turn in it; ``expand`` renders ``messages[:i+1]`` for each trained
turn ``i`` and trains only that turn; ``auto`` renders every ``messages[:i+1]`` (needed for
the end-of-turn rule anyway) and uses ``concat`` when each is a prefix of the last one
("prefix-stable": under causal attention both strategies then see the same tokens before
every trained token, so their per-token losses are equal), else ``expand``. Every
``messages[:i+1]`` is its exact render: for a one-pass template
(:attr:`ChatTemplate.loops_once`) all of them come from one observed render of the whole
(:meth:`ChatTemplate.render_prefixes`), for any other each is rendered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from losslab.errors import UserError
from losslab.masking.policies import MaskPolicy, is_trained
from losslab.masking.render import ChatTemplate, ContentSpan, common_prefix_len, plain_messages
from losslab.masking.spans import Region


class Strategy(str, Enum):
    AUTO = "auto"
    CONCAT = "concat"
    EXPAND = "expand"


def parse_strategy(value: str | Strategy) -> Strategy:
    try:
        return Strategy(value)
    except ValueError:
        raise UserError(f"unknown strategy {value!r}; choose one of: auto, concat, expand") from None


@dataclass
class TextSample:
    """One training sequence as text: trained character regions and where each message is."""

    text: str
    regions: list[Region]
    default_weight: float = 0.0  # weight of characters outside every region (1.0 under `all`)
    turn: int | None = None  # the single trained assistant message (expand), else None
    spans: tuple[ContentSpan, ...] = ()  # per message present in the text
    roles: tuple[str, ...] = ()
    contents: tuple[str, ...] = ()


@dataclass
class Plan:
    """The samples of one conversation and the strategy actually used."""

    samples: list[TextSample]
    strategy: Strategy
    prefix_stable: bool | None = None  # None: not checked (policy `all`, or nothing trained)


def close_text(tail: str) -> str:
    """The end-of-turn text from a tail: trailing whitespace removed unless it is all there is."""
    stripped = tail.rstrip()
    return stripped if stripped else tail


def plan_conversation(
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    *,
    policy: MaskPolicy,
    weights: Sequence[float],
    strategy: Strategy = Strategy.AUTO,
) -> Plan:
    """Training sequences (as text + regions) for one conversation.

    ``weights[i]`` is message i's token weight (role weight x message weight).
    """
    roles = tuple(str(m["role"]) for m in messages)
    assistants = [i for i, r in enumerate(roles) if r == "assistant"]
    if not assistants and policy is not MaskPolicy.ALL:
        raise UserError(
            "the conversation has no assistant turn, so nothing would be trained (mask policy "
            f"{policy.value!r}); add one, or use --mask all"
        )
    plain = plain_messages(messages)  # once: every prefix render below takes a slice of it
    if policy is MaskPolicy.ALL:
        prefixes = template.render_prefixes(plain, [i for i in assistants if i < len(messages) - 1])
        sample = _concat_sample(template, messages, assistants, prefixes, weights, all_messages=True)
        return Plan([sample], Strategy.CONCAT)
    trained = [
        i
        for i in assistants
        if weights[i] > 0 and is_trained(policy, "assistant", is_last_assistant=i == assistants[-1])
    ]
    if not trained:
        chosen = Strategy.CONCAT if strategy is Strategy.AUTO else strategy
        return Plan([], chosen)  # every trained turn has weight 0
    last = trained[-1]
    prefixes = template.render_prefixes(plain, trained)
    stable = all(prefixes[last].startswith(prefixes[i]) for i in trained[:-1])
    use_concat = strategy is Strategy.CONCAT or (strategy is Strategy.AUTO and stable)
    if use_concat or stable:
        whole = _concat_sample(template, messages[: last + 1], trained, prefixes, weights, all_messages=False)
        if use_concat:
            return Plan([whole], Strategy.CONCAT, stable)
        # prefix-stable: every expanded sample is a prefix of the whole text, with the same turn
        # region (the same spans, the same end-of-turn rule), so it is cut from the whole
        samples = [
            TextSample(
                prefixes[i],
                [region],
                turn=i,
                spans=whole.spans[: i + 1],
                roles=whole.roles[: i + 1],
                contents=whole.contents[: i + 1],
            )
            for i, region in zip(trained, whole.regions)
        ]
        return Plan(samples, Strategy.EXPAND, stable)
    samples = [_expand_sample(template, messages[: i + 1], prefixes[i], weights[i]) for i in trained]
    return Plan(samples, Strategy.EXPAND, stable)


def _turn_start(
    template: ChatTemplate, messages: Sequence[Mapping[str, Any]], i: int, text: str, span: ContentSpan, floor: int
) -> int:
    """Where assistant turn i's trained text starts (module doc): where the text leaves the
    prompt for the reply, if that lies between ``floor`` (the end of the message before) and
    the content's start, and never before the end of the prompt's header; else the content's
    start."""
    header, prompted = template.reply_header or ("", True)
    if span.start is not None and header and text.endswith(header, floor, span.start):
        return span.start  # the prompt's header right before the content: nothing else to generate
    at = -1  # the turn's header: its last copy before the content, else its first after the message before
    if header:
        at = (
            text.rfind(header, floor, span.start)
            if span.start is not None
            else text.find(header, floor, len(text) if span.end is None else span.end)
        )
    try:
        prompt: str | None = template.render(messages[:i], add_generation_prompt=True) + ("" if prompted else header)
    except UserError:  # e.g. a template that needs a message before the generation prompt
        prompt = None
    if prompt is not None and text.startswith(prompt):
        left = max(len(prompt), at + len(header) if at >= 0 else 0)
    elif at >= 0:
        # the prompt shows the history differently (a reasoning template keeps a <think> block
        # there that the whole conversation cuts): the text leaves it after the turn's header
        left = at + len(header)
    elif span.start is None:
        left = floor if prompt is None else common_prefix_len(text, prompt)
    else:
        return span.start
    start = max(floor, left) if span.start is None else span.start
    return left if floor <= left < start else start


def _expand_sample(
    template: ChatTemplate, messages: Sequence[Mapping[str, Any]], text: str, weight: float
) -> TextSample:
    i = len(messages) - 1
    rendered = template.render_with_spans(messages, text=text)
    span = rendered.spans[i]
    floor = max((s.end for s in rendered.spans[:i] if s.end is not None), default=0)
    start = _turn_start(template, messages, i, text, span, floor)
    body_end = span.end if span.end is not None else start
    end = body_end + len(close_text(text[body_end:]))
    return TextSample(
        text,
        [Region(start, end, weight, i)],
        turn=i,
        spans=rendered.spans,
        roles=_roles(messages),
        contents=_contents(messages),
    )


def _concat_sample(
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    turns: Sequence[int],
    prefixes: Mapping[int, str],
    weights: Sequence[float],
    *,
    all_messages: bool,
) -> TextSample:
    """One sequence for ``messages`` (rendered whole) training the assistant ``turns``.

    ``prefixes[i]`` is ``render(messages[:i+1])`` for each turn that is not the last
    message. With ``all_messages`` every other message's content is a region too, and
    template text has weight 1 (policy ``all``).
    """
    n = len(messages)
    text = prefixes.get(n - 1) or template.render(messages)
    rendered = template.render_with_spans(messages, text=text)
    spans = rendered.spans
    regions: list[Region] = []
    floor = 0
    turn_set = set(turns)
    for i in range(n):
        span = spans[i]
        if i not in turn_set:
            if all_messages and span.found:
                regions.append(Region(span.start, span.end, weights[i], i))  # type: ignore[arg-type]
            floor = max(floor, span.end or 0)
            continue
        start = _turn_start(template, messages, i, text, span, floor)
        body_end = span.end if span.end is not None else start
        if i == n - 1:
            tail = text[body_end:]
        elif text.startswith(prefixes[i]):  # the conversation ending here renders as a prefix
            tail = text[body_end : len(prefixes[i])]
        else:  # history is rendered differently when the conversation continues
            alone = template.render_with_spans(messages[: i + 1], text=prefixes[i])
            end_alone = alone.spans[i].end
            if span.end is None or end_alone is None:
                raise UserError(
                    f"the chat template rewrites assistant message {i + 1} so that its end cannot be "
                    "found in the whole conversation; use --strategy expand (or auto)"
                )
            tail = text[body_end : body_end + common_prefix_len(text[body_end:], prefixes[i][end_alone:])]
        if i < n - 1:  # the tail is cut where the two texts part: never inside a token the tokenizer adds
            tail = text[body_end : template.token_boundary(text, body_end + len(tail), body_end)]
        end = body_end + len(close_text(tail))
        regions.append(Region(start, end, weights[i], i))
        floor = end
    return TextSample(
        text,
        _clip(regions),
        default_weight=1.0 if all_messages else 0.0,
        spans=spans,
        roles=_roles(messages),
        contents=_contents(messages),
    )


def _roles(messages: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    return tuple(str(m["role"]) for m in messages)


def _contents(messages: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    return tuple(str(m["content"]) for m in messages)


def _clip(regions: list[Region]) -> list[Region]:
    """Sort regions and cut any overlap (a region never runs into the next one)."""
    regions = sorted(regions, key=lambda r: r.start)
    out: list[Region] = []
    for r in regions:
        if out and r.start < out[-1].end:
            prev = out[-1]
            out[-1] = Region(prev.start, r.start, prev.weight, prev.message)
        out.append(r)
    return out
