"""Evaluation: ranking metrics and the leave-one-out harness."""

from ur4rec.evaluation.evaluate import EvalInputs, EvalResult, Popularity, build_eval_inputs, evaluate, sample_negatives
from ur4rec.evaluation.metrics import metrics_from_ranks, paired_difference, per_user, rank_of_target

__all__ = [
    "EvalInputs", "EvalResult", "Popularity", "build_eval_inputs", "evaluate", "metrics_from_ranks",
    "paired_difference", "per_user", "rank_of_target", "sample_negatives",
]
