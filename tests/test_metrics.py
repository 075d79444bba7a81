import math

import numpy as np
import pytest
import torch

from ur4rec.evaluation.metrics import metrics_from_ranks, paired_difference, per_user, rank_of_target


def test_metrics_hand_computed():
    # ranks 1, 3, 12 (beyond 10), 10 (exactly the cut-off)
    m = metrics_from_ranks(np.array([1, 3, 12, 10]), ks=[5, 10])
    assert m["hr@5"] == pytest.approx(2 / 4)
    assert m["hr@10"] == pytest.approx(3 / 4)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(11)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12 + 1 / 10) / 4)
    assert m["mean_rank"] == pytest.approx((1 + 3 + 12 + 10) / 4)
    assert metrics_from_ranks(np.array([1, 1, 10]), ks=[5])["mean_rank"] == pytest.approx(4.0)  # not the median


def test_rank_one_gives_perfect_scores():
    m = metrics_from_ranks(np.array([1, 1]), ks=[1, 10])
    assert m["hr@1"] == m["ndcg@1"] == m["ndcg@10"] == m["mrr"] == 1.0


def test_rank_beyond_k_scores_zero_but_counts_in_mrr():
    m = metrics_from_ranks(np.array([21]), ks=[20])
    assert m["hr@20"] == 0.0 and m["ndcg@20"] == 0.0
    assert m["mrr"] == pytest.approx(1 / 21)


def test_ties_count_against_the_target():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0]])
    target_scores = torch.tensor([0.5, 1.0])  # row 0: target at column 0 ties with column 2
    ranks = rank_of_target(scores, target_scores)
    assert ranks.tolist() == [3, 4]  # a constant model gets the worst rank, not the best


def test_excluded_candidates_do_not_count():
    scores = torch.tensor([[0.2, 0.9, 0.8, 0.1]])
    excluded = torch.tensor([[False, True, False, False]])
    assert rank_of_target(scores, torch.tensor([0.2]), excluded).tolist() == [2]


def test_metrics_reject_bad_ranks():
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([0, 2]))
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([]))


def test_paired_difference_averages_seeds_per_user_then_differences():
    # NDCG@10 per user: rank 1 -> 1, rank 3 -> 0.5, rank 20 -> 0
    a = [np.array([1, 20, 3]), np.array([1, 20, 1])]  # per-user means 1, 0, 0.75
    b = [np.array([3, 1, 3]), np.array([1, 1, 3])]  # per-user means 0.75, 1, 0.5
    difference, error = paired_difference(a, b)  # differences -0.25, 1, -0.25
    assert difference == pytest.approx(0.5 / 3)
    assert error == pytest.approx(math.sqrt((2 * (0.25 + 0.5 / 3) ** 2 + (1 - 0.5 / 3) ** 2) / 2) / math.sqrt(3))
    assert paired_difference(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same two or more users"):
        paired_difference(a, [np.array([1, 2])])


def test_per_user_values_average_to_the_metrics():
    ranks = np.array([1, 2, 7, 10, 11, 400])
    summary = metrics_from_ranks(ranks, ks=(10,))
    for metric in ("hr@10", "ndcg@10", "mrr"):
        assert per_user(ranks, metric).mean() == pytest.approx(summary[metric])
    with pytest.raises(ValueError, match="hr@k, ndcg@k or mrr"):
        per_user(ranks, "ndcg")


def test_a_candidate_just_below_the_target_is_not_a_tie():
    below = float(np.nextafter(np.float32(1.0), np.float32(0.0)))  # the next float32 under 1.0
    scores = torch.tensor([[1.0, below, below, 1.0]])
    assert rank_of_target(scores, torch.tensor([1.0])).tolist() == [2]  # only the exact tie counts
