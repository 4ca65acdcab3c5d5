"""Entity-level NER report: a hand-labelled BIO example, strict schemes, seqeval itself."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from losslab.eval.ner import ids_to_tags, ner_report

# Hand-labelled BIO example.
# true entities: PER[s0 0-1], LOC[s0 3], ORG[s1 0-1], PER[s1 3]   -> PER 2, LOC 1, ORG 1
# pred entities: PER[s0 0-1], ORG[s0 3], ORG[s1 0],   PER[s1 3]   -> PER 2, ORG 2
# exact matches: both PER; ORG[s1 0] has the wrong end; LOC is never predicted.
# PER: P 2/2, R 2/2, F 1; LOC: 0, 0, 0 (support 1); ORG: P 0/2, R 0/1, F 0 (support 1)
# micro: tp 2, pred 4, true 4 -> 0.5, 0.5, 0.5; macro: 1/3, 1/3, 1/3;
# weighted (by support 2, 1, 1): P = R = F = (2 * 1) / 4 = 0.5
Y_TRUE = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "I-ORG", "O", "B-PER"]]
Y_PRED = [["B-PER", "I-PER", "O", "B-ORG", "O"], ["B-ORG", "O", "O", "B-PER"]]


def test_bio_by_hand():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = ner_report(Y_TRUE, Y_PRED)
    m = rep.to_dict()
    assert list(rep.per_class) == ["LOC", "ORG", "PER"]
    assert (m["precision/PER"], m["recall/PER"], m["f1/PER"], m["support/PER"]) == (1.0, 1.0, 1.0, 2)
    assert (m["precision/LOC"], m["recall/LOC"], m["f1/LOC"], m["support/LOC"]) == (0.0, 0.0, 0.0, 1)
    assert (m["precision/ORG"], m["recall/ORG"], m["f1/ORG"], m["support/ORG"]) == (0.0, 0.0, 0.0, 1)
    for avg, value in (("micro", 0.5), ("macro", 1 / 3), ("weighted", 0.5)):
        assert (m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"]) == pytest.approx((value,) * 3)
    assert all(isinstance(v, (int, float)) for v in m.values())
    assert "micro avg" in rep.format()


def _seqeval_dict(y_true, y_pred, **kw):
    from seqeval.metrics import classification_report

    return classification_report(y_true, y_pred, output_dict=True, zero_division=0, **kw)


def _assert_same_as_seqeval(y_true, y_pred, **kw):
    ours = ner_report(y_true, y_pred, **kw)
    ref = _seqeval_dict(y_true, y_pred, **({"mode": "strict", "scheme": _scheme(kw)} if kw else {}))
    for name, s in ours.per_class.items():
        r = ref[name]
        assert (s.precision, s.recall, s.f1, s.support) == pytest.approx(
            (r["precision"], r["recall"], r["f1-score"], r["support"])
        )
    for avg in ("micro", "macro", "weighted"):
        got, r = getattr(ours, avg), ref[f"{avg} avg"]
        assert (got.precision, got.recall, got.f1, got.support) == pytest.approx(
            (r["precision"], r["recall"], r["f1-score"], r["support"])
        )


def _scheme(kw):
    import seqeval.scheme

    return getattr(seqeval.scheme, kw["scheme"])


def test_equals_seqeval_on_the_hand_example_and_random_tags():
    _assert_same_as_seqeval(Y_TRUE, Y_PRED)
    _assert_same_as_seqeval(Y_TRUE, Y_PRED, mode="strict", scheme="IOB2")
    rng = np.random.default_rng(0)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC"]
    for _ in range(3):
        lengths = rng.integers(1, 12, 15)
        y_true = [[tags[i] for i in rng.integers(0, len(tags), n)] for n in lengths]
        y_pred = [[t if rng.random() < 0.7 else tags[rng.integers(0, len(tags))] for t in s] for s in y_true]
        _assert_same_as_seqeval(y_true, y_pred)
        _assert_same_as_seqeval(y_true, y_pred, mode="strict", scheme="IOB2")


def test_strict_mode_rejects_ill_formed_chunks():
    # "I-PER" after "O" starts an entity in the lenient (conlleval) mode, not in strict IOB2
    y_true, y_pred = [["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]]
    assert ner_report(y_true, y_pred).to_dict()["f1_micro"] == 1.0
    assert ner_report(y_true, y_pred, mode="strict", scheme="IOB2").to_dict()["f1_micro"] == 0.0


def test_iobes_strict_by_hand():
    # true: PER[0], LOC[2-3]; pred: PER[0], and B-LOC I-LOC without an E-LOC: not an entity in
    # strict IOBES. PER: 1/1, 1/1; LOC: never predicted -> P 0, R 0/1. micro: P 1/1, R 1/2, F 2/3.
    y_true = [["S-PER", "O", "B-LOC", "E-LOC"]]
    y_pred = [["S-PER", "O", "B-LOC", "I-LOC"]]
    m = ner_report(y_true, y_pred, mode="strict", scheme="IOBES").to_dict()
    assert (m["precision_micro"], m["recall_micro"], m["f1_micro"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert m["f1/PER"] == 1.0 and m["recall/LOC"] == 0.0
    _assert_same_as_seqeval(y_true, y_pred, mode="strict", scheme="IOBES")
    # auto-detected scheme (seqeval's auto_detect) gives the same
    assert ner_report(y_true, y_pred, mode="strict").to_dict() == m


def test_edge_cases():
    with pytest.raises(ValueError, match="empty"):
        ner_report([], [])
    with pytest.raises(ValueError, match="sentence 0"):
        ner_report([["O", "B-PER"]], [["O"]])
    with pytest.raises(ValueError, match="number of sentences"):
        ner_report([["O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="unknown scheme"):
        ner_report([["O"]], [["O"]], mode="strict", scheme="BIO")
    with pytest.raises(ValueError, match="strict"):
        ner_report([["O"]], [["O"]], scheme="IOB2")
    rep = ner_report([["O", "O"]], [["O", "O"]])  # no entity on either side
    assert rep.per_class == {} and rep.to_dict()["f1_micro"] == 0.0


def test_ids_to_tags_drops_ignored_positions():
    id2label = ["O", "B-PER", "I-PER"]
    labels = torch.tensor([[-100, 1, 2, -100, 0], [-100, 0, 1, -100, -100]])
    logits = torch.zeros(2, 5, 3)
    logits[0, 1, 1] = logits[0, 2, 1] = logits[0, 4, 0] = 1.0  # B-PER B-PER O
    logits[1, 1, 0] = logits[1, 2, 2] = 1.0  # O I-PER
    y_true, y_pred = ids_to_tags(logits, labels, id2label)
    assert y_true == [["B-PER", "I-PER", "O"], ["O", "B-PER"]]
    assert y_pred == [["B-PER", "B-PER", "O"], ["O", "I-PER"]]
    assert ids_to_tags(logits.argmax(-1), labels, {0: "O", 1: "B-PER", 2: "I-PER"}) == (y_true, y_pred)


def test_lenient_mode_refuses_tags_it_cannot_read():
    # seqeval's lenient extraction warns on these and then mis-reads them: two BILOU entities
    # "B-PER L-PER B-PER L-PER" become one, "U-LOC U-LOC" one LOC, IO "PER" a type "ER".
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="'L-PER'.*scheme='BILOU'"):
            ner_report([["B-PER", "L-PER", "B-PER", "L-PER"]], [["O"] * 4])
        with pytest.raises(ValueError, match="y_pred\\[0\\] has tag 'U-LOC'"):
            ner_report([["B-LOC", "O"]], [["U-LOC", "O"]])
        with pytest.raises(ValueError, match="'PER'"):
            ner_report([["PER", "PER", "O"]], [["PER", "O", "O"]])
        # strict BILOU reads them: true PER[0-1], PER[2-3], LOC[4], LOC[5]; pred gets PER[0-1], LOC[4]
        y_true = [["B-PER", "L-PER", "B-PER", "L-PER", "U-LOC", "U-LOC"]]
        y_pred = [["B-PER", "L-PER", "O", "O", "U-LOC", "O"]]
        m = ner_report(y_true, y_pred, mode="strict", scheme="BILOU").to_dict()
        assert (m["precision_micro"], m["recall_micro"]) == (1.0, 0.5)
        assert (m["support/PER"], m["support/LOC"]) == (2, 2)
        # the tags it reads: O, B-/I-/E-/S- (IOB1, IOB2, IOBES) and bare prefixes
        ok_true = [["I-PER", "B-PER", "O", "S-LOC", "B", "I"]]
        assert ner_report(ok_true, [["I-PER", "I-PER", "O", "S-LOC", "O", "O"]]).per_class
