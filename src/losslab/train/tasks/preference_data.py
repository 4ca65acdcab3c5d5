"""The ``preference`` task's records as token ids: paired ``{prompt | messages, chosen, rejected,
margin?}`` and unpaired ``{prompt | messages, completion, desirable}`` records, encoded under the
chat template with masks from :mod:`losslab.masking`.

A completion's tokens are what the model is scored on: the assistant reply's content and the
tokens the template emits to end the turn (``assistant`` mask policy), nothing else. The prompt
is the template's rendering of the prompt messages with the generation prompt; the full
conversation must begin with it, and prompt and completion are tokenised separately, so one
prompt has the same tokens under every completion (the prefix a shared row computes once).

Truncation to ``data.max_length`` (per prompt + completion): the prompt loses tokens from its
start first; a completion longer than ``max_length - 1`` loses its end (one prompt token always
stays: it predicts the completion's first token). Pairs whose texts are identical are skipped
and listed; so are completions the template leaves without a scored token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from losslab.data.records import SkipLog, Source
from losslab.data.schemas import ChatRecord, Message, PreferenceRecord, UnpairedPreferenceRecord
from losslab.errors import UserError
from losslab.labels import IGNORE_INDEX
from losslab.masking import MaskBuilder, MaskConfig
from losslab.masking.spans import label_tokens

KEEP_PROMPT = 1
"""Prompt tokens that truncation always keeps (the last one predicts a completion's first token)."""


class SkipRecord(Exception):
    """A record that is counted and skipped whatever ``data.on_error`` says (with its reason)."""


def prompt_messages(prompt: str | list[Message]) -> list[dict[str, str]]:
    """The prompt as chat messages: a string is one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m.role, "content": m.content} for m in prompt]


def prompt_text(prompt: str | list[Message]) -> str:
    """The prompt as one readable string (for predictions files)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.role}: {m.content}" for m in prompt)


@dataclass
class Truncations:
    """Records whose prompt or completion lost tokens to ``max_length`` (``file:line: what``)."""

    log: SkipLog = field(default_factory=SkipLog)

    def add(self, source: Source, what: str) -> None:
        self.log.add(f"{source}: {what}")


class PreferenceEncoder:
    """Prompt and completion token ids of preference records under one tokenizer and template.

    ``template``: a Jinja chat template file instead of the tokenizer's (``data.template``).
    """

    def __init__(self, tokenizer: Any, *, template: str | None, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.builder = MaskBuilder(tokenizer, MaskConfig(mask="last", strategy="concat", template=template))
        self.max_length = max_length
        self.truncations = Truncations()

    def prompt_ids(self, prompt: str | list[Message]) -> tuple[str, list[int]]:
        """The rendered prompt (with the generation prompt) and its token ids."""
        head = self.builder.template.render_plain(prompt_messages(prompt), add_generation_prompt=True)
        return head, self._ids(head)[0]

    def _ids(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def completion(self, prompt: str | list[Message], text: str, field_name: str) -> tuple[list[int], list[int]]:
        """``(prompt ids, completion ids)`` of one reply, before truncation.

        The prompt ids are the rendered prompt's, plus any template text between the generation
        prompt and the reply's first scored token; the completion runs to its last scored token
        (the reply and the template's end-of-turn tokens). Raises :class:`SkipRecord` when the
        template leaves nothing to score, :class:`UserError` when it does not render the prompt
        as a prefix of the conversation.
        """
        messages = prompt_messages(prompt)
        try:
            head, head_ids = self.prompt_ids(prompt)
        except UserError as exc:  # the template refuses the prompt (a role it does not take, ...)
            raise UserError(f"field 'prompt': {exc.message}") from None
        record = ChatRecord.model_validate({"messages": [*messages, {"role": "assistant", "content": text}]})
        try:
            samples, _ = self.builder.plan(record)
        except UserError as exc:
            raise UserError(f"field {field_name!r}: {exc.message}") from None
        if not samples:
            raise SkipRecord(f"field {field_name!r}: the chat template renders no reply to score")
        sample = samples[-1]
        if not sample.text.startswith(head):
            raise UserError(
                f"field {field_name!r}: the chat template does not render the prompt (with its generation "
                "prompt) as a prefix of prompt + reply; the preference task needs one prompt shared by both replies"
            )
        tail_ids, tail_offsets = self._ids(sample.text[len(head) :])
        shifted = [(a + len(head), b + len(head)) for a, b in tail_offsets]
        labels, _ = label_tokens(tail_ids, shifted, sample.regions, default_weight=sample.default_weight)
        scored = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        if not scored:
            raise SkipRecord(f"field {field_name!r}: no token of the reply is scored")
        first, last = scored[0], scored[-1]
        return head_ids + tail_ids[:first], tail_ids[first : last + 1]

    def fit(
        self, source: Source, prompt: list[int], completions: dict[str, list[int]]
    ) -> tuple[list[int], dict[str, list[int]]]:
        """Prompt and completions cut to ``max_length`` per prompt + completion (see the module
        docstring); what was cut is recorded in :attr:`truncations`."""
        room = self.max_length - KEEP_PROMPT
        cut = {}
        notes = []
        for name, ids in completions.items():
            if len(ids) > room:
                notes.append(f"{name} cut from {len(ids)} to {room} tokens")
                ids = ids[:room]
            cut[name] = ids
        longest = max(len(ids) for ids in cut.values())
        keep = self.max_length - longest
        if len(prompt) > keep:
            notes.insert(0, f"prompt cut from {len(prompt)} to {keep} tokens (its start dropped)")
            prompt = prompt[len(prompt) - keep :]
        if notes:
            self.truncations.add(source, "; ".join(notes))
        return prompt, cut


def encode_pair(encoder: PreferenceEncoder, source: Source, record: PreferenceRecord) -> dict[str, Any]:
    """A paired feature: ``prompt``, ``chosen``, ``rejected`` token ids (+ texts, ``margin``,
    ``source``, the record's ``cluster`` when it has one). Raises :class:`SkipRecord` for a pair with nothing to prefer."""
    if record.chosen == record.rejected:
        raise SkipRecord("field 'rejected': the same text as 'chosen' (no preference to learn)")
    for name in ("chosen", "rejected"):
        if not getattr(record, name).strip():
            raise UserError(f"field {name!r}: an empty completion", where=str(source))
    prompt_c, chosen = encoder.completion(record.prompt, record.chosen, "chosen")
    prompt_r, rejected = encoder.completion(record.prompt, record.rejected, "rejected")
    if prompt_c != prompt_r:
        raise UserError(
            "the chat template renders different text before 'chosen' and 'rejected'; they need one prompt",
            where=str(source),
        )
    prompt, cut = encoder.fit(source, prompt_c, {"chosen": chosen, "rejected": rejected})
    if cut["chosen"] == cut["rejected"]:
        raise SkipRecord("fields 'chosen' and 'rejected': the same tokens after truncation to data.max_length")
    feature: dict[str, Any] = {
        "prompt": prompt,
        "chosen": cut["chosen"],
        "rejected": cut["rejected"],
        "prompt_text": prompt_text(record.prompt),
        "chosen_text": record.chosen,
        "rejected_text": record.rejected,
        "source": str(source),
    }
    if record.margin is not None:
        feature["margin"] = record.margin
    if record.cluster is not None:
        feature["cluster"] = record.cluster
    return feature


def encode_unpaired(encoder: PreferenceEncoder, source: Source, record: UnpairedPreferenceRecord) -> dict[str, Any]:
    """An unpaired feature: ``prompt`` and ``completion`` token ids, ``desirable`` (+ texts,
    ``source``, the record's ``cluster`` when it has one)."""
    if not record.completion.strip():
        raise UserError("field 'completion': an empty completion", where=str(source))
    prompt, completion = encoder.completion(record.prompt, record.completion, "completion")
    prompt, cut = encoder.fit(source, prompt, {"completion": completion})
    feature: dict[str, Any] = {
        "prompt": prompt,
        "completion": cut["completion"],
        "desirable": record.desirable,
        "prompt_text": prompt_text(record.prompt),
        "completion_text": record.completion,
        "source": str(source),
    }
    if record.cluster is not None:
        feature["cluster"] = record.cluster
    return feature


def unpair(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired features as unpaired ones, as TRL's ``unpair_preference_dataset`` does: every
    chosen reply desirable, every rejected one undesirable; all chosen items first, then all
    rejected ones (so that the next item's completion, the KL estimate's mismatched reply,
    belongs to another pair). ``pair`` is the index of the pair an item came from."""
    items = []
    for role, desirable in (("chosen", True), ("rejected", False)):
        for k, f in enumerate(pairs):
            items.append(
                {
                    "prompt": f["prompt"],
                    "completion": f[role],
                    "desirable": desirable,
                    "prompt_text": f["prompt_text"],
                    "completion_text": f[f"{role}_text"],
                    "source": f["source"],
                    "pair": k,
                    **({"cluster": f["cluster"]} if "cluster" in f else {}),
                }
            )
    return items


def add_mismatched(items: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Each unpaired item gets ``kl_completion``: the next item's completion (cyclically), the
    reply to another prompt on which KTO estimates KL(policy || reference). The prompt is cut
    from its start if prompt + that reply is longer than ``max_length``."""
    out = []
    n = len(items)
    for i, item in enumerate(items):
        # (every completion is already at most max_length - KEEP_PROMPT tokens: the prompt keeps one)
        other = items[(i + 1) % n]["completion"][: max_length - KEEP_PROMPT]
        keep = max_length - max(len(item["completion"]), len(other))
        prompt = item["prompt"][max(0, len(item["prompt"]) - keep) :]
        out.append({**item, "prompt": prompt, "kl_completion": other})
    return out
