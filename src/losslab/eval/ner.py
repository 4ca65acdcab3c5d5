"""Entity-level NER evaluation (:func:`ner_report`) with seqeval's entity extraction: an entity is
right only when its type, start and end all match. Lenient (conlleval) extraction by default,
strict extraction of one tagging scheme with ``mode="strict"``; the per-type counts give the
same report as :mod:`losslab.eval.classification`. Also :func:`ids_to_tags` (predicted ids or
logits of first sub-tokens to tag lists).

The two modes, the tags each reads, and why an unreadable tag raises: docs/metrics.md, "NER".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import numpy as np

from losslab.eval._arrays import ArrayLike, as_numpy
from losslab.eval.classification import PerClassReport, report_from_counts
from losslab.labels import IGNORE_INDEX

Scheme = Literal["IOB1", "IOB2", "IOE1", "IOE2", "IOBES", "BILOU"]


def _token_scheme(scheme: str | None, y_true: Sequence[Sequence[str]]) -> type:
    """seqeval's Token class for ``scheme``; ``None`` detects it from ``y_true`` (as seqeval)."""
    import seqeval.scheme as schemes

    if scheme is None:
        return schemes.auto_detect([list(s) for s in y_true])
    token_cls = getattr(schemes, scheme, None) if scheme in get_args(Scheme) else None
    if token_cls is None:
        raise ValueError(f"unknown scheme {scheme!r}; use one of {', '.join(get_args(Scheme))}")
    return token_cls


_LENIENT_PREFIXES = ("B-", "I-", "E-", "S-")


def lenient_tag(tag: str) -> bool:
    """Whether the default (lenient) mode reads ``tag``: ``O``, ``B-``/``I-``/``E-``/``S-``
    tags and the bare ``B``, ``I``, ``E``, ``S`` (BIO, IOB1/2, IOE, IOBES)."""
    return tag in ("O", "B", "I", "E", "S") or str(tag).startswith(_LENIENT_PREFIXES)


def _check_lenient_tags(sequences: Sequence[Sequence[str]], name: str) -> None:
    """Raise ``ValueError`` on a tag the lenient (conlleval) extraction cannot read.

    It reads ``O`` and ``B-``, ``I-``, ``E-``, ``S-`` tags (and the bare ``B``, ``I``, ``E``,
    ``S``). seqeval only warns on anything else and then takes the first character as the
    prefix: a BILOU ``L-PER`` / ``U-PER`` silently merges or drops entities, an IO tag ``PER``
    becomes an entity of type ``ER``.
    """
    for i, seq in enumerate(sequences):
        for tag in seq:
            if lenient_tag(tag):
                continue
            raise ValueError(
                f"{name}[{i}] has tag {tag!r}, which the default (lenient) mode cannot read: it takes O and"
                " B-/I-/E-/S- tags. Use mode='strict' with scheme='BILOU' for BILOU tags;"
                " write IO tags as I-<TYPE>."
            )


def extract_entities(sequences: Sequence[Sequence[str]], token_cls: type | None) -> set[tuple[int, str, int, int]]:
    """Entities as ``(sentence, type, start, end)`` tuples: lenient (conlleval) extraction
    when ``token_cls`` is None, else strict extraction with that seqeval scheme."""
    if token_cls is None:
        from seqeval.metrics.sequence_labeling import get_entities

        return {
            (i, type_, start, end) for i, seq in enumerate(sequences) for type_, start, end in get_entities(list(seq))
        }
    from seqeval.scheme import Entities

    found = Entities([list(s) for s in sequences], token_cls)
    return {e.to_tuple() for sent in found.entities for e in sent}


def ner_report(
    y_true: Sequence[Sequence[str]],
    y_pred: Sequence[Sequence[str]],
    *,
    mode: Literal["strict"] | None = None,
    scheme: Scheme | None = None,
) -> PerClassReport:
    """Entity-level report of tag sequences (one list of tags per sentence, e.g. ``B-PER``).

    ``y_true``, ``y_pred``: N sentences, sentence ``i`` of the same length in both. Returns a
    :class:`PerClassReport` over the entity types found in either side (sorted), with
    ``micro`` (pooled counts: the usual headline "F1"), ``macro`` and ``weighted``; its
    ``to_dict()`` is a plain dict of floats (``f1_micro``, ``f1/PER``, ...).

    Edge cases: N = 0 raises ``ValueError``; in the default mode a tag other than ``O`` and
    ``B-``/``I-``/``E-``/``S-`` (BILOU's ``L-``/``U-``, a bare IO tag ``PER``) raises
    ``ValueError`` (seqeval would warn and mis-read it); sentences without any entity on
    either side give a report with no types and every average 0.0; a type that is never
    predicted gets precision 0 (no warning).
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred differ in number of sentences: {len(y_true)} != {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("y_true and y_pred are empty: nothing to evaluate")
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        if len(t) != len(p):
            raise ValueError(f"sentence {i}: {len(t)} true tags but {len(p)} predicted tags")
    if mode not in (None, "strict"):
        raise ValueError(f"mode must be None or 'strict'; got {mode!r}")
    if mode is None and scheme is not None:
        raise ValueError("scheme applies to mode='strict' only (seqeval ignores it otherwise)")
    token_cls = _token_scheme(scheme, y_true) if mode == "strict" else None
    if token_cls is None:
        _check_lenient_tags(y_true, "y_true")
        _check_lenient_tags(y_pred, "y_pred")
    true_ents = extract_entities(y_true, token_cls)
    pred_ents = extract_entities(y_pred, token_cls)
    n_true = Counter(e[1] for e in true_ents)
    n_pred = Counter(e[1] for e in pred_ents)
    n_tp = Counter(e[1] for e in true_ents & pred_ents)
    types = sorted(n_true.keys() | n_pred.keys())
    return report_from_counts(
        types,
        [n_tp[t] for t in types],
        [n_pred[t] for t in types],
        [n_true[t] for t in types],
        micro=True,
    )


def ids_to_tags(
    predictions: ArrayLike,
    label_ids: ArrayLike,
    id2label: Mapping[int, str] | Sequence[str],
    *,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[list[list[str]], list[list[str]]]:
    """Token-classification outputs to tag sequences for :func:`ner_report`.

    ``predictions``: (B, T) predicted ids, or (B, T, K) logits (argmax over the last axis);
    ``label_ids``: (B, T) with ``ignore_index`` at positions that are not scored (special
    tokens, padding, and non-first sub-word tokens under first-sub-token labelling). Returns
    ``(y_true, y_pred)``: per sequence, the tags at the scored positions only.
    """
    pred = as_numpy(predictions, "predictions", ndim=(2, 3))
    if pred.ndim == 3:
        pred = pred.argmax(axis=-1)
    labels = as_numpy(label_ids, "label_ids", ndim=2)
    if pred.shape != labels.shape:
        raise ValueError(f"predictions {pred.shape} and label_ids {labels.shape} differ in shape")
    names = dict(id2label) if isinstance(id2label, Mapping) else dict(enumerate(id2label))
    y_true: list[list[str]] = []
    y_pred: list[list[str]] = []
    for p_row, l_row in zip(pred, labels):
        keep = l_row != ignore_index
        y_true.append([names[int(i)] for i in l_row[keep]])
        y_pred.append([names[int(i)] for i in np.asarray(p_row)[keep]])
    return y_true, y_pred
