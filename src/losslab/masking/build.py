"""Records -> training samples: ``input_ids``, ``labels``, ``weights``, ``source``.

The entry points for the trainer and ``losslab inspect``::

    samples = build_samples("train.jsonl", tokenizer, MaskConfig(max_length=1024), stats=stats)
    # [{"input_ids": [...], "labels": [...], "weights": [...], "source": {"file": ..., "line": ...}}, ...]

``labels`` are not shifted (-100 where a token is not trained, else the token id);
``weights`` are aligned with ``labels`` (0 where not trained) and shift with them in the loss.
The first token is never trained: no token before it predicts it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from losslab.data.records import SKIP_HINT, SkipLog, Source, describe_validation_error, iter_raw_records, load_records
from losslab.data.schemas import ChatRecord, InstructionRecord
from losslab.errors import UserError
from losslab.labels import IGNORE_INDEX
from losslab.masking.policies import MaskPolicy, check_role_weights, message_weight, parse_policy
from losslab.masking.render import (
    PROMPT_STYLES,
    ChatTemplate,
    ContentSpan,
    alpaca_prompt,
    instruction_messages,
    tokenizer_adds_bos,
)
from losslab.masking.spans import Region, label_tokens
from losslab.masking.strategy import Strategy, TextSample, parse_strategy, plan_conversation
from losslab.masking.truncation import check_side, truncation_slice

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

KINDS = ("auto", "chat", "instruction")


@dataclass
class MaskConfig:
    """How records become training sequences (the ``data:`` section of a config)."""

    mask: str | None = None
    """Mask policy: all | assistant | last | completion (default: assistant for chat, completion for instruction)."""
    strategy: str = "auto"
    """Multi-turn strategy: concat | expand | auto (concat when the template is prefix-stable, else expand)."""
    mask_prompt: bool = True
    """False: train the prompt too (the policy becomes `all`)."""
    role_weights: dict[str, float] = field(default_factory=dict)
    """Token weight per role (system, user, assistant, tool); multiplied by a message's own `weight`."""
    prompt_style: str = "chat_template"
    """Instruction records: alpaca | chat_template (the tokenizer's or `template`)."""
    template: str | None = None
    """Jinja chat template (file, or the text itself) instead of the tokenizer's own."""
    max_length: int | None = None
    """Truncate samples to this many tokens (None: no limit)."""
    truncation: str = "end"
    """Which side a too-long sample loses: end (keep the start) | start (keep the end)."""
    on_error: str = "raise"
    """Bad records: raise (error naming file:line) | skip (skip and count)."""
    kind: str = "auto"
    """Record kind: chat | instruction | auto (from the first record's fields)."""

    def __post_init__(self) -> None:
        self.role_weights = check_role_weights(self.role_weights)
        parse_strategy(self.strategy)
        check_side(self.truncation)
        if self.prompt_style not in PROMPT_STYLES:
            raise UserError(f"unknown prompt_style {self.prompt_style!r}; choose one of: {', '.join(PROMPT_STYLES)}")
        if self.on_error not in ("raise", "skip"):
            raise UserError(f"on_error must be 'raise' or 'skip'; got {self.on_error!r}")
        if self.kind not in KINDS:
            raise UserError(f"unknown record kind {self.kind!r}; choose one of: {', '.join(KINDS)}")
        if self.max_length is not None and self.max_length < 1:
            raise UserError(f"max_length must be >= 1; got {self.max_length}")
        if self.mask is not None:
            parse_policy(self.mask, "chat")


@dataclass
class MaskedSequence:
    """One training sequence, with the text and token offsets kept for inspection."""

    input_ids: list[int]
    labels: list[int]
    weights: list[float]
    source: Source
    text: str
    offsets: list[tuple[int, int]]
    turn: int | None = None  # expand: the trained message's index

    @property
    def trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)

    def to_sample(self) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "weights": self.weights,
            "source": {"file": self.source.file, "line": self.source.line},
        }


@dataclass
class BuildStats:
    """What happened while building: for the summary line and the trainer's log."""

    strategy: str = "auto"
    records: int = 0
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    skipped: SkipLog = field(default_factory=SkipLog)
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> samples dropped
    dropped_log: SkipLog = field(default_factory=SkipLog)  # "file:line: sample dropped (reason)"
    strategies: Counter[str] = field(default_factory=Counter)  # concat | expand -> conversations
    unrendered: Counter[str] = field(default_factory=Counter)  # role -> messages the template left out
    control: SkipLog = field(default_factory=SkipLog)  # "file:line, '<|im_end|>'": a special token's text in a message

    @property
    def dropped_samples(self) -> int:
        return sum(self.dropped.values())

    def strategy_report(self) -> str:
        """The strategy used, e.g. ``auto -> expand (3 conversations; ...)``."""
        used = ", ".join(f"{name} for {n} conversation{'s' * (n != 1)}" for name, n in sorted(self.strategies.items()))
        if self.strategy != "auto":
            return self.strategy
        if not used:
            return "auto (no multi-turn data)"
        why = ""
        if self.strategies.get("expand"):
            why = "; expand where the chat template renders a conversation prefix differently from the whole"
        return f"auto -> {used}{why}"

    def summary(self) -> str:
        dropped = f"dropped samples: {self.dropped_samples}"
        if self.dropped:
            dropped += " (" + ", ".join(f"{n} {why}" for why, n in self.dropped.items()) + ")"
        line = (
            f"samples: {self.samples}, tokens: {self.tokens}, trained tokens: {self.trained_tokens}, {dropped}, "
            f"skipped records: {self.skipped.count}, strategy: {self.strategy_report()}"
        )
        if self.unrendered:
            lost = ", ".join(f"{n} {role} message{'s' * (n != 1)}" for role, n in sorted(self.unrendered.items()))
            line += f"; warning: {lost} not rendered by the chat template"
        if self.control.count:
            n = self.control.count
            line += (
                f"; warning: {n} record{'s' * (n != 1)} with a special token's text in a message, tokenised as "
                f"that token (first: {self.control.examples[0]})"
            )
        return line


class MaskBuilder:
    """Turns records into :class:`MaskedSequence` objects under one :class:`MaskConfig`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | str, config: MaskConfig | None = None) -> None:
        if isinstance(tokenizer, str):
            from losslab.models import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("loss masks need a fast tokenizer (character offsets); this one is not")
        self.tokenizer = tokenizer
        self.config = config or MaskConfig()
        self.strategy = parse_strategy(self.config.strategy)
        self._template: ChatTemplate | None = None
        self._bos: str | None = None  # the BOS text the alpaca style puts in front (once known)
        # added tokens a text can be cut before without changing the tokens before them (one
        # that strips whitespace on its left would take the preceding text's whitespace)
        self._boundaries = {i for i, tok in tokenizer.added_tokens_decoder.items() if not getattr(tok, "lstrip", False)}
        # special tokens' texts: one typed in a message (a reply that mentions <|im_end|>)
        # becomes the special token itself, so such records are counted and reported
        specials = {tok.content for tok in tokenizer.added_tokens_decoder.values() if tok.special and tok.content}
        self._specials = (
            re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None
        )

    @property
    def template(self) -> ChatTemplate:
        if self._template is None:
            self._template = ChatTemplate(self.tokenizer, self.config.template)
        return self._template

    # -- one record -------------------------------------------------------------------------

    def plan(self, record: ChatRecord | InstructionRecord) -> tuple[list[TextSample], Strategy | None]:
        """The text samples of one record and the strategy used (None: single-turn instruction)."""
        cfg = self.config
        if isinstance(record, InstructionRecord):
            policy = parse_policy(cfg.mask, "instruction", mask_prompt=cfg.mask_prompt)
            if cfg.prompt_style == "alpaca":
                return [self._alpaca(record, policy)], None
            messages: list[dict[str, Any]] = [
                *instruction_messages(record.instruction, record.input),
                {"role": "assistant", "content": record.output},
            ]
        else:
            policy = parse_policy(cfg.mask, "chat", mask_prompt=cfg.mask_prompt)
            messages = [m.model_dump() for m in record.messages]
        weights = [message_weight(m["role"], m.get("weight"), cfg.role_weights) for m in messages]
        plan = plan_conversation(self.template, messages, policy=policy, weights=weights, strategy=self.strategy)
        return plan.samples, plan.strategy

    def _alpaca(self, record: InstructionRecord, policy: MaskPolicy) -> TextSample:
        tok = self.tokenizer
        if tok.eos_token is None:
            raise UserError("the alpaca prompt style needs a tokenizer with an EOS token")
        if self._bos is None:
            self._bos = tok.bos_token if tokenizer_adds_bos(tok) else ""
        bos = self._bos
        prompt = bos + alpaca_prompt(record.instruction, record.input)
        text = prompt + record.output + tok.eos_token
        w = self.config.role_weights
        regions = [Region(len(prompt), len(text), message_weight("assistant", None, w), 1)]
        if policy is MaskPolicy.ALL:
            regions.insert(0, Region(0, len(prompt), message_weight("user", None, w), 0))
        user = prompt[len(bos) :]
        output = ContentSpan(len(prompt), len(prompt) + len(record.output))  # the EOS after it is template text
        return TextSample(
            text,
            regions,
            roles=("user", "assistant"),
            contents=(user, record.output),
            spans=(ContentSpan(len(bos), len(prompt)), output),
        )

    def encode(
        self, record: ChatRecord | InstructionRecord, source: Source, stats: BuildStats | None = None
    ) -> list[MaskedSequence]:
        """Sequences for one record; samples left without a trained token are counted and dropped."""
        samples, strategy = self.plan(record)
        if stats is not None and strategy is not None and isinstance(record, ChatRecord):
            stats.strategies[strategy.value] += 1
        if stats is not None and samples:
            _count_unrendered(samples[-1], stats)
            self._count_specials(samples[-1], source, stats)
        if not samples:
            if stats is not None:
                stats.dropped["with every trained turn at weight 0"] += 1
                stats.dropped_log.add(f"{source}: sample dropped (every trained turn at weight 0)")
            return []
        out = []
        for sample, (ids, offsets) in zip(samples, self._tokenize([s.text for s in samples])):
            labels, weights = label_tokens(ids, offsets, sample.regions, default_weight=sample.default_weight)
            cut = truncation_slice(len(ids), self.config.max_length, self.config.truncation)
            labels, weights = labels[cut], weights[cut]
            if labels:  # nothing predicts the first token (the loss shifts): it is never a target
                labels[0], weights[0] = IGNORE_INDEX, 0.0
            seq = MaskedSequence(
                list(ids[cut]), labels, weights, source, sample.text, _pairs(offsets[cut]), sample.turn
            )
            if seq.trained == 0:
                if stats is not None:
                    why = (
                        "with no trained token left after truncation"
                        if len(ids) > len(seq.input_ids)
                        else "with no trained token"
                    )
                    stats.dropped[why] += 1
                    stats.dropped_log.add(f"{source}: sample dropped ({why.removeprefix('with ')})")
                continue
            out.append(seq)
        return out

    def _count_specials(self, sample: TextSample, source: Source, stats: BuildStats) -> None:
        """Count the record if a special token's text stands in a message as rendered."""
        if self._specials is None:
            return
        for span in sample.spans:
            found = span.found and self._specials.search(sample.text, span.start, span.end)  # type: ignore[arg-type]
            if found:
                stats.control.add(f"{source}, {found.group()!r}")
                return

    def _tokenize(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """``(input_ids, offsets)`` per text, each as if tokenised alone.

        Expanded samples of a prefix-stable conversation are prefixes of the longest one. A
        fast tokenizer splits the text at added tokens (``<|im_start|>``...) before anything
        else and tokenises the pieces between them independently, so a prefix that ends
        where an added token starts has exactly the tokens of the longest text up to it:
        one tokenisation serves them all. Any other text is tokenised on its own.
        """
        if len(texts) == 1:  # one text (concat)
            return [self._tokenize_one(texts[0])]
        out: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}
        longest = max(texts, key=len)
        if len(texts) > 1 and all(longest.startswith(t) for t in texts):
            enc = self.tokenizer(longest, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            cut_at = {start: k for k, ((start, _), tok) in enumerate(zip(offsets, ids)) if tok in self._boundaries}
            cut_at[len(longest)] = len(ids)
            for j, text in enumerate(texts):
                if len(text) in cut_at:
                    k = cut_at[len(text)]
                    out[j] = (ids[:k], offsets[:k])
        rest = [j for j in range(len(texts)) if j not in out]
        if rest:
            enc = self.tokenizer([texts[j] for j in rest], add_special_tokens=False, return_offsets_mapping=True)
            out.update(zip(rest, zip(enc["input_ids"], enc["offset_mapping"])))
        return [out[j] for j in range(len(texts))]

    def _tokenize_one(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``(input_ids, offsets)`` of one text: what ``tokenizer(text, add_special_tokens=False,
        return_offsets_mapping=True)`` gives, read straight from the Rust tokenizer when the
        call would change none of its settings (no truncation or padding set, special tokens
        split as the tokenizer says), which skips building the attention mask and the batch
        around them; else through that call."""
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)  # the Rust tokenizer of a fast tokenizer
        if (
            backend is not None
            and backend.truncation is None
            and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tok, "split_special_tokens", False))
        ):
            enc = backend.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        out = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return out["input_ids"], out["offset_mapping"]

    # -- many records -----------------------------------------------------------------------

    def iter_sequences(
        self, data: str | Path | Iterable[Any], stats: BuildStats | None = None, *, limit: int | None = None
    ) -> Iterator[MaskedSequence]:
        """Sequences for every record of ``data`` (a records file, or an iterable of records)."""
        stats = stats if stats is not None else BuildStats()
        stats.strategy = self.strategy.value
        for n, (source, record) in enumerate(self._records(data, stats.skipped)):
            if limit is not None and n >= limit:
                break
            try:
                sequences = self.encode(record, source, stats)
            except UserError as exc:
                if self.config.on_error == "raise":
                    raise UserError(f"{exc}{SKIP_HINT}", where=str(source)) from None
                stats.skipped.add(f"{source}: {exc}")
                continue
            stats.records += 1
            for seq in sequences:
                stats.samples += 1
                stats.tokens += len(seq.input_ids)
                stats.trained_tokens += seq.trained
                yield seq

    def _records(
        self, data: str | Path | Iterable[Any], skipped: SkipLog
    ) -> Iterator[tuple[Source, ChatRecord | InstructionRecord]]:
        if isinstance(data, (str, Path)):
            schema = file_schema(self.config.kind, data)
            yield from load_records(data, schema, on_error=self.config.on_error, skipped=skipped)
            return
        for i, item in enumerate(data, 1):
            source = Source("<records>", i)
            if isinstance(item, (ChatRecord, InstructionRecord)):
                yield source, item
                continue
            try:
                if not isinstance(item, Mapping):
                    raise UserError(f"expected a record (a mapping), got {type(item).__name__}")
                yield source, _schema(self.config.kind, item).model_validate(dict(item))
            except ValidationError as exc:
                self._bad(source, describe_validation_error(exc), skipped)
            except UserError as exc:
                self._bad(source, str(exc), skipped)

    def _bad(self, source: Source, message: str, skipped: SkipLog) -> None:
        if self.config.on_error == "raise":
            raise UserError(message, where=str(source))
        skipped.add(f"{source}: {message}")


def _pairs(offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Offsets as a list of tuples. One tokenizer call gives them all of one type; a fast
    tokenizer's are tuples already, and are not copied one by one."""
    if offsets and type(offsets[0]) is not tuple:
        return [(o[0], o[1]) for o in offsets]
    return list(offsets)


def _count_unrendered(sample: TextSample, stats: BuildStats) -> None:
    """Count messages with content that the template did not render at all (Mistral v0.3 drops
    the system message of a conversation that ends with an assistant turn)."""
    for span, role, content in zip(sample.spans, sample.roles, sample.contents):
        if span.start is None and span.end is None and content.strip() and content.strip() not in sample.text:
            stats.unrendered[role] += 1


def _first_record(path: str | Path) -> tuple[Source | None, Any]:
    """The first record that shows its kind (has ``messages`` or ``instruction``), else the
    first mapping, else ``(None, None)``."""
    first: tuple[Source | None, Any] = (None, None)
    for source, raw in iter_raw_records(path):
        if isinstance(raw, Mapping):
            if "messages" in raw or "instruction" in raw:
                return source, raw
            if first[0] is None:
                first = (source, raw)
    return first


def file_schema(kind: str, path: str | Path) -> type[ChatRecord | InstructionRecord]:
    """The record schema of a file: ``kind``, or for ``auto`` its first record's fields
    (an error names the record it could not tell)."""
    source, first = _first_record(path) if kind == "auto" else (None, None)
    try:
        return _schema(kind, first)
    except UserError as exc:
        raise UserError(str(exc), where=str(source) if source else str(path)) from None


def _schema(kind: str, record: Any) -> type[ChatRecord | InstructionRecord]:
    if kind == "chat":
        return ChatRecord
    if kind == "instruction":
        return InstructionRecord
    if isinstance(record, Mapping) and "messages" in record:
        return ChatRecord
    if isinstance(record, Mapping) and "instruction" in record:
        return InstructionRecord
    if record is None:  # no record to look at (empty file, or only bad lines): report them as chat
        return ChatRecord
    raise UserError(
        "cannot tell the record kind: a chat record has 'messages', an instruction record has "
        "'instruction' and 'output' (or set kind: chat | instruction)"
    )


def build_samples(
    data: str | Path | Iterable[Any],
    tokenizer: PreTrainedTokenizerBase | str,
    config: MaskConfig | None = None,
    *,
    stats: BuildStats | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Training samples (dicts: ``input_ids``, ``labels``, ``weights``, ``source``) for ``data``.

    ``data``: a records file (jsonl, json, csv, parquet) or an iterable of chat/instruction
    records (dicts or :class:`ChatRecord`/:class:`InstructionRecord`). ``stats`` receives the
    counts (samples, tokens, trained tokens, dropped, skipped, strategy used).
    """
    builder = MaskBuilder(tokenizer, config)
    return [seq.to_sample() for seq in builder.iter_sequences(data, stats, limit=limit)]
