"""Classification metrics: accuracy and the per-class report (precision, recall, F1, support with
macro / weighted averages), multi-label F1, regression errors and correlations, and the
streaming :class:`ClassificationAccumulator`.

Everything is computed from counts (the confusion matrix, per-label counts), never from
averaged batch scores, so results are exact however the predictions were batched. Formulas,
``zero_division`` and the classes of a report: docs/metrics.md, "Classification".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from losslab.eval._arrays import ArrayLike, as_float_array, as_numpy, check_same_length, safe_divide
from losslab.eval._state import SumState
from losslab.eval.report import format_table, format_value, namespace


@dataclass(frozen=True)
class Scores:
    """Precision, recall, F1 and support (the number of true instances) of a class or average."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class PerClassReport:
    """The classic classification report: per-class scores and their averages.

    Used for single-label classification (``extra = {"accuracy": ...}``, ``micro`` None),
    multi-label classification (``extra = {"subset_accuracy": ..., "hamming_loss": ...}``)
    and entity-level NER (``extra`` empty). Flatten it with :meth:`to_dict`, print it with
    :meth:`format`.
    """

    per_class: dict[str, Scores]
    macro: Scores
    weighted: Scores
    micro: Scores | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self, prefix: str = "", *, per_class: bool = True) -> dict[str, float]:
        """Flat metrics: the ``extra`` scalars, ``{precision,recall,f1}_{micro,macro,weighted}``
        and, when ``per_class``, ``precision/<label>``, ``recall/<label>``, ``f1/<label>``,
        ``support/<label>`` (an int). ``prefix`` (e.g. ``"test"``) is prepended as
        ``test/...``.
        """
        out: dict[str, float] = dict(self.extra)
        for avg_name, avg in (("micro", self.micro), ("macro", self.macro), ("weighted", self.weighted)):
            if avg is not None:
                out[f"precision_{avg_name}"] = avg.precision
                out[f"recall_{avg_name}"] = avg.recall
                out[f"f1_{avg_name}"] = avg.f1
        if per_class:
            for label, s in self.per_class.items():
                out[f"precision/{label}"] = s.precision
                out[f"recall/{label}"] = s.recall
                out[f"f1/{label}"] = s.f1
                out[f"support/{label}"] = s.support
        return namespace(out, prefix)

    def format(self, digits: int = 4) -> str:
        """A fixed-width text table in the layout of scikit-learn's ``classification_report``."""

        def row(name: str, s: Scores) -> list[str]:
            return [name, *(format_value(v, digits) for v in (s.precision, s.recall, s.f1)), str(s.support)]

        total = self.macro.support
        rows: list[list[str]] = [row(label, s) for label, s in self.per_class.items()]
        rows.append([])
        for name, value in self.extra.items():
            rows.append([name, "", "", format_value(value, digits), str(total)])
        for avg_name, avg in (("micro", self.micro), ("macro", self.macro), ("weighted", self.weighted)):
            if avg is not None:
                rows.append(row(f"{avg_name} avg", avg))
        return format_table(["", "precision", "recall", "f1-score", "support"], rows)

    def __str__(self) -> str:
        return self.format()


def report_from_counts(
    labels: Sequence[str],
    tp: ArrayLike,
    predicted: ArrayLike,
    support: ArrayLike,
    *,
    micro: bool = True,
    extra: dict[str, float] | None = None,
    zero_division: float = 0.0,
) -> PerClassReport:
    """The report from per-class counts, each of shape (C,): true positives, predictions, and
    true instances (support). See the module docstring for the formulas.

    Macro and weighted averages run over all C classes given, including classes with support
    0 (they count as 0 in the macro mean and weigh 0 in the weighted mean). With no classes
    at all (C = 0, e.g. NER data without any entity) every average is ``zero_division``.
    """
    tp_a, pred_a, true_a = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (tp, predicted, support))
    if not len(labels) == len(tp_a) == len(pred_a) == len(true_a):
        raise ValueError("labels, tp, predicted and support must have the same length")
    if (tp_a > pred_a).any() or (tp_a > true_a).any() or (tp_a < 0).any():
        raise ValueError("counts must satisfy 0 <= tp <= predicted and tp <= support")
    precision = safe_divide(tp_a, pred_a, zero_division)
    recall = safe_divide(tp_a, true_a, zero_division)
    f1 = safe_divide(2 * tp_a, pred_a + true_a, zero_division)
    n_true = int(true_a.sum())
    per_class = {
        str(label): Scores(float(p), float(r), float(f), int(s))
        for label, p, r, f, s in zip(labels, precision, recall, f1, true_a)
    }
    zd = float(zero_division)
    if len(labels):
        macro = Scores(float(precision.mean()), float(recall.mean()), float(f1.mean()), n_true)
    else:
        macro = Scores(zd, zd, zd, 0)
    if n_true > 0:
        w = true_a / n_true
        weighted = Scores(float(precision @ w), float(recall @ w), float(f1 @ w), n_true)
    else:
        weighted = Scores(zd, zd, zd, 0)
    micro_scores = None
    if micro:
        t, p_, s_ = tp_a.sum(), pred_a.sum(), true_a.sum()
        micro_scores = Scores(
            float(safe_divide(t, p_, zd)), float(safe_divide(t, s_, zd)), float(safe_divide(2 * t, p_ + s_, zd)), n_true
        )
    return PerClassReport(per_class, macro, weighted, micro_scores, dict(extra or {}))


def report_from_confusion(
    confusion: ArrayLike, labels: Sequence[str] | None = None, *, zero_division: float = 0.0
) -> PerClassReport:
    """The single-label report from a confusion matrix (C, C), rows = true, columns = predicted.

    ``labels`` names the C classes (default ``"0"`` ... ``"C-1"``). ``extra`` holds
    ``accuracy = trace(M) / M.sum()``; an all-zero matrix raises ``ValueError``.
    """
    m = as_numpy(confusion, "confusion", ndim=2).astype(np.float64)
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion must be square; got shape {m.shape}")
    total = m.sum()
    if total <= 0:
        raise ValueError("the confusion matrix is empty: nothing to evaluate")
    names = [str(i) for i in range(m.shape[0])] if labels is None else [str(x) for x in labels]
    if len(names) != m.shape[0]:
        raise ValueError(f"{len(names)} labels for a {m.shape[0]}-class confusion matrix")
    tp = np.diag(m)
    return report_from_counts(
        names,
        tp,
        m.sum(axis=0),
        m.sum(axis=1),
        micro=False,
        extra={"accuracy": float(tp.sum() / total)},
        zero_division=zero_division,
    )


def _encode(
    y_true: ArrayLike, y_pred: ArrayLike, labels: Sequence[str] | None, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Class ids (N,) for both and the class names, from ids or from names."""
    t = as_numpy(y_true, "y_true", ndim=1)
    p = as_numpy(y_pred, "y_pred", ndim=1)
    check_same_length(t, p, "y_true", "y_pred")
    if t.dtype.kind in "USO" or p.dtype.kind in "USO":  # class names
        t, p = t.astype(str), p.astype(str)
        names = list(labels) if labels is not None else sorted(set(t.tolist()) | set(p.tolist()))
        index = {str(n): i for i, n in enumerate(names)}
        if len(index) != len(names):
            raise ValueError("labels contains duplicates")
        unknown = (set(t.tolist()) | set(p.tolist())) - index.keys()
        if unknown:
            raise ValueError(f"labels not in `labels`: {sorted(unknown)[:10]}")
        return np.array([index[x] for x in t]), np.array([index[x] for x in p]), [str(n) for n in names]
    if t.dtype.kind not in "iub" or p.dtype.kind not in "iub":
        raise ValueError(f"class ids must be integers; got {t.dtype} and {p.dtype}")
    t, p = t.astype(np.int64), p.astype(np.int64)
    if min(t.min(), p.min()) < 0:
        raise ValueError("class ids must be >= 0 (drop ignored positions such as -100 first)")
    if labels is not None and num_classes is not None and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels but num_classes={num_classes}")
    if labels is not None or num_classes is not None:
        c = len(labels) if labels is not None else int(num_classes)  # type: ignore[arg-type]
        if max(t.max(), p.max()) >= c:
            raise ValueError(f"class id {max(t.max(), p.max())} out of range for {c} classes")
        names = [str(x) for x in labels] if labels is not None else [str(i) for i in range(c)]
        return t, p, names
    present = np.union1d(t, p)  # like scikit-learn: the classes seen in either array
    return np.searchsorted(present, t), np.searchsorted(present, p), [str(i) for i in present]


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """Counts (C, C) int64: ``M[i, j]`` = examples with true id ``i`` predicted as ``j``.

    ``y_true``, ``y_pred``: integer class ids (N,) in ``[0, num_classes)``; N = 0 gives all
    zeros. Non-integer ids (e.g. float scores passed by mistake) raise ``ValueError`` rather
    than being truncated.
    """
    t = as_numpy(y_true, "y_true", ndim=1)
    p = as_numpy(y_pred, "y_pred", ndim=1)
    if len(t) != len(p):
        raise ValueError(f"y_true and y_pred differ in length: {len(t)} != {len(p)}")
    if len(t) and (t.dtype.kind not in "iub" or p.dtype.kind not in "iub"):
        raise ValueError(f"class ids must be integers; got {t.dtype} and {p.dtype}")
    t, p = t.astype(np.int64), p.astype(np.int64)
    if len(t) and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"class ids must be in [0, {num_classes})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """``mean(y_true == y_pred)`` over N examples (ids or names, shape (N,)); N = 0 raises."""
    t = as_numpy(y_true, "y_true", ndim=1)
    p = as_numpy(y_pred, "y_pred", ndim=1)
    check_same_length(t, p, "y_true", "y_pred")
    return float(np.mean(t == p))


def classification_report(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    labels: Sequence[str] | None = None,
    num_classes: int | None = None,
    zero_division: float = 0.0,
) -> PerClassReport:
    """Accuracy and per-class precision / recall / F1 / support with macro and weighted averages.

    ``y_true``, ``y_pred``: (N,) class ids (ints >= 0) or class names (strings); N = 0 raises
    ``ValueError``. The classes of the report, in order:

    - names in: ``labels`` if given (every name must be in it), else the sorted union of the
      names in ``y_true`` and ``y_pred``;
    - ids in: ``labels`` (names of ids ``0..C-1``) or ``num_classes`` if given, so a class
      that never occurs still counts in the macro average; else the sorted union of the ids
      present, named by their id (scikit-learn's default).
    """
    t, p, names = _encode(y_true, y_pred, labels, num_classes)
    return report_from_confusion(confusion_matrix(t, p, len(names)), names, zero_division=zero_division)


class ClassificationAccumulator(SumState):
    """Streaming single-label report: ``update`` per batch, ``compute`` at the end.

    The state is the confusion matrix (C, C), so the result equals
    :func:`classification_report` on all predictions at once with ``num_classes=C``, for any
    batching and any number of processes (``compute(sync=True)`` all-reduces it when a
    ``torch.distributed`` group is initialised; :meth:`merge` adds another accumulator).
    """

    def __init__(self, num_classes: int, labels: Sequence[str] | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"{len(labels)} labels but num_classes={num_classes}")
        self.num_classes = num_classes
        self.labels = [str(x) for x in labels] if labels is not None else None
        super().__init__(confusion=(num_classes, num_classes))

    def update(self, y_true: ArrayLike, y_pred: ArrayLike) -> None:
        """Add a batch of class ids, ``y_true`` and ``y_pred`` of shape (n,)."""
        self.state["confusion"] += confusion_matrix(y_true, y_pred, self.num_classes)

    def compute(self, *, sync: bool = True, zero_division: float = 0.0) -> PerClassReport:
        """The report over everything seen (by every process when ``sync``); empty raises."""
        return report_from_confusion(self.global_state(sync)["confusion"], self.labels, zero_division=zero_division)


def multilabel_report(
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    threshold: float = 0.5,
    from_logits: bool = False,
    labels: Sequence[str] | None = None,
    zero_division: float = 0.0,
) -> PerClassReport:
    """Multi-label (BCE head) report: per-label P/R/F1/support, micro, macro, weighted.

    ``y_true``: (N, L) of 0/1. ``y_score``: (N, L) probabilities (or 0/1 predictions); with
    ``from_logits`` they are logits and ``sigmoid`` is applied first. A label is predicted
    when ``score >= threshold``. ``extra``: ``subset_accuracy`` (the fraction of examples
    whose whole label set is right) and ``hamming_loss`` (the fraction of wrong label
    decisions). Micro F1 pools the counts of all labels, macro F1 averages the L per-label
    F1s. N = 0 raises ``ValueError``.
    """
    t = as_numpy(y_true, "y_true", ndim=2)
    s = as_float_array(y_score, "y_score", ndim=2)
    if t.shape != s.shape:
        raise ValueError(f"y_true {t.shape} and y_score {s.shape} differ in shape")
    check_same_length(t, s, "y_true", "y_score")
    if not np.isin(t, (0, 1)).all():
        raise ValueError("y_true must contain only 0 and 1")
    if from_logits:
        s = 0.5 * (1.0 + np.tanh(0.5 * s))  # sigmoid without overflow warnings
    t = t.astype(bool)
    p = s >= threshold
    names = [str(x) for x in labels] if labels is not None else [str(i) for i in range(t.shape[1])]
    if len(names) != t.shape[1]:
        raise ValueError(f"{len(names)} labels for {t.shape[1]} label columns")
    extra = {"subset_accuracy": float(np.mean((t == p).all(axis=1))), "hamming_loss": float(np.mean(t != p))}
    return report_from_counts(
        names, (t & p).sum(axis=0), p.sum(axis=0), t.sum(axis=0), micro=True, extra=extra, zero_division=zero_division
    )


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of (N,) ``x`` and ``y``; NaN when N < 2 or either side is constant.

    Constancy is tested on the values themselves, not on the centred sums: ``x - x.mean()`` of
    a constant ``x`` such as ``[0.3] * 10`` is rounding noise (~1e-17), not zero, and would
    give a meaningless finite number.
    """
    if len(x) < 2 or (x == x[0]).all() or (y == y[0]).all():
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / den if den > 0 else math.nan


def regression_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """``mse``, ``rmse``, ``mae``, ``pearson`` and ``spearman`` of (N,) or (N, D) targets.

    ``mse = mean((y_pred - y_true)^2)``, ``rmse = sqrt(mse)``, ``mae = mean(|y_pred - y_true|)``
    over all N*D values; ``pearson`` = the correlation of the flattened values; ``spearman`` =
    Pearson of their ranks (ties get their average rank). A correlation is NaN when it is
    undefined (fewer than 2 values, or either side constant). N = 0 or NaN inputs raise.
    """
    t = as_float_array(y_true, "y_true", ndim=(1, 2))
    p = as_float_array(y_pred, "y_pred", ndim=(1, 2))
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    check_same_length(t, p, "y_true", "y_pred")
    t, p = t.reshape(-1), p.reshape(-1)
    err = p - t
    mse = float(np.mean(err**2))
    from scipy.stats import rankdata

    return {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(np.mean(np.abs(err))),
        "pearson": _pearson(t, p),
        "spearman": _pearson(rankdata(t), rankdata(p)),
    }
