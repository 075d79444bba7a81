"""Leave-one-out evaluation: full ranking and the sampled 1+99 protocol, in one pass.

* **Full ranking**: the held-out item is ranked against every item. With
  ``eval.exclude_seen`` (default) items already in the user's history (the train part for
  validation; train part + validation item for test) are removed first, as RecBole does.
  The padding id 0 never takes part.
* **Sampled (1+N)**: the held-out item against N = 99 items the user never interacted with
  (anywhere in their sequence), drawn without replacement once per user from
  ``eval.sample_seed`` and reused by every evaluation, for validation and test alike.
  This is the prototype's protocol. RecBole's ``uni100`` is not the same number: it draws
  100 negatives per positive, uniformly, again at each evaluation.

Any model with ``score_all(users, input_ids) -> (B, n_items + 1)`` can be evaluated.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ur4rec.config import EvalConfig
from ur4rec.data.dataset import SequenceDataset
from ur4rec.evaluation.metrics import metrics_from_ranks, rank_of_target


def left_pad(sequences: list[np.ndarray], length: int) -> np.ndarray:
    """The last ``length`` items of each sequence, left-padded with 0 -> (N, length)."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        tail = sequence[-length:]
        if len(tail):
            out[row, length - len(tail):] = tail
    return out


def sample_negatives(dataset: SequenceDataset, n: int, seed: int) -> np.ndarray:
    """(n_users, n) items each user never interacted with, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    all_items = np.arange(1, dataset.n_items + 1)
    negatives = np.empty((dataset.n_users, n), dtype=np.int64)
    for user, sequence in enumerate(dataset.sequences):
        available = np.setdiff1d(all_items, sequence, assume_unique=False)
        if len(available) == 0:  # eval.num_sampled_negatives is at least 1: no value of it helps
            raise ValueError(
                f"sampled evaluation needs an item each user never interacted with, but user "
                f"{dataset.user_raw_ids[user]} has interacted with every one of the {dataset.n_items} items "
                f"(a dataset of one user always has such a user), so this dataset cannot be evaluated"
            )
        if len(available) < n:
            raise ValueError(
                f"sampled evaluation needs {n} negatives but user {dataset.user_raw_ids[user]} "
                f"has only {len(available)} unseen items; lower eval.num_sampled_negatives"
            )
        negatives[user] = rng.choice(available, size=n, replace=False)
    return negatives


@dataclass
class EvalInputs:
    """Everything one split's evaluation needs, built once per run."""

    split: str
    users: torch.Tensor  # (U,)
    input_ids: torch.Tensor  # (U, max_len) left-padded history
    targets: torch.Tensor  # (U,)
    seen: torch.Tensor  # (U, H) full history, right-padded with 0 (0 = padding, never ranked)
    candidates: torch.Tensor  # (U, 1 + N) target first, then the fixed negatives


def build_eval_inputs(dataset: SequenceDataset, split: str, max_len: int, negatives: np.ndarray) -> EvalInputs:
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    histories = [dataset.history(u, split) for u in range(dataset.n_users)]
    targets = dataset.target(split)
    longest = max(len(h) for h in histories)
    seen = np.zeros((dataset.n_users, max(longest, 1)), dtype=np.int64)
    for user, history in enumerate(histories):
        seen[user, : len(history)] = history
    return EvalInputs(
        split=split,
        users=torch.arange(dataset.n_users),
        input_ids=torch.from_numpy(left_pad(histories, max_len)),
        targets=torch.from_numpy(targets),
        seen=torch.from_numpy(seen),
        candidates=torch.from_numpy(np.concatenate([targets[:, None], negatives], axis=1)),
    )


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]  # {"full": {...}, "sampled": {...}}
    rank_full: np.ndarray  # (U,) 1-based
    rank_sampled: np.ndarray  # (U,) 1-based


def excluded_items(inputs: EvalInputs, rows, n_columns: int, exclude_seen: bool,
                   targets: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n_columns) bool: what full ranking leaves out for ``inputs``' users at ``rows``: the
    padding id, their seen items when ``exclude_seen``; ``targets`` (B,), if given, always take
    part (on the targets' device)."""
    seen = inputs.seen[rows]
    device = targets.device if targets is not None else seen.device
    excluded = torch.zeros(seen.size(0), n_columns, dtype=torch.bool, device=device)
    excluded[:, 0] = True  # the padding id is not an item
    if exclude_seen:
        excluded.scatter_(1, seen.to(device), True)
    if targets is not None:
        excluded[torch.arange(len(targets), device=device), targets] = False
    return excluded


@contextmanager
def eval_mode(model):
    """``model`` in eval mode inside the block; afterwards every submodule gets its own mode back
    (``model.train()`` would also switch on dropout in the groups a stage keeps frozen in eval mode)."""
    modules = list(model.modules()) if hasattr(model, "modules") else []
    modes = [module.training for module in modules]
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield model
    finally:
        for module, mode in zip(modules, modes):
            module.training = mode


@torch.no_grad()
def evaluate(model, inputs: EvalInputs, config: EvalConfig, device: str = "cpu") -> EvalResult:
    """Rank every user's held-out item; metrics are averaged over users."""
    rank_full, rank_sampled = [], []
    with eval_mode(model):
        for start in range(0, len(inputs.users), config.batch_size):
            rows = slice(start, start + config.batch_size)
            users = inputs.users[rows].to(device)
            scores = model.score_all(users, inputs.input_ids[rows].to(device)).float()  # (B, n_items + 1)
            if not torch.isfinite(scores).all():
                raise FloatingPointError(f"non-finite scores while evaluating {inputs.split}")
            targets = inputs.targets[rows].to(device)
            excluded = excluded_items(inputs, rows, scores.size(1), config.exclude_seen, targets)
            target_scores = scores.gather(1, targets[:, None]).squeeze(1)  # (B,)
            rank_full.append(rank_of_target(scores, target_scores, excluded).cpu())
            candidate_scores = scores.gather(1, inputs.candidates[rows].to(device))  # (B, 1 + N)
            rank_sampled.append(rank_of_target(candidate_scores, candidate_scores[:, 0]).cpu())
    full = torch.cat(rank_full).numpy()
    sampled = torch.cat(rank_sampled).numpy()
    return EvalResult(
        metrics={"full": metrics_from_ranks(full, config.ks), "sampled": metrics_from_ranks(sampled, config.ks)},
        rank_full=full,
        rank_sampled=sampled,
    )


class Popularity:
    """Pop baseline in the same harness: score = the item's count in all train parts."""

    def __init__(self, dataset: SequenceDataset) -> None:
        counts = torch.from_numpy(dataset.train_item_counts()).float()
        self.scores = counts

    def score_all(self, users: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.scores.to(input_ids.device).expand(len(users), -1)
