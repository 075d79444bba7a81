"""Ranking metrics from 1-based ranks of the held-out item, one rank per user.

Leave-one-out has exactly one relevant item per user, so every metric is a function of that
item's rank r (averaged over users, never over batches):

* ``hr@k``    = 1[r <= k]
* ``ndcg@k``  = 1[r <= k] / log2(r + 1)        (ideal DCG is 1)
* ``mrr``     = 1 / r                           (not truncated)
* ``mean_rank`` = r

Ties are counted against the model: an item scored equal to the target ranks above it
(:func:`rank_of_target`), so a model that scores everything alike gets the worst rank,
not the best.
"""

from __future__ import annotations

import numpy as np
import torch


def rank_of_target(scores: torch.Tensor, target_scores: torch.Tensor, excluded: torch.Tensor | None = None):
    """1-based rank of each row's target among the row's scores.

    scores: (B, N) scores of every candidate, the target included;
    target_scores: (B,) the target's score;
    excluded: optional (B, N) bool, candidates that take no part (seen items; the target
    itself is never excluded by the caller).
    rank = 1 + #{candidates scoring >= target} - 1 (the target itself).
    """
    at_least = scores >= target_scores[:, None]  # (B, N)
    if excluded is not None:
        at_least &= ~excluded
    return at_least.sum(dim=1)  # the target counts itself once: 1 + others >= target


def metrics_from_ranks(ranks: np.ndarray, ks: list[int] | tuple[int, ...] = (5, 10, 20)) -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no ranks to average")
    if (ranks < 1).any():
        raise ValueError("ranks are 1-based; found a rank below 1")
    result: dict[str, float] = {}
    for k in ks:
        for name in ("hr", "ndcg"):
            result[f"{name}@{k}"] = float(per_user(ranks, f"{name}@{k}").mean())
    result["mrr"] = float(per_user(ranks, "mrr").mean())
    result["mean_rank"] = float(ranks.mean())
    return result


def per_user(ranks: np.ndarray, metric: str) -> np.ndarray:
    """(U,) value of ``metric`` (``hr@k``, ``ndcg@k`` or ``mrr``) for each user's 1-based rank."""
    ranks = np.asarray(ranks, dtype=np.float64)
    name, _, k = metric.partition("@")
    if metric == "mrr":
        return 1.0 / ranks
    if name in ("hr", "ndcg") and k.isdigit():
        hit = ranks <= int(k)
        return hit.astype(np.float64) if name == "hr" else np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
    raise ValueError(f"metric {metric!r}: expected hr@k, ndcg@k or mrr")


def paired_difference(ranks_a: list[np.ndarray], ranks_b: list[np.ndarray], metric: str = "ndcg@10") -> tuple[float, float]:
    """Mean ``metric`` of B minus A, and its standard error over users.

    ``ranks_a`` and ``ranks_b`` are one (U,) rank array per seed, the same users in the same
    order. Each user's value is averaged over the seeds first, so the error is that of the
    user sample (943 users on ML-100K), the noise a comparison on one validation set carries;
    seed noise is in it too, since each user's mean over seeds still varies with the seeds.
    """
    return paired_difference_of_values([per_user(r, metric) for r in ranks_a],
                                       [per_user(r, metric) for r in ranks_b])


def paired_difference_of_values(values_a: list[np.ndarray], values_b: list[np.ndarray]) -> tuple[float, float]:
    """:func:`paired_difference` from per-user metric values (one (U,) array per seed) instead of ranks."""
    a, b = np.mean(values_a, axis=0), np.mean(values_b, axis=0)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"need the same two or more users on both sides, got {a.shape} and {b.shape}")
    difference = b - a
    return float(difference.mean()), float(difference.std(ddof=1) / np.sqrt(difference.size))
