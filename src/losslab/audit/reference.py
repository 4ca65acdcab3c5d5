"""losslab's own mask of one record, token by token, with what each token is.

A :class:`RecordView` is the record rendered by its chat template (the whole conversation, one
sequence, as other frameworks render it), tokenised once, with per token:

- ``trained``: losslab's mask for the chosen policy (``masking/``: the content of the trained
  assistant turns, the text the model generates before it, and the end-of-turn text after
  it; never the first token, which nothing predicts), cut to ``max_length``;
- ``part``: a :class:`Part` (template text, a role's content, end-of-turn, reply lead, empty
  reasoning block), from the character under the token's last character;
- ``message``: the index of the message the token belongs to (-1: template text between).

It also carries what the dataset checks need: whether the template is prefix-stable, where
each trained turn starts (the prompt/answer boundary), special-token text typed inside a
message, messages the template did not render.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np

from losslab.data.records import Source
from losslab.data.schemas import ChatRecord, InstructionRecord
from losslab.errors import UserError
from losslab.labels import IGNORE_INDEX
from losslab.masking import MaskConfig
from losslab.masking.policies import MaskPolicy, message_weight, parse_policy
from losslab.masking.render import ChatTemplate, instruction_messages
from losslab.masking.spans import Region, label_tokens
from losslab.masking.strategy import Strategy, TextSample, plan_conversation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Part(IntEnum):
    """What a token of a rendered conversation is."""

    TEMPLATE = 0  # text the template adds: role headers, separators, a default system prompt
    SYSTEM = 1  # a system message's content
    USER = 2
    ASSISTANT = 3
    TOOL = 4
    END_OF_TURN = 5  # the text after an assistant content that ends the turn (<|im_end|>, <|eot_id|>)
    REPLY_LEAD = 6  # template text the model generates before a reply's content (Mistral's space)
    EMPTY_THINK = 7  # an empty reasoning block, <think></think> with only whitespace inside


PART_NAMES = {p: p.name.lower() for p in Part}
ROLE_PART = {"system": Part.SYSTEM, "user": Part.USER, "assistant": Part.ASSISTANT, "tool": Part.TOOL}
EMPTY_THINK = re.compile(r"<think>\s*</think>")
WINDOW = 32  # characters of an answer tokenised alone for the prompt/answer boundary check


@dataclass
class RecordView:
    """One record as losslab renders, tokenises and masks it (arrays of length T)."""

    source: Source
    text: str
    offsets: list[tuple[int, int]]
    input_ids: np.ndarray  # (T,) int64
    starts: np.ndarray  # (T,) int64, first character of each token
    ends: np.ndarray  # (T,) int64, one past its last character
    trained: np.ndarray  # (T,) bool, losslab's mask
    part: np.ndarray  # (T,) int8, a Part per token
    message: np.ndarray  # (T,) int32, message index or -1
    roles: tuple[str, ...]
    full_length: int  # tokens before truncation
    full_trained: int  # trained tokens before truncation
    prefix_stable: bool | None  # None: not known (policy all, or nothing trained)
    turn_starts: list[int] = field(default_factory=list)  # character where each trained turn starts
    specials: list[str] = field(default_factory=list)  # special-token texts typed inside messages
    unrendered: list[int] = field(default_factory=list)  # messages with content the template left out
    policy: MaskPolicy = MaskPolicy.ASSISTANT

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    def token_text(self, i: int) -> str:
        start, end = self.offsets[i]
        return self.text[start:end]


class Reference:
    """Builds :class:`RecordView` objects under one mask policy and template."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        mask: str | None = None,
        template: str | None = None,
        max_length: int | None = None,
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("the audit needs a fast tokenizer (character offsets); this one is not")
        self.tokenizer = tokenizer
        self.config = MaskConfig(mask=mask, template=template, max_length=max_length, strategy="concat")
        self.template = ChatTemplate(tokenizer, template)
        self.vocab_size = len(tokenizer)
        added = tokenizer.added_tokens_decoder
        # added tokens a text is cut at before anything else (one that strips whitespace on its
        # left would take the text's whitespace, so it is no clean cut)
        self.boundaries = np.array(
            sorted(i for i, tok in added.items() if not getattr(tok, "lstrip", False)), dtype=np.int64
        )
        specials = sorted({t.content for t in added.values() if t.special and t.content}, key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._piece_cache: dict[str, list[int]] = {}

    # -- tokenising ---------------------------------------------------------------------------

    def token_name(self, token: int) -> str:
        """A token id's text (its id in brackets when it has none)."""
        if not 0 <= token < self.vocab_size:
            return f"[{token}]"
        return str(self.tokenizer.decode([token])) or f"[{token}]"

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``(ids, offsets)`` as ``tokenizer(text, add_special_tokens=False)`` gives them."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            enc = backend.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]

    def encode_pieces(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, each tokenised alone (repeated texts once)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._piece_cache]
        if todo:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is not None and backend.truncation is None and backend.padding is None:
                encoded = [e.ids for e in backend.encode_batch(todo, add_special_tokens=False)]
            else:
                encoded = self.tokenizer(todo, add_special_tokens=False)["input_ids"]
            if len(self._piece_cache) > 50_000:
                self._piece_cache.clear()
            self._piece_cache.update(zip(todo, encoded))
        return [self._piece_cache[t] for t in texts]

    # -- one record ---------------------------------------------------------------------------

    def messages(self, record: ChatRecord | InstructionRecord) -> tuple[list[dict[str, Any]], MaskPolicy]:
        """The record as messages, and the policy that applies to its kind."""
        if isinstance(record, InstructionRecord):
            messages = [
                *instruction_messages(record.instruction, record.input),
                {"role": "assistant", "content": record.output},
            ]
            return messages, parse_policy(self.config.mask, "instruction")
        return [m.model_dump() for m in record.messages], parse_policy(self.config.mask, "chat")

    def view(self, record: ChatRecord | InstructionRecord, source: Source) -> RecordView:
        """losslab's mask of ``record`` with every token's part (a template failure: ``UserError``)."""
        messages, policy = self.messages(record)
        weights = [message_weight(m["role"], m.get("weight"), self.config.role_weights) for m in messages]
        sample, stable = self._sample(messages, policy, weights)
        ids, offsets = self.encode(sample.text)
        labels, _ = label_tokens(ids, offsets, sample.regions, default_weight=sample.default_weight)
        trained = np.asarray(labels, dtype=np.int64) != IGNORE_INDEX
        if len(trained):
            trained[0] = False  # nothing predicts the first token
        offs = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets)).reshape(-1, 2)
        part, message = self._parts(sample, policy, offs[:, 1])
        full_length, full_trained = len(ids), int(trained.sum())
        keep = len(ids) if self.config.max_length is None else min(len(ids), self.config.max_length)
        view = RecordView(
            source=source,
            text=sample.text,
            offsets=list(offsets[:keep]),
            input_ids=np.asarray(ids[:keep], dtype=np.int64),
            starts=offs[:keep, 0],
            ends=offs[:keep, 1],
            trained=trained[:keep],
            part=part[:keep],
            message=message[:keep],
            roles=sample.roles,
            full_length=full_length,
            full_trained=full_trained,
            prefix_stable=stable,
            turn_starts=[r.start for r in sample.regions] if policy is not MaskPolicy.ALL else [],
            policy=policy,
        )
        view.specials = self._typed_specials(sample)
        view.unrendered = [
            i
            for i, (span, content) in enumerate(zip(sample.spans, sample.contents))
            if span.start is None and span.end is None and content.strip() and content.strip() not in sample.text
        ]
        return view

    def _sample(
        self, messages: list[dict[str, Any]], policy: MaskPolicy, weights: list[float]
    ) -> tuple[TextSample, bool | None]:
        """One text for the whole conversation with losslab's trained regions (concat)."""
        has_reply = any(m["role"] == "assistant" for m in messages)
        if policy is MaskPolicy.ALL or has_reply:
            plan = plan_conversation(self.template, messages, policy=policy, weights=weights, strategy=Strategy.CONCAT)
            if plan.samples:
                sample = plan.samples[0]
                if len(sample.roles) < len(messages):  # messages after the last trained turn: render them too
                    sample = self._extend(sample, messages)
                return sample, plan.prefix_stable
        rendered = self.template.render_with_spans(messages)  # nothing trained: the text alone
        return (
            TextSample(
                rendered.text,
                [],
                spans=rendered.spans,
                roles=tuple(str(m["role"]) for m in messages),
                contents=tuple(str(m["content"]) for m in messages),
            ),
            None,
        )

    def _extend(self, sample: TextSample, messages: list[dict[str, Any]]) -> TextSample:
        """``sample`` (the conversation up to its last trained turn) as part of the whole
        conversation's render, when that render starts with it; else ``sample`` unchanged."""
        rendered = self.template.render_with_spans(messages)
        if not rendered.text.startswith(sample.text):
            return sample
        return TextSample(
            rendered.text,
            sample.regions,
            default_weight=sample.default_weight,
            spans=rendered.spans,
            roles=tuple(str(m["role"]) for m in messages),
            contents=tuple(str(m["content"]) for m in messages),
        )

    def _parts(self, sample: TextSample, policy: MaskPolicy, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(part, message)`` per token, from a per-character map of the text."""
        n = len(sample.text)
        part_c = np.zeros(n + 1, dtype=np.int8)
        msg_c = np.full(n + 1, -1, dtype=np.int32)
        for i, (span, role) in enumerate(zip(sample.spans, sample.roles)):
            if span.found:
                part_c[span.start : span.end] = ROLE_PART.get(role, Part.TEMPLATE)
                msg_c[span.start : span.end] = i
        if policy is not MaskPolicy.ALL:
            closes = {self._mark_turn(region, sample, part_c, msg_c) for region in sample.regions} - {""}
            trained = {r.message for r in sample.regions}
            for i, (span, role) in enumerate(zip(sample.spans, sample.roles)):
                if role != "assistant" or i in trained or span.end is None:
                    continue  # an assistant turn the policy leaves out: its end-of-turn is marked too
                close = next((c for c in closes if sample.text.startswith(c, span.end)), "")
                part_c[span.end : span.end + len(close)] = Part.END_OF_TURN
                msg_c[span.end : span.end + len(close)] = i
        for match in EMPTY_THINK.finditer(sample.text):
            part_c[match.start() : match.end()] = Part.EMPTY_THINK
        at = np.clip(ends - 1, 0, n)  # a token is what its last character is
        return part_c[at], msg_c[at]

    @staticmethod
    def _mark_turn(region: Region, sample: TextSample, part_c: np.ndarray, msg_c: np.ndarray) -> str:
        """Mark the template text inside a trained turn: before the content (reply lead) and after
        it (end of turn); returns the end-of-turn text."""
        span = sample.spans[region.message] if 0 <= region.message < len(sample.spans) else None
        content_start = span.start if span is not None and span.start is not None else region.end
        content_end = span.end if span is not None and span.end is not None else region.start
        lead = slice(region.start, max(region.start, min(content_start, region.end)))
        tail = slice(min(region.end, max(content_end, region.start)), region.end)
        for piece, kind in ((lead, Part.REPLY_LEAD), (tail, Part.END_OF_TURN)):
            template_text = part_c[piece] == Part.TEMPLATE
            part_c[piece][template_text] = kind
            msg_c[piece][template_text] = region.message
        return sample.text[tail]

    def _typed_specials(self, sample: TextSample) -> list[str]:
        if self._specials is None:
            return []
        found = []
        for span in sample.spans:
            if span.found:
                found += self._specials.findall(sample.text, span.start, span.end)  # type: ignore[arg-type]
        return found

    # -- the prompt/answer boundary -----------------------------------------------------------

    def boundary_shifts(self, view: RecordView) -> list[tuple[int, list[int], list[int]]]:
        """Trained turns whose tokens differ when prompt and answer are tokenised apart.

        For each trained turn starting at character ``p`` (the end of the prompt the model is
        given): the prompt's tail since the last added token before ``p`` (the tokenizer cuts
        there first, so nothing before it can change) and the answer's head (up to the next
        added token, or to the last space within :data:`WINDOW` characters) are tokenised apart
        and compared with the tokens of the whole text there (a cut head's last token aside).
        Returns ``(p, together, apart)`` per shifted turn.
        """
        if not view.turn_starts or not len(view.input_ids):
            return []
        ids, starts, ends = view.input_ids, view.starts, view.ends
        cut = np.flatnonzero(np.isin(ids, self.boundaries))
        jobs = []
        for p in view.turn_starts:
            if p >= ends[-1]:  # truncated away
                continue
            before = cut[ends[cut] <= p]
            a = int(before[-1]) if len(before) else -1
            after = cut[(cut > a) & (starts[cut] >= p)]
            b = int(after[0]) if len(after) else len(ids)
            k = a + 1 + int(np.searchsorted(starts[a + 1 : b], p, side="left"))  # first token from p on
            left = int(ends[a]) if a >= 0 else 0
            right = int(starts[b]) if b < len(ids) else len(view.text)
            if b == len(ids) and view.truncated:
                right = min(right, int(ends[-1]))
            stop = view.text.rfind(" ", p + 1, p + WINDOW) if right > p + WINDOW else -1
            window = stop > p  # the head ends before a space, so its last word is whole
            jobs.append((p, a, k, b, view.text[left:p], view.text[p : stop if window else right], window))
        pieces = self.encode_pieces([t for job in jobs for t in job[4:6]])
        out = []
        for n, (p, a, k, b, _, _, window) in enumerate(jobs):
            head, tail = pieces[2 * n], pieces[2 * n + 1]
            if window:
                tail = tail[:-1]
                together = ids[a + 1 : k + len(tail)].tolist()
            else:
                together = ids[a + 1 : b].tolist()
            apart = head + tail
            if apart != together:
                out.append((p, together, apart))
        return out
