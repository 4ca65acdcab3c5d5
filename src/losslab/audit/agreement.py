"""Another framework's labels against losslab's mask, token by token (one record).

The comparison runs in losslab's token positions: when the labels' ``input_ids`` equal the
template's own rendering (the usual case) position i is position i; when they are that
rendering cut short, the kept part is compared (``labels_truncated``); otherwise the two id
sequences are aligned (longest matching blocks, ``difflib``) and only matched tokens are
compared (``tokens_differ`` names the first differing position). Position 0 is never
compared: nothing predicts the first token, whatever its label says.

Then, in this order:

1. label values: a trained label must be the token at its position; labels that hold the
   NEXT token (shifted before the model shifts them again) give ``labels_shifted`` and are
   read as meaning that next token, other values give ``label_values``;
2. a mask that is losslab's moved by one position either way: ``labels_shifted``;
3. tokens trained by the labels only, by what they are (:class:`~losslab.audit.reference.Part`):
   template text (``header_trained``, or ``whitespace_trained`` when only whitespace), a
   system/user/tool message (``system_trained`` ...), an empty reasoning block, an assistant
   turn outside the policy (``other_turn_trained``);
4. tokens trained by losslab only: assistant content (``assistant_untrained``), end-of-turn
   (``end_of_turn_untrained``), other text under policy ``all`` (``prompt_untrained``);
5. labels that train no token at all (``labels_zero_targets``; 4 is then not repeated).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from losslab.audit.findings import Finding
from losslab.audit.kinds import KINDS
from losslab.audit.labels_file import ForeignLabels
from losslab.audit.reference import Part, RecordView

EXTRA_KIND = {
    Part.SYSTEM: "system_trained",
    Part.USER: "user_trained",
    Part.TOOL: "tool_trained",
    Part.EMPTY_THINK: "empty_think_trained",
    Part.ASSISTANT: "other_turn_trained",
    Part.END_OF_TURN: "other_turn_trained",
    Part.REPLY_LEAD: "other_turn_trained",
}
MISSING_KIND = {
    Part.ASSISTANT: "assistant_untrained",
    Part.REPLY_LEAD: "assistant_untrained",
    Part.EMPTY_THINK: "assistant_untrained",
    Part.END_OF_TURN: "end_of_turn_untrained",
}
WHAT = {
    "header_trained": "template text",
    "whitespace_trained": "whitespace template text",
    "system_trained": "system text",
    "user_trained": "user text",
    "tool_trained": "tool output",
    "empty_think_trained": "empty reasoning block",
    "other_turn_trained": "assistant text outside the mask policy",
    "assistant_untrained": "assistant content",
    "end_of_turn_untrained": "end-of-turn",
    "prompt_untrained": "prompt text",
}


def finding(kind: str, message: str, where: str, count: int | None = None, **details: object) -> Finding:
    """A :class:`Finding` of a documented kind, at its level."""
    return Finding(kind, KINDS[kind].level, message, where, count, dict(details))


@dataclass
class Agreement:
    """The labels' mask in losslab's positions and what the comparison found."""

    trained: np.ndarray  # (T,) bool: tokens the labels train, in the view's positions
    compared: np.ndarray  # (T,) bool: positions compared (matched, not the first)
    findings: list[Finding]
    extra: np.ndarray  # (T,) bool: trained by the labels only
    missing: np.ndarray  # (T,) bool: trained by losslab only


def compare(
    view: RecordView, labels: ForeignLabels, *, max_length: int | None, name: Callable[[int], str]
) -> Agreement:
    """Compare ``labels`` with losslab's ``view`` of the same record (module doc).

    ``name``: a token id's text (for messages about differing tokens)."""
    where = str(view.source)
    out: list[Finding] = []
    ids, trained, values = labels.input_ids, labels.trained, labels.values
    if max_length is not None:
        ids, trained = ids[:max_length], trained[:max_length]
        values = values[:max_length] if values is not None else None
    if values is not None:
        trained = _check_values(ids, trained, values, where, labels, out)
    ref_pos, lab_pos = _align(view, ids, where, labels, name, out)
    n = len(view.input_ids)
    mask = np.zeros(n, dtype=bool)
    mask[ref_pos] = trained[lab_pos]
    compared = np.zeros(n, dtype=bool)
    compared[ref_pos] = True
    if n:
        compared[0] = False
    ours = view.trained & compared
    theirs = mask & compared
    if not trained[1:].any():
        out.append(
            finding(
                "labels_zero_targets",
                f"the labels train no token of this record ({labels.field} all {'-100' if values is not None else '0'}); "
                f"losslab trains {int(view.trained.sum())}",
                where,
                int(view.trained.sum()),
                labels=labels.where,
            )
        )
        return Agreement(mask, compared, out, np.zeros(n, dtype=bool), ours)
    shift = _mask_shift(ours, theirs, compared)
    if shift:
        out.append(
            finding(
                "labels_shifted",
                f"the labels' mask is losslab's moved by {shift:+d} token: every trained position is off by one",
                where,
                int(theirs.sum()),
                labels=labels.where,
                direction=shift,
            )
        )
        return Agreement(mask, compared, out, np.zeros(n, dtype=bool), np.zeros(n, dtype=bool))
    extra = theirs & ~ours
    missing = ours & ~theirs
    out += _classify(view, extra, missing, labels)
    return Agreement(mask, compared, out, extra, missing)


def _check_values(
    ids: np.ndarray, trained: np.ndarray, values: np.ndarray, where: str, labels: ForeignLabels, out: list[Finding]
) -> np.ndarray:
    """The trained mask the label values mean; shifted or wrong values are findings."""
    pos = np.flatnonzero(trained)
    if not len(pos):
        return trained
    same = values[pos] == ids[pos]
    following = np.zeros(len(pos), dtype=bool)
    inside = pos + 1 < len(ids)
    following[inside] = values[pos[inside]] == ids[pos[inside] + 1]
    shifted = following & ~same
    wrong = ~same & ~following
    if shifted.sum() > same.sum():
        out.append(
            finding(
                "labels_shifted",
                f"{int(shifted.sum())} labels hold the token AFTER their position: the labels were shifted before "
                "the model shifts them again (each position then predicts two tokens ahead)",
                where,
                int(shifted.sum()),
                labels=labels.where,
                direction=-1,
            )
        )
        meant = np.zeros(len(trained), dtype=bool)
        meant[pos[following] + 1] = True  # a label equal to both tokens is read as shifted too
        wrong = ~following
        trained = meant
    else:
        wrong = ~same
    if wrong.any():
        k = int(pos[np.flatnonzero(wrong)[0]])
        out.append(
            finding(
                "label_values",
                f"{int(wrong.sum())} trained labels are not the token at their position (first at token {k}: "
                f"label {int(values[k])}, token {int(ids[k])})",
                where,
                int(wrong.sum()),
                labels=labels.where,
                first=k,
            )
        )
    return trained


def _align(
    view: RecordView, ids: np.ndarray, where: str, labels: ForeignLabels, name: Callable[[int], str], out: list[Finding]
) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(ours, theirs)`` of the tokens both sequences share."""
    ref = view.input_ids
    if len(ids) == len(ref) and np.array_equal(ids, ref):
        every = np.arange(len(ref))
        return every, every
    if len(ids) < len(ref) and np.array_equal(ids, ref[: len(ids)]):
        out.append(
            finding(
                "labels_truncated",
                f"the labels' input_ids are the first {len(ids)} of the template's {len(ref)} tokens; "
                "the kept part is compared",
                where,
                len(ref) - len(ids),
                labels=labels.where,
            )
        )
        every = np.arange(len(ids))
        return every, every
    common = min(len(ids), len(ref))
    differ = np.flatnonzero(ids[:common] != ref[:common])
    k = int(differ[0]) if len(differ) else common
    ours_tok = repr(view.token_text(k)) if k < len(ref) else "(end)"
    theirs_tok = repr(name(int(ids[k]))) if k < len(ids) else "(end)"
    blocks = difflib.SequenceMatcher(None, ref.tolist(), ids.tolist(), autojunk=False).get_matching_blocks()
    ref_pos = np.concatenate([np.arange(b.a, b.a + b.size) for b in blocks] or [np.zeros(0, dtype=np.int64)])
    lab_pos = np.concatenate([np.arange(b.b, b.b + b.size) for b in blocks] or [np.zeros(0, dtype=np.int64)])
    out.append(
        finding(
            "tokens_differ",
            f"the labels' input_ids ({len(ids)} tokens) differ from the template's rendering ({len(ref)} tokens) "
            f"from token {k} on (theirs {theirs_tok}, the template's {ours_tok}); {len(ref_pos)} tokens align "
            "and are compared",
            where,
            max(len(ids), len(ref)) - len(ref_pos),
            labels=labels.where,
            first=k,
        )
    )
    return ref_pos.astype(np.int64), lab_pos.astype(np.int64)


def _mask_shift(ours: np.ndarray, theirs: np.ndarray, compared: np.ndarray) -> int:
    """+1 or -1 when ``theirs`` is ``ours`` moved by that many positions (on the compared
    positions, the ends aside), else 0."""
    if not ours.any() or np.array_equal(ours, theirs):
        return 0
    for d in (1, -1):
        moved = np.zeros_like(ours)
        if d > 0:
            moved[d:] = ours[:-d]
        else:
            moved[:d] = ours[-d:]
        inner = compared.copy()
        inner[[0, -1]] = False
        if np.array_equal((moved & inner), (theirs & inner)) and (theirs & inner).any():
            return d
    return 0


def _classify(view: RecordView, extra: np.ndarray, missing: np.ndarray, labels: ForeignLabels) -> list[Finding]:
    """One finding per kind of disagreement in this record."""
    where = str(view.source)
    groups: dict[str, list[int]] = {}
    for i in np.flatnonzero(extra).tolist():
        part = Part(int(view.part[i]))
        if part is Part.TEMPLATE:
            kind = "whitespace_trained" if not view.token_text(i).strip() else "header_trained"
        else:
            kind = EXTRA_KIND[part]
        groups.setdefault(kind, []).append(i)
    for i in np.flatnonzero(missing).tolist():
        kind = MISSING_KIND.get(Part(int(view.part[i])), "prompt_untrained")
        groups.setdefault(kind, []).append(i)
    out = []
    for kind, positions in sorted(groups.items(), key=lambda kv: kv[1][0]):
        trained = kind.endswith("_trained")
        shown = ", ".join(repr(view.token_text(i)) for i in positions[:6]) + (", ..." if len(positions) > 6 else "")
        turns = sorted({int(view.message[i]) + 1 for i in positions if view.message[i] >= 0})
        at = f" (message{'s' if len(turns) > 1 else ''} {', '.join(map(str, turns[:8]))})" if turns else ""
        verb = "trained by the labels, not by losslab" if trained else "trained by losslab, not by the labels"
        out.append(
            finding(
                kind,
                f"{len(positions)} token{'s' * (len(positions) != 1)} of {WHAT[kind]} {verb}{at}: {shown}",
                where,
                len(positions),
                labels=labels.where,
                first=positions[0],
                messages=turns,
            )
        )
    return out
