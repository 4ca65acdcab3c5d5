"""Checks of a dataset's masks that need no labels (one record at a time).

- ``zero_targets``: the policy trains nothing of the record (no assistant turn, or every
  trained turn at weight 0); ``truncated_to_zero``: nothing is left after ``--max-length``;
- ``special_token_text``: a message contains the text of a special token (``<|im_end|>``),
  which the tokenizer turns into the token itself: a reply that mentions it ends the turn;
- ``boundary_shift``: a trained turn's tokens when the prompt (everything the model is given,
  generation prompt included) and the answer are tokenised apart differ from the tokens of the
  whole text, so a pipeline that tokenises them apart trains on a sequence the model never
  sees at inference, or the reverse;
- ``not_prefix_stable``: the template renders a conversation prefix differently from the whole
  (a reasoning template drops earlier ``<think>`` blocks), so training every turn in one
  sequence (concat, what most frameworks do) shows the earlier turns in a context inference
  never has; losslab's ``--strategy auto`` expands such conversations;
- ``unrendered_message``: the template leaves a message out (its content is nowhere in the text).
"""

from __future__ import annotations

from collections.abc import Callable

from losslab.audit.agreement import finding
from losslab.audit.findings import Finding
from losslab.audit.reference import RecordView, Reference


def dataset_findings(view: RecordView, reference: Reference) -> list[Finding]:
    """The label-free findings of one record (module doc)."""
    where = str(view.source)
    out = []
    if view.full_trained == 0:
        why = (
            "it has no assistant turn"
            if "assistant" not in view.roles
            else "every trained turn has weight 0"
            if view.policy.value != "all"
            else "it is a single token"
        )
        out.append(finding("zero_targets", f"no token is trained under policy {view.policy.value}: {why}", where, 0))
    elif not view.trained.any():
        out.append(
            finding(
                "truncated_to_zero",
                f"no trained token is left after truncation to {len(view.input_ids)} tokens "
                f"(the record has {view.full_length}; its first trained token is past the cut)",
                where,
                view.full_trained,
            )
        )
    if view.specials:
        shown = ", ".join(repr(s) for s in dict.fromkeys(view.specials))
        out.append(
            finding(
                "special_token_text",
                f"a message contains special-token text, tokenised as that token: {shown}",
                where,
                len(view.specials),
                texts=list(dict.fromkeys(view.specials)),
            )
        )
    shifts = reference.boundary_shifts(view)
    if shifts:
        p, together, apart = shifts[0]
        k = next((j for j, (a, b) in enumerate(zip(together, apart)) if a != b), min(len(together), len(apart)))
        out.append(
            finding(
                "boundary_shift",
                f"{len(shifts)} trained turn{'s' * (len(shifts) != 1)} tokenise differently when prompt and answer "
                f"are tokenised apart (first at character {p}: together {_names(together[k : k + 4], reference.token_name)}, "
                f"apart {_names(apart[k : k + 4], reference.token_name)})",
                where,
                len(shifts),
                first_char=p,
            )
        )
    if view.prefix_stable is False:
        out.append(
            finding(
                "not_prefix_stable",
                "the chat template renders this conversation's earlier turns differently when it ends there: trained "
                "in one sequence (concat), they see a context inference never shows (losslab expands these)",
                where,
            )
        )
    if view.unrendered:
        shown = ", ".join(f"{i + 1} ({view.roles[i]})" for i in view.unrendered)
        out.append(
            finding(
                "unrendered_message",
                f"the chat template leaves out message {shown}",
                where,
                len(view.unrendered),
            )
        )
    return out


def _names(ids: list[int], name: Callable[[int], str]) -> str:
    return "[" + ", ".join(repr(name(i)) for i in ids) + "]"
