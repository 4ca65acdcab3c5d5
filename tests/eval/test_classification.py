"""Classification metrics against hand-worked counts and against scikit-learn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from losslab.eval.classification import (
    ClassificationAccumulator,
    accuracy,
    classification_report,
    confusion_matrix,
    multilabel_report,
    regression_metrics,
    report_from_confusion,
    report_from_counts,
)

# A 3-class example worked out by hand.
#   y_true = 0 0 0 0 | 1 1 1 | 2 2 2
#   y_pred = 0 0 1 2 | 1 1 0 | 2 2 1
# Confusion (rows true, columns predicted):   predicted-per-class (column sums) = 3 4 3
#   [[2, 1, 1],                                support (row sums)               = 4 3 3
#    [1, 2, 0],                                tp (diagonal)                    = 2 2 2
#    [0, 1, 2]]
# precision = 2/3, 2/4, 2/3; recall = 2/4, 2/3, 2/3; f1 = 2tp/(pred+support) = 4/7, 4/7, 4/6
# accuracy = 6/10; macro P = (2/3 + 1/2 + 2/3)/3 = 11/18; macro R = 11/18;
# macro F1 = (4/7 + 4/7 + 2/3)/3 = 38/63; weighted P = (4*2/3 + 3*1/2 + 3*2/3)/10 = 37/60;
# weighted R = (4*1/2 + 3*2/3 + 3*2/3)/10 = 6/10; weighted F1 = (4*4/7 + 3*4/7 + 3*2/3)/10 = 6/10.
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]
NAMES = ["neg", "neu", "pos"]


def test_confusion_matrix_by_hand():
    np.testing.assert_array_equal(confusion_matrix(Y_TRUE, Y_PRED, 3), [[2, 1, 1], [1, 2, 0], [0, 1, 2]])
    assert confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]


def test_report_by_hand():
    rep = classification_report(Y_TRUE, Y_PRED, labels=NAMES)
    m = rep.to_dict()
    assert m["accuracy"] == pytest.approx(0.6)
    for name, p, r, f, s in [
        ("neg", 2 / 3, 1 / 2, 4 / 7, 4),
        ("neu", 1 / 2, 2 / 3, 4 / 7, 3),
        ("pos", 2 / 3, 2 / 3, 2 / 3, 3),
    ]:
        assert m[f"precision/{name}"] == pytest.approx(p)
        assert m[f"recall/{name}"] == pytest.approx(r)
        assert m[f"f1/{name}"] == pytest.approx(f)
        assert m[f"support/{name}"] == s and isinstance(m[f"support/{name}"], int)
    assert m["precision_macro"] == pytest.approx(11 / 18)
    assert m["recall_macro"] == pytest.approx(11 / 18)
    assert m["f1_macro"] == pytest.approx(38 / 63)
    assert m["precision_weighted"] == pytest.approx(37 / 60)
    assert m["recall_weighted"] == pytest.approx(0.6)
    assert m["f1_weighted"] == pytest.approx(0.6)
    assert "f1_micro" not in m  # single-label micro F1 is the accuracy
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(0.6)


def test_names_ids_and_tensors_agree():
    by_ids = classification_report(torch.tensor(Y_TRUE), np.array(Y_PRED), labels=NAMES).to_dict()
    by_names = classification_report([NAMES[i] for i in Y_TRUE], [NAMES[i] for i in Y_PRED]).to_dict()
    assert by_ids == pytest.approx(by_names)


def test_to_dict_prefix_and_text_table():
    rep = classification_report(Y_TRUE, Y_PRED, labels=NAMES)
    flat = rep.to_dict("test", per_class=False)
    assert flat["test/accuracy"] == pytest.approx(0.6)
    assert set(flat) == {"test/accuracy"} | {
        f"test/{m}_{a}" for m in ("precision", "recall", "f1") for a in ("macro", "weighted")
    }
    text = rep.format(digits=2)
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    assert lines[1].split() == ["neg", "0.67", "0.50", "0.57", "4"]
    assert lines[5].split() == ["accuracy", "0.60", "10"]
    assert lines[6].split() == ["macro", "avg", "0.61", "0.61", "0.60", "10"]
    assert str(rep) == rep.format()


def test_class_never_predicted_gives_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_report([0, 1, 2, 2], [0, 0, 0, 2], num_classes=4).to_dict()
    assert m["precision/1"] == 0.0 and m["recall/1"] == 0.0 and m["f1/1"] == 0.0
    # class 3 neither occurs nor is predicted: all zero, weight 0 in the weighted mean, but
    # counted in the macro mean (like scikit-learn with labels=range(4))
    assert m["support/3"] == 0 and m["f1/3"] == 0.0
    assert m["f1_macro"] == pytest.approx((2 / 4 + 0 + 2 / 3 + 0) / 4)
    assert m["f1_weighted"] == pytest.approx((1 * 2 / 4 + 1 * 0 + 2 * 2 / 3) / 4)
    assert classification_report([0], [1], num_classes=2, zero_division=1.0).to_dict()["precision/0"] == 1.0


def test_empty_and_bad_inputs_raise():
    with pytest.raises(ValueError, match="empty"):
        classification_report([], [])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="differ in length"):
        classification_report([0, 1], [0])
    with pytest.raises(ValueError, match=">= 0"):
        classification_report([0, -100], [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        classification_report([0, 3], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="not in `labels`"):
        classification_report(["a", "b"], ["a", "c"], labels=["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        report_from_confusion(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="tp <= predicted"):
        report_from_counts(["a"], [2], [1], [2])


def test_report_without_classes_is_all_zero():
    rep = report_from_counts([], [], [], [])
    assert rep.to_dict() == {
        f"{m}_{a}": 0.0 for a in ("micro", "macro", "weighted") for m in ("precision", "recall", "f1")
    }


def test_against_sklearn_on_random_data():
    import sklearn.metrics as sk  # the test extra installs it

    rng = np.random.default_rng(0)
    for trial in range(5):
        c = int(rng.integers(2, 7))
        n = int(rng.integers(1, 60))
        t = rng.integers(0, c, n)
        p = np.where(rng.random(n) < 0.5, t, rng.integers(0, c, n))  # better than chance
        ours = classification_report(t, p, num_classes=c)
        ref = sk.classification_report(t, p, labels=list(range(c)), output_dict=True, zero_division=0)
        for i in range(c):
            s = ours.per_class[str(i)]
            assert (s.precision, s.recall, s.f1, s.support) == pytest.approx(
                (ref[str(i)]["precision"], ref[str(i)]["recall"], ref[str(i)]["f1-score"], ref[str(i)]["support"])
            ), trial
        for avg, ref_key in (("macro", "macro avg"), ("weighted", "weighted avg")):
            got = getattr(ours, avg)
            assert (got.precision, got.recall, got.f1) == pytest.approx(
                (ref[ref_key]["precision"], ref[ref_key]["recall"], ref[ref_key]["f1-score"])
            )
        assert ours.extra["accuracy"] == pytest.approx(sk.accuracy_score(t, p))
        # default classes: the union of those present, as scikit-learn's default
        got = classification_report(t, p).macro
        assert (got.precision, got.recall, got.f1) == pytest.approx(
            sk.precision_recall_fscore_support(t, p, average="macro", zero_division=0)[:3]
        )


def test_accumulator_is_exact_across_batches_and_merges():
    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 4, 101), rng.integers(0, 4, 101)
    one_shot = classification_report(t, p, num_classes=4).to_dict()
    acc, other = ClassificationAccumulator(4), ClassificationAccumulator(4)
    for lo, hi in [(0, 7), (7, 8), (8, 60)]:
        acc.update(t[lo:hi], p[lo:hi])
    other.update(torch.tensor(t[60:]), torch.tensor(p[60:]))
    acc.merge(other)
    assert acc.compute().to_dict() == pytest.approx(one_shot)
    restored = ClassificationAccumulator(4)
    restored.load_state_dict(acc.state_dict())
    assert restored.compute().to_dict() == pytest.approx(one_shot)
    acc.reset()
    with pytest.raises(ValueError, match="empty"):
        acc.compute()
    with pytest.raises(ValueError, match="cannot merge"):
        acc.merge(ClassificationAccumulator(3))
    named = ClassificationAccumulator(3, labels=NAMES)
    named.update(Y_TRUE, Y_PRED)
    assert named.compute().to_dict() == pytest.approx(classification_report(Y_TRUE, Y_PRED, labels=NAMES).to_dict())


# Multi-label, worked by hand (threshold 0.5):
#   y_true          probabilities          predicted
#   [1, 0, 1]       [0.9, 0.2, 0.4]        [1, 0, 0]
#   [0, 1, 0]       [0.1, 0.7, 0.6]        [0, 1, 1]
#   [1, 1, 0]       [0.8, 0.6, 0.1]        [1, 1, 0]
#   [0, 0, 1]       [0.2, 0.1, 0.3]        [0, 0, 0]
# label 0: tp 2 pred 2 true 2 -> P 1, R 1, F 1;  label 1: tp 2 pred 2 true 2 -> 1, 1, 1;
# label 2: tp 0 pred 1 true 2 -> 0, 0, 0.  micro: tp 4, pred 5, true 6 -> P 4/5, R 4/6,
# F 8/11; macro F1 2/3; weighted F1 (2 + 2 + 0)/6 = 2/3; exact rows 1 of 4; wrong cells 3 of 12.
ML_TRUE = [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]]
ML_PROB = [[0.9, 0.2, 0.4], [0.1, 0.7, 0.6], [0.8, 0.6, 0.1], [0.2, 0.1, 0.3]]


def test_multilabel_by_hand():
    m = multilabel_report(ML_TRUE, ML_PROB, labels=["a", "b", "c"]).to_dict()
    assert m["precision_micro"] == pytest.approx(4 / 5)
    assert m["recall_micro"] == pytest.approx(4 / 6)
    assert m["f1_micro"] == pytest.approx(8 / 11)
    assert m["f1_macro"] == pytest.approx(2 / 3)
    assert m["f1_weighted"] == pytest.approx(2 / 3)
    assert m["f1/c"] == 0.0 and m["support/c"] == 2
    assert m["subset_accuracy"] == pytest.approx(1 / 4)
    assert m["hamming_loss"] == pytest.approx(3 / 12)
    logits = torch.logit(torch.tensor(ML_PROB, dtype=torch.float64))
    assert multilabel_report(ML_TRUE, logits, from_logits=True, labels=["a", "b", "c"]).to_dict() == pytest.approx(m)
    # a higher threshold drops the 0.6 predictions: label 1 row 2 becomes a miss
    assert multilabel_report(ML_TRUE, ML_PROB, threshold=0.65).to_dict()["recall/1"] == pytest.approx(1 / 2)


def test_multilabel_against_sklearn():
    import sklearn.metrics as sk  # the test extra installs it

    rng = np.random.default_rng(2)
    t = rng.integers(0, 2, (40, 5))
    prob = np.clip(t * 0.6 + rng.random((40, 5)) * 0.5, 0, 1)
    m = multilabel_report(t, prob, threshold=0.5).to_dict()
    pred = (prob >= 0.5).astype(int)
    for avg in ("micro", "macro", "weighted"):
        ref = sk.precision_recall_fscore_support(t, pred, average=avg, zero_division=0)
        assert (m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"]) == pytest.approx(ref[:3])
    assert m["subset_accuracy"] == pytest.approx(sk.accuracy_score(t, pred))
    assert m["hamming_loss"] == pytest.approx(sk.hamming_loss(t, pred))


def test_multilabel_bad_inputs():
    with pytest.raises(ValueError, match="only 0 and 1"):
        multilabel_report([[2, 0]], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="differ in shape"):
        multilabel_report([[1, 0]], [[0.5, 0.5, 0.1]])
    with pytest.raises(ValueError, match="empty"):
        multilabel_report(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="NaN"):
        multilabel_report([[1, 0]], [[math.nan, 0.5]])


def test_regression_by_hand():
    # err = [0, 1, -1, 1]: mse = 3/4, mae = 3/4. Centred: t = [-1.5, -.5, .5, 1.5],
    # p = [-1.75, .25, -.75, 2.25]: pearson = 5.5 / sqrt(5 * 8.75). Ranks of p = [1, 3, 2, 4],
    # d = [0, 1, -1, 0]: spearman = 1 - 6 * 2 / (4 * 15) = 0.8.
    m = regression_metrics([1.0, 2.0, 3.0, 4.0], torch.tensor([1.0, 3.0, 2.0, 5.0]))
    assert m["mse"] == pytest.approx(0.75)
    assert m["rmse"] == pytest.approx(math.sqrt(0.75))
    assert m["mae"] == pytest.approx(0.75)
    assert m["pearson"] == pytest.approx(5.5 / math.sqrt(5 * 8.75))
    assert m["spearman"] == pytest.approx(0.8)


def test_regression_against_scipy_and_edge_cases():
    from scipy import stats  # the test extra installs it

    rng = np.random.default_rng(3)
    t = rng.normal(size=30)
    p = np.round(t + rng.normal(size=30), 1)  # rounding makes ties
    m = regression_metrics(t, p)
    assert m["pearson"] == pytest.approx(stats.pearsonr(t, p)[0])
    assert m["spearman"] == pytest.approx(stats.spearmanr(t, p)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        const = regression_metrics([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
        single = regression_metrics([1.0], [1.5])
    assert math.isnan(const["pearson"]) and math.isnan(const["spearman"])
    assert const["mse"] == pytest.approx(2 / 3)
    assert math.isnan(single["pearson"]) and single["mae"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        regression_metrics([], [])
    with pytest.raises(ValueError, match="differ in shape"):
        regression_metrics([1.0, 2.0], [1.0])


def test_constant_side_with_float_rounding_gives_nan_correlation():
    # mean([0.3] * 10) is 0.30000000000000004, so the centred values are ~1e-17, not 0: a
    # check on the centred sums returns a finite "correlation" (0.0) for a constant side.
    const = np.full(10, 0.3)
    other = np.arange(10.0)
    m = regression_metrics(const, other)
    assert math.isnan(m["pearson"]) and math.isnan(m["spearman"])
    assert math.isnan(regression_metrics(other, const)["pearson"])
    assert math.isnan(regression_metrics(np.full(7, 1 / 3), np.arange(7.0))["pearson"])


def test_accumulator_refuses_non_integer_ids():
    # float predictions (scores passed by mistake) must not be truncated into class ids
    acc = ClassificationAccumulator(3)
    with pytest.raises(ValueError, match="integers"):
        acc.update(torch.tensor([0, 1, 2]), torch.tensor([0.9, 1.2, 2.7]))
    with pytest.raises(ValueError, match="integers"):
        confusion_matrix(np.array([0.5]), np.array([0]), 2)
    acc.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    acc.update([], [])  # an empty batch (float64 when built from a list) is fine
    assert acc.compute().to_dict()["accuracy"] == pytest.approx(2 / 3)
