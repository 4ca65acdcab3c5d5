"""Per-example statistics of a run's saved outputs, for the paired bootstrap over test examples
(:func:`losslab.eval.bootstrap.paired_bootstrap`).

From ``predictions_<split>.jsonl`` (written by the classification-style tasks) it gives, for a
metric that is a function of summed per-example statistics, the statistics (N, K) and the
corpus score of summed statistics: confusion-matrix cells for single-label classes (over the
classes of the run's metrics.json), squared and absolute errors for regression, entity and
word counts for NER, win and margin for reward pairs. Other metrics give None. Which metrics
these are: docs/compare.md, "Statistics".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Stats = tuple[np.ndarray, Callable[[np.ndarray], float]]

NER_METRICS = {"f1_micro", "precision_micro", "recall_micro", "token_accuracy"}
REGRESSION_METRICS = {"mse", "rmse", "mae"}
REWARD_METRICS = {"pairwise_accuracy", "reward_accuracy", "reward_margin"}  # (reward_accuracy: preference)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_predictions(run_dir: Path, split: str = "test") -> list[dict[str, Any]]:
    """A run's saved per-example predictions (empty when absent)."""
    return read_jsonl(run_dir / f"predictions_{split}.jsonl")


def kind(rows: list[dict[str, Any]]) -> str | None:
    """``class``, ``multi_label``, ``regression``, ``ner`` or ``reward`` from the first record."""
    if not rows:
        return None
    row = rows[0]
    if "reward_chosen" in row:
        return "reward"
    if "tokens" in row:
        return "ner"
    gold = row.get("gold")
    if isinstance(gold, list):
        return "multi_label"
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        return "regression"
    return "class" if isinstance(gold, str) else None


EXAMPLE_FIELDS = ("text", "tokens", "prompt", "chosen", "rejected", "gold")
"""The fields of a predictions row that say which test example it is (the rest is the run's output)."""


def example_id(row: dict[str, Any]) -> str:
    """Which test example a predictions row is about: its input and gold fields, not the
    prediction or its score, so the rows of two runs on the same examples compare equal."""
    return json.dumps({k: row[k] for k in EXAMPLE_FIELDS if k in row}, sort_keys=True, default=str)


def class_names(metrics: dict[str, Any], split: str, rows: list[dict[str, Any]]) -> list[str]:
    """The classes of a run's report (its ``<split>/support/<class>`` keys), then any other name seen."""
    prefix = f"{split}/support/"
    names = [k[len(prefix) :] for k in metrics if k.startswith(prefix)]
    for row in rows:
        for name in (row["gold"], row["predicted"]):
            if name not in names:
                names.append(name)
    return names


def example_stats(metric: str, rows: list[dict[str, Any]], names: list[str]) -> Stats | None:
    """Per-example statistics (N, K) of ``rows`` and the score of their column sums for ``metric``
    (the metric name without its split), or None when ``metric`` is not such a metric."""
    k = kind(rows)
    if k == "class":
        return _class_stats(metric, rows, names)
    if k == "regression" and metric in REGRESSION_METRICS:
        err = np.array([float(r["predicted"]) - float(r["gold"]) for r in rows])
        stats = np.stack([err**2, np.abs(err), np.ones_like(err)], axis=1)
        col = {"mse": 0, "rmse": 0, "mae": 1}[metric]
        root = metric == "rmse"
        return stats, lambda s: float(math.sqrt(s[col] / s[2]) if root else s[col] / s[2])
    if k == "ner" and metric in NER_METRICS:
        return np.array([_ner_counts(r) for r in rows], dtype=np.float64), _ner_score(metric)
    if k == "reward" and metric in REWARD_METRICS:
        diff = np.array([float(r["reward_chosen"]) - float(r["reward_rejected"]) for r in rows])
        win = np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))
        stats = np.stack([diff if metric == "reward_margin" else win, np.ones_like(diff)], axis=1)
        return stats, lambda s: float(s[0] / s[1])
    return None


def _class_stats(metric: str, rows: list[dict[str, Any]], names: list[str]) -> Stats | None:
    from losslab.eval.classification import report_from_confusion

    index = {n: i for i, n in enumerate(names)}
    c = len(names)
    probe = report_from_confusion(np.eye(c), names).to_dict()
    if metric not in probe:
        return None
    stats = np.zeros((len(rows), c * c))
    for i, r in enumerate(rows):
        stats[i, index[r["gold"]] * c + index[r["predicted"]]] = 1.0
    return stats, lambda s: float(report_from_confusion(s.reshape(c, c), names).to_dict()[metric])


def _ner_counts(row: dict[str, Any]) -> list[float]:
    from losslab.eval.ner import extract_entities

    gold, pred = row["gold"], row["predicted"]
    true_ents, pred_ents = extract_entities([gold], None), extract_entities([pred], None)
    correct = sum(g == p for g, p in zip(gold, pred))
    return [len(true_ents & pred_ents), len(pred_ents), len(true_ents), correct, len(gold)]


def _ner_score(metric: str) -> Callable[[np.ndarray], float]:
    def score(s: np.ndarray) -> float:
        tp, n_pred, n_true, correct, scored = s
        if metric == "token_accuracy":
            return float(correct / scored) if scored else 0.0
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        if metric == "precision_micro":
            return float(precision)
        if metric == "recall_micro":
            return float(recall)
        return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0

    return score


def display(row: dict[str, Any]) -> tuple[str, str, str]:
    """(input, reference, output) of one prediction record, as text for the report."""
    k = kind([row])
    if k == "reward":
        prompt = (
            f"{row.get('prompt') or ''}\n\nchosen: {row.get('chosen') or ''}\n\nrejected: {row.get('rejected') or ''}"
        )
        c, r = float(row["reward_chosen"]), float(row["reward_rejected"])
        verdict = "right" if c > r else "tie" if c == r else "wrong"
        return prompt, "chosen > rejected", f"{c:.3f} vs {r:.3f} ({verdict})"
    if k == "ner":
        tokens = row.get("tokens") or []
        return " ".join(tokens), _tagged(tokens, row["gold"]), _tagged(tokens, row["predicted"])
    if k == "multi_label":
        return str(row.get("text") or ""), ", ".join(row["gold"]) or "(none)", ", ".join(row["predicted"]) or "(none)"
    if k == "regression":
        return str(row.get("text") or ""), f"{float(row['gold']):.4g}", f"{float(row['predicted']):.4g}"
    reply = str(row.get("predicted"))
    if row.get("score") is not None:
        reply += f" ({float(row['score']):.2f})"
    if row.get("gold") is not None and row.get("gold") != row.get("predicted"):
        reply += " ✗"
    return str(row.get("text") or ""), str(row.get("gold")), reply


def _tagged(tokens: list[str], tags: list[str]) -> str:
    """Words with their tag where it is not ``O`` (``Paris/B-LOC``); the tags alone when they do not align."""
    if len(tags) != len(tokens):
        return " ".join(tags)
    return " ".join(w if t == "O" else f"{w}/{t}" for w, t in zip(tokens, tags))
