"""Reward-model and retrieval metrics by hand, ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from losslab.eval.ranking import pairwise_accuracy, retrieval_metrics, reward_margin, reward_metrics, target_ranks


def test_reward_metrics_by_hand():
    chosen = [2.0, 0.5, 1.0, -1.0]
    rejected = [1.0, 0.5, 3.0, -2.0]
    # wins: pair 0 and 3; tie: pair 1 (counts half); loss: pair 2 -> (1 + 0.5 + 0 + 1) / 4
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(2.5 / 4)
    # margins 1, 0, -2, 1 -> mean 0
    assert reward_margin(chosen, rejected) == pytest.approx(0.0)
    m = reward_metrics(torch.tensor(chosen), np.array(rejected))
    assert m == pytest.approx(
        {"pairwise_accuracy": 0.625, "reward_margin": 0.0, "reward_chosen": 2.5 / 4, "reward_rejected": 2.5 / 4}
    )
    assert pairwise_accuracy([1.0, 1.0], [1.0, 1.0]) == 0.5  # a constant model sits at chance


def test_reward_edge_cases():
    with pytest.raises(ValueError, match="empty"):
        pairwise_accuracy([], [])
    with pytest.raises(ValueError, match="differ in length"):
        reward_margin([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        pairwise_accuracy([float("nan")], [1.0])


# scores (3 queries x 4 candidates), correct candidate t = [0, 2, 3]
#   q0: [0.9, 0.1, 0.3, 0.2]  t=0 -> rank 1
#   q1: [0.8, 0.1, 0.5, 0.6]  t=2 -> 0.8 and 0.6 are higher -> rank 3
#   q2: [0.4, 0.4, 0.1, 0.4]  t=3 -> tied with candidates 0 and 1 -> pessimistic rank 3
# recall@1 = 1/3, recall@2 = 1/3, recall@3 = 3/3; MRR = (1 + 1/3 + 1/3) / 3 = 5/9
SCORES = [[0.9, 0.1, 0.3, 0.2], [0.8, 0.1, 0.5, 0.6], [0.4, 0.4, 0.1, 0.4]]
TARGETS = [0, 2, 3]


def test_retrieval_by_hand():
    assert target_ranks(SCORES, TARGETS).tolist() == [1, 3, 3]
    m = retrieval_metrics(torch.tensor(SCORES), torch.tensor(TARGETS), ks=(1, 2, 3, 10))
    assert m == pytest.approx({"recall@1": 1 / 3, "recall@2": 1 / 3, "recall@3": 1.0, "recall@10": 1.0, "mrr": 5 / 9})


def test_default_targets_are_the_diagonal_and_constant_scores_rank_last():
    sim = np.array([[0.9, 0.1], [0.7, 0.8], [0.2, 0.3]]).T  # (2 queries, 3 candidates)
    assert target_ranks(sim).tolist() == [1, 1]
    assert target_ranks(np.ones((3, 3))).tolist() == [3, 3, 3]  # all tied: worst rank
    assert retrieval_metrics(np.ones((3, 3)), ks=(1,))["recall@1"] == 0.0


def test_retrieval_edge_cases():
    with pytest.raises(ValueError, match="nothing to rank"):
        retrieval_metrics(np.zeros((0, 4)), [])
    with pytest.raises(ValueError, match="Q <= C"):
        target_ranks(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="integer indices"):
        target_ranks(SCORES, [0, 2, 4])
    with pytest.raises(ValueError, match="3 targets for 2 queries"):
        target_ranks(SCORES[:2], TARGETS)
    with pytest.raises(ValueError, match="k must be"):
        retrieval_metrics(SCORES, TARGETS, ks=(0,))
