"""BLEU / chrF (by hand and against the sacrebleu CLI), distinct-n by hand, paired bootstrap."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from losslab.eval.bootstrap import paired_bootstrap, resample_counts
from losslab.eval.generation import (
    corpus_bleu,
    corpus_chrf,
    distinct_n,
    generation_report,
    paired_bootstrap_generation,
)

HYPS = ["the cat sat on the mat", "hello there my friend", "it is raining today", "I like green tea ."]
REFS = ["the cat sat on a mat", "hello there friend", "it rains today", "I like green tea."]


def test_bleu_by_hand():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat", both 6 tokens (BP = 1):
    # 1-grams 5/6 ("the" clipped to 1), 2-grams 3/5, 3-grams 2/4, 4-grams 1/3
    # BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 100 * (1/12) ** 0.25
    got = corpus_bleu([HYPS[0]], [REFS[0]])
    assert got.score == pytest.approx(100 * (1 / 12) ** 0.25)
    assert got.signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert corpus_bleu(["a b c d"], ["a b c d"]).score == pytest.approx(100.0)


def test_chrf_by_hand():
    # "abc" vs "abd": 1-grams P = R = 2/3, 2-grams 1/2, 3-grams 0/1, no 4..6-grams (not counted);
    # mean P = mean R = (2/3 + 1/2 + 0) / 3 = 7/18, chrF2 = 5 P R / (4 P + R) = 7/18
    got = corpus_chrf(["abc"], ["abd"])
    assert got.score == pytest.approx(100 * 7 / 18)
    assert "nc:6|nw:0" in got.signature
    assert corpus_chrf(["same text"], ["same text"]).score == pytest.approx(100.0)


def test_equal_to_sacrebleu_cli(tmp_path):
    (tmp_path / "hyp.txt").write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(REFS) + "\n", encoding="utf-8")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sacrebleu",
            str(tmp_path / "ref.txt"),
            "-i",
            str(tmp_path / "hyp.txt"),
            "-m",
            "bleu",
            "chrf",
            "-w",
            "6",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cli_bleu, cli_chrf = json.loads(out)
    bleu, chrf = corpus_bleu(HYPS, REFS), corpus_chrf(HYPS, REFS)
    assert bleu.score == pytest.approx(cli_bleu["score"], abs=1e-6)
    assert chrf.score == pytest.approx(cli_chrf["score"], abs=1e-6)
    assert bleu.signature == cli_bleu["signature"]
    assert chrf.signature == cli_chrf["signature"]


def test_multiple_and_variable_references_match_sacrebleu_api():
    import sacrebleu

    refs2 = ["a cat sat on the mat", "hi there my friend", "it is raining now", "I like green tea ."]
    per_hyp = [[r1, r2] for r1, r2 in zip(REFS, refs2)]
    assert corpus_bleu(HYPS, per_hyp).score == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS, refs2]).score)
    variable = [[REFS[0], refs2[0]], REFS[1], [REFS[2]], REFS[3]]
    expected = sacrebleu.corpus_chrf(HYPS, [REFS, [refs2[0], None, None, None]]).score
    assert corpus_chrf(HYPS, variable).score == pytest.approx(expected)


def test_distinct_by_hand():
    texts = ["a b a", "a b c"]
    # 1-grams: a b a a b c -> 3 unique / 6; 2-grams: (a b) (b a) (a b) (b c) -> 3 unique / 4
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    # whitespace tokenisation keeps case and punctuation: "Hi!" != "hi"
    assert distinct_n(["Hi! hi"], 1) == 1.0
    assert distinct_n(["Hi! hi"], 1, tokenize=lambda s: s.lower().replace("!", "").split()) == 0.5
    # n-grams do not cross texts; a text shorter than n contributes none
    assert distinct_n(["a", "a b"], 2) == 1.0
    assert distinct_n(["", "  "], 1) == 0.0  # no n-gram at all
    with pytest.raises(ValueError, match="empty"):
        distinct_n([], 1)
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(texts, 0)


def test_generation_report():
    rep = generation_report(HYPS, REFS)
    flat = rep.to_dict("test")
    assert set(flat) == {"test/bleu", "test/chrf", "test/distinct_1", "test/distinct_2"}
    assert flat["test/bleu"] == pytest.approx(corpus_bleu(HYPS, REFS).score)
    assert flat["test/distinct_1"] == pytest.approx(distinct_n(HYPS, 1))
    assert rep.signatures["chrf"] == corpus_chrf(HYPS, REFS).signature


def test_input_errors():
    with pytest.raises(ValueError, match="empty"):
        corpus_bleu([], [])
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="not one string"):
        corpus_chrf("abc", ["abc"])
    with pytest.raises(ValueError, match="non-empty list"):
        corpus_bleu(["a"], [[]])


def test_resample_counts():
    counts = resample_counts(5, 200, seed=3)
    assert counts.shape == (200, 5) and (counts.sum(axis=1) == 5).all()
    np.testing.assert_array_equal(counts, resample_counts(5, 200, seed=3))
    # each row is a draw of 5 indices with replacement: the counts of one example over many
    # resamples are Binomial(5, 1/5), variance 0.8; and different seeds give different draws
    many = resample_counts(5, 20_000, seed=4)
    assert many.var(axis=0) == pytest.approx(np.full(5, 0.8), abs=0.05)
    assert (np.bincount(many[:, 0], minlength=6) / len(many))[0] == pytest.approx(0.8**5, abs=0.01)
    assert not np.array_equal(counts, resample_counts(5, 200, seed=4))


def _mean_score(s: np.ndarray) -> float:
    return float(s[0] / s[1])


def test_paired_bootstrap_generic_known_cases():
    rng = np.random.default_rng(0)
    x = rng.random(200)
    same = paired_bootstrap(np.c_[x, np.ones(200)], np.c_[x, np.ones(200)], _mean_score, n_samples=500, seed=1)
    assert same.p_value == 1.0 and same.delta == 0.0 and same.ci_low == same.ci_high == 0.0
    better = paired_bootstrap(np.c_[x, np.ones(200)], np.c_[x + 0.1, np.ones(200)], _mean_score, n_samples=500)
    assert better.p_value == pytest.approx(1 / 501) and better.win_rate == 1.0
    assert better.delta == pytest.approx(0.1) and better.ci_low == pytest.approx(0.1)
    # noise with no planted difference: not significant, interval covers 0
    y = rng.permutation(x)
    null = paired_bootstrap(np.c_[x, np.ones(200)], np.c_[y, np.ones(200)], _mean_score, n_samples=500)
    assert null.p_value > 0.5 and null.ci_low < 0 < null.ci_high
    # a planted difference hidden in noise: per-example accuracy 0.5 vs about 0.7
    a = (rng.random(300) < 0.5).astype(float)
    b = np.maximum(a, rng.random(300) < 0.4)
    planted = paired_bootstrap(a, b, lambda s: float(s[0]), n_samples=500)
    assert planted.p_value < 0.05 and planted.ci_low > 0
    assert planted.to_dict("bleu")["bleu/n_samples"] == 500
    with pytest.raises(ValueError, match="nothing to resample"):
        paired_bootstrap(np.zeros((0, 2)), np.zeros((0, 2)), _mean_score)
    with pytest.raises(ValueError, match="differ in shape"):
        paired_bootstrap(np.zeros((3, 2)), np.zeros((4, 2)), _mean_score)


def test_paired_bootstrap_bleu_and_chrf():
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    rng = np.random.default_rng(0)
    refs = [" ".join(rng.choice(words, 8)) for _ in range(40)]
    good = list(refs)  # system B reproduces the references
    bad = [" ".join(r.split()[::-1]) for r in refs]  # system A reverses the word order
    for metric in ("bleu", "chrf"):
        same = paired_bootstrap_generation(bad, bad, refs, metric=metric, n_samples=300)
        assert same.p_value == 1.0 and same.delta == 0.0
        diff = paired_bootstrap_generation(bad, good, refs, metric=metric, n_samples=300, seed=5)
        assert diff.p_value < 0.05 and diff.win_rate == 1.0
        # the scores are sacrebleu's corpus scores (its per-sentence statistics summed)
        scorer = corpus_bleu if metric == "bleu" else corpus_chrf
        assert diff.score_a == pytest.approx(scorer(bad, refs).score)
        assert diff.score_b == pytest.approx(100.0)
        assert diff == paired_bootstrap_generation(bad, good, refs, metric=metric, n_samples=300, seed=5)
    with pytest.raises(ValueError, match="bleu' or 'chrf"):
        paired_bootstrap_generation(bad, good, refs, metric="ter")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="number of outputs"):
        paired_bootstrap_generation(bad, good[:-1], refs)
