"""Generation metrics: corpus BLEU and chrF (sacrebleu), distinct-n diversity, paired bootstrap.

BLEU and chrF are sacrebleu's corpus scores (0-100) with its defaults - BLEU: 13a
tokenisation, exponential smoothing, case-sensitive; chrF: character 6-grams, beta 2, no word
n-grams (``word_order=2`` gives chrF++) - equal to ``sacrebleu REF -i HYP -m bleu chrf``.
Each comes with sacrebleu's signature string (``nrefs:1|case:mixed|eff:no|tok:13a|...``), to
report next to the score.

References are given per hypothesis: a string, or a list of strings when there are several
(the number may vary between hypotheses).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from losslab.eval.bootstrap import PairedBootstrapResult, paired_bootstrap
from losslab.eval.report import namespace

References = Sequence[str] | Sequence[Sequence[str]]


@dataclass(frozen=True)
class CorpusScore:
    """A sacrebleu corpus score (0-100) and its reproducibility signature."""

    score: float
    signature: str


def _check_texts(texts: Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of strings, not one string")
    out = list(texts)
    if not out:
        raise ValueError(f"{name} is empty: nothing to evaluate")
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a string; got {type(t).__name__}")
    return out


def _reference_streams(references: References, n: int) -> list[list[str | None]]:
    """Per-hypothesis references -> sacrebleu's reference streams (one list per reference
    position, ``None`` where a hypothesis has fewer references)."""
    if isinstance(references, str):
        raise TypeError("references must be a sequence (one entry per hypothesis), not one string")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != n:
        raise ValueError(f"{n} hypotheses but {len(refs)} references")
    for i, r in enumerate(refs):
        if not r or not all(isinstance(x, str) for x in r):
            raise ValueError(f"references[{i}] must be a string or a non-empty list of strings")
    width = max(len(r) for r in refs)
    return [[r[j] if j < len(r) else None for r in refs] for j in range(width)]


def _bleu_metric(tokenize: str = "13a", lowercase: bool = False) -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=tokenize, lowercase=lowercase)


def _chrf_metric(char_order: int = 6, word_order: int = 0, beta: int = 2, lowercase: bool = False) -> Any:
    from sacrebleu.metrics import CHRF

    return CHRF(char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase)


def _corpus_score(metric: Any, hypotheses: Sequence[str], references: References) -> CorpusScore:
    hyps = _check_texts(hypotheses, "hypotheses")
    score = metric.corpus_score(hyps, _reference_streams(references, len(hyps)))
    return CorpusScore(float(score.score), metric.get_signature().format())


def corpus_bleu(
    hypotheses: Sequence[str], references: References, *, tokenize: str = "13a", lowercase: bool = False
) -> CorpusScore:
    """Corpus BLEU (0-100) of N hypotheses against their references (sacrebleu).

    ``BLEU = BP * exp(mean_{n=1..4} log p_n)`` with ``p_n`` the clipped n-gram precision
    pooled over the corpus and ``BP = min(1, exp(1 - ref_len / hyp_len))``. N = 0 raises.
    """
    return _corpus_score(_bleu_metric(tokenize, lowercase), hypotheses, references)


def corpus_chrf(
    hypotheses: Sequence[str],
    references: References,
    *,
    char_order: int = 6,
    word_order: int = 0,
    beta: int = 2,
    lowercase: bool = False,
) -> CorpusScore:
    """Corpus chrF (0-100; chrF++ with ``word_order=2``) of N hypotheses (sacrebleu).

    With corpus-pooled character n-gram precision ``P_n`` and recall ``R_n`` for the orders
    ``n`` present in both sides, ``P``, ``R`` their means:
    ``chrF = (1 + beta^2) P R / (beta^2 P + R)``. N = 0 raises.
    """
    return _corpus_score(_chrf_metric(char_order, word_order, beta, lowercase), hypotheses, references)


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int, *, tokenize: Callable[[str], Sequence[str]] | None = None) -> float:
    """Corpus-level distinct-n: unique n-grams / total n-grams over all generated ``texts``.

    Tokens come from ``tokenize`` (default ``str.split``: whitespace tokenisation, case and
    punctuation kept, so ``"Hi!"`` and ``"hi"`` differ). N-grams do not cross text boundaries;
    texts shorter than ``n`` tokens contribute none. 0.0 when there is no n-gram at all (e.g.
    every text empty); an empty ``texts`` raises ``ValueError``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    split = tokenize or str.split
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in _check_texts(texts, "texts"):
        grams = _ngrams(list(split(text)), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


@dataclass(frozen=True)
class GenerationReport:
    """BLEU, chrF (with signatures) and distinct-n of one set of generations."""

    bleu: CorpusScore
    chrf: CorpusScore
    distinct: dict[str, float]

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """``{"bleu", "chrf", "distinct_1", "distinct_2", ...}``, prefixed ``prefix/`` if given."""
        out = {"bleu": self.bleu.score, "chrf": self.chrf.score, **self.distinct}
        return namespace(out, prefix)

    @property
    def signatures(self) -> dict[str, str]:
        """sacrebleu signatures, ``{"bleu": ..., "chrf": ...}``."""
        return {"bleu": self.bleu.signature, "chrf": self.chrf.signature}


def generation_report(
    hypotheses: Sequence[str],
    references: References,
    *,
    distinct_orders: Sequence[int] = (1, 2),
    tokenize: Callable[[str], Sequence[str]] | None = None,
) -> GenerationReport:
    """BLEU and chrF with sacrebleu's defaults, and ``distinct_<n>`` of the hypotheses for each
    ``n`` of ``distinct_orders`` (``tokenize`` as in :func:`distinct_n`)."""
    return GenerationReport(
        bleu=corpus_bleu(hypotheses, references),
        chrf=corpus_chrf(hypotheses, references),
        distinct={f"distinct_{n}": distinct_n(hypotheses, n, tokenize=tokenize) for n in distinct_orders},
    )


def sentence_statistics(
    hypotheses: Sequence[str],
    references: References,
    *,
    metric: Literal["bleu", "chrf"] = "bleu",
) -> tuple[np.ndarray, Callable[[np.ndarray], float]]:
    """sacrebleu's per-example sufficient statistics of BLEU or chrF, (N, K) float64, and the
    function from summed statistics (K,) to the corpus score. Statistics add up: the rows of
    several runs on the same examples can be summed before resampling."""
    if metric == "bleu":
        scorer = _bleu_metric()
    elif metric == "chrf":
        scorer = _chrf_metric()
    else:
        raise ValueError(f"metric must be 'bleu' or 'chrf'; got {metric!r}")
    hyps = _check_texts(hypotheses, "hypotheses")
    streams = _reference_streams(references, len(hyps))
    # sacrebleu's per-sentence statistics (match counts, lengths) and its score-from-summed-
    # statistics function: the same private pair its own --paired-bs uses.
    stats = np.array(scorer._extract_corpus_statistics(hyps, streams), dtype=np.float64)
    return stats.reshape(len(hyps), -1), lambda summed: float(scorer._compute_score_from_stats(summed).score)


def paired_bootstrap_generation(
    hypotheses_a: Sequence[str],
    hypotheses_b: Sequence[str],
    references: References,
    *,
    metric: Literal["bleu", "chrf"] = "bleu",
    n_samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedBootstrapResult:
    """Is system B's corpus BLEU (or chrF) different from baseline A's on these test examples?

    Both systems' outputs for the same N examples; the examples are resampled with
    replacement (same indices for both), the corpus score recomputed from sacrebleu's
    per-sentence sufficient statistics (:func:`sentence_statistics`). See
    :mod:`losslab.eval.bootstrap` for the p-value (two-sided, identical systems give 1) and
    the interval of ``score_b - score_a``.
    """
    if len(hypotheses_a) != len(hypotheses_b):
        raise ValueError(f"the systems differ in number of outputs: {len(hypotheses_a)} != {len(hypotheses_b)}")
    stats_a, score = sentence_statistics(hypotheses_a, references, metric=metric)
    stats_b, _ = sentence_statistics(hypotheses_b, references, metric=metric)
    return paired_bootstrap(stats_a, stats_b, score, n_samples=n_samples, seed=seed, confidence=confidence)
