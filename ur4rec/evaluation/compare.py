"""Paired comparison of two sets of runs, user by user, from their saved ranks.

``ur4rec compare --base A1/stage1 A2/stage1 --variant B1/stage1 B2/stage1`` reads each stage
directory's ``valid_ranks.csv`` and ``test_ranks.csv`` (one directory per seed), averages every
user's metric over the seeds on each side and reports the mean difference with its standard
error over users (:func:`ur4rec.evaluation.metrics.paired_difference`). On ML-100K one
validation set is 943 users: differences under about two standard errors are within what
picking other users would change.

A run's validation figure belongs to the epoch that scored best on those same users, so it
flatters the run (by about 0.006 NDCG@10 for Stage 1 on ML-100K), and the more so the noisier
its validation curve and the longer it ran. Where every directory has
``valid_ranks_by_epoch.csv`` the comparison adds the split ``valid-oh`` ("other half"): each
user's value at the epoch chosen by the other half of the users on the run's own
``eval.select_metric`` (:func:`other_half_values`, :func:`select_metric`), which no run can
flatter. Test plays no part in either.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ur4rec.evaluation.metrics import paired_difference, paired_difference_of_values, per_user
from ur4rec.rundir import read_json

SPLITS = ("valid", "test")
EPOCH_RANKS = "valid_ranks_by_epoch.csv"
OTHER_HALF = "valid-oh"


def read_ranks(stage_dir: Path, split: str) -> tuple[list[str], np.ndarray]:
    """(user_id,target_item keys, full-ranking ranks) from ``stage_dir/{split}_ranks.csv``."""
    stage_dir = Path(stage_dir)
    path = stage_dir / f"{split}_ranks.csv"
    if (stage_dir / "checkpoint.json").exists() and not (stage_dir / "metrics.json").exists():
        # metrics.json is written last: without it the ranks files are missing, or may be cut short
        raise ValueError(f"{stage_dir} never finished (no metrics.json: it stopped before its final evaluation), "
                         "so its ranks are missing or incomplete; `ur4rec train` it again")
    if not path.exists():
        if split == "valid" and (stage_dir / "test_ranks.csv").exists():
            raise FileNotFoundError(f"{path} does not exist (runs made before 2026-11-24 saved test ranks only; "
                                    "train again to get validation ranks)")
        raise FileNotFoundError(f"{path} does not exist: {stage_dir} is not the directory of a finished stage "
                                "(RUN/stageN with its ranks files)")
    keys, ranks = [], []
    header, *rows = csv_rows(path) or [[]]
    missing = {"user_id", "target_item", "rank_full"} - set(header)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    for line, cells in enumerate(rows, start=2):
        if not cells:  # a blank line, as csv.DictReader skips it
            continue
        if len(cells) != len(header):  # a field short or over: the columns no longer line up
            raise ValueError(f"{path}, line {line}: {len(cells)} fields, the header has {len(header)}")
        row = dict(zip(header, cells))
        try:
            rank = int(row["rank_full"])
        except ValueError:
            raise ValueError(f"{path}, line {line}: rank_full {row['rank_full']!r} is not an integer") from None
        if rank < 1:  # ranks are 1-based: 0 would score an infinite NDCG and MRR
            raise ValueError(f"{path}, line {line}: rank_full {rank} is below 1 (ranks are 1-based)")
        keys.append(f"{row['user_id']},{row['target_item']}")
        ranks.append(rank)
    return keys, np.asarray(ranks)


def csv_rows(path: Path) -> list[list[str]]:
    """Every row of the CSV file ``path``; one that does not read as text is an error naming it."""
    try:
        with open(path, newline="") as handle:
            return list(csv.reader(handle))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: the file does not read as text ({error})") from None


def read_epoch_ranks(stage_dir: Path) -> tuple[list[str], list[int], np.ndarray]:
    """(user_id,target_item keys, validated epochs, (epochs, users) ranks) from ``valid_ranks_by_epoch.csv``."""
    path = Path(stage_dir) / EPOCH_RANKS
    header, *lines = csv_rows(path) or [[]]
    epochs = [column.removeprefix("epoch_") for column in header[2:]]
    if header[:2] != ["user_id", "target_item"] or not epochs or not all(e.isdigit() for e in epochs):
        raise ValueError(f"{path}, line 1: expected the header user_id,target_item,epoch_E,..., got {header}")
    keys, rows = [], []
    for line, row in enumerate(lines, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
        try:
            rows.append([int(rank) for rank in row[2:]])
        except ValueError:
            raise ValueError(f"{path}, line {line}: a rank is not an integer") from None
        if min(rows[-1]) < 1:
            raise ValueError(f"{path}, line {line}: a rank is below 1 (ranks are 1-based)")
        keys.append(f"{row[0]},{row[1]}")
    return keys, [int(e) for e in epochs], np.asarray(rows, dtype=np.int64).reshape(len(rows), len(epochs)).T


def select_metric(stage_dir: Path) -> str:
    """The metric the run chose its epoch by (``eval.select_metric``, as checkpoint.json's best metric names it),
    so that the other half of the users choose by it too; NDCG@10 where there is no checkpoint.json."""
    path = Path(stage_dir) / "checkpoint.json"
    if not path.exists():
        return "ndcg@10"
    best = read_json(path, "a checkpoint description").get("best")
    metric = str(best.get("metric", "")) if isinstance(best, dict) else ""
    if not metric.startswith("valid/full/"):
        raise ValueError(f"{path}: best metric {metric or None!r} does not say which validation metric chose the epoch")
    return metric.removeprefix("valid/full/")


def other_half_values(ranks_by_epoch: np.ndarray, metric: str = "ndcg@10", select_metric: str = "ndcg@10",
                      halvings: int = 50, seed: int = 0) -> np.ndarray:
    """(U,) each user's ``metric`` at the epoch the *other* users chose.

    ``ranks_by_epoch`` is (epochs, users). The users are split into two random halves (of equal
    size, or one user apart); the epoch with the best mean ``select_metric`` on one half (the
    earliest among equals, as early stopping keeps it) is scored on the other half, and the other
    way round. Averaged over ``halvings`` splits drawn from ``seed``, so two runs on the same users
    share the splits.
    A user's value never depends on its own ranks through the choice of epoch.
    """
    select = np.stack([per_user(ranks, select_metric) for ranks in ranks_by_epoch])  # (E, U)
    values = select if metric == select_metric else np.stack([per_user(r, metric) for r in ranks_by_epoch])
    users = select.shape[1]
    if users < 2:
        raise ValueError(f"other_half_values needs two or more users, got {users}")
    rng = np.random.default_rng(seed)
    total = np.zeros(users)
    for _ in range(halvings):
        half = rng.permutation(users) < users // 2
        for chooser in (half, ~half):
            epoch = int(np.argmax(select[:, chooser].mean(axis=1)))
            total[~chooser] += values[epoch, ~chooser]
    return total / halvings


def unpaired(path: str, keys: list[str], reference_path: str, reference_keys: list[str]) -> str:
    """The error for two ranks files whose users and targets differ, naming the first line where they do."""
    line = next((line for line, (key, other) in enumerate(zip(keys, reference_keys), start=2) if key != other), None)
    where = (f"line {line}: user_id,target_item {keys[line - 2]} against {reference_keys[line - 2]}" if line else
             f"{len(keys)} rows against {len(reference_keys)}, the first {min(len(keys), len(reference_keys))} alike")
    return f"{path} lists other users or targets than {reference_path} ({where}): runs on different data cannot be paired"


def compare(base: list[Path], variant: list[Path], metrics: tuple[str, ...] = ("ndcg@10", "hr@10"),
            splits: tuple[str, ...] = SPLITS) -> list[dict]:
    """One row per (split, metric): both sides' means, the difference and its paired error."""
    if not base or not variant:
        raise ValueError("compare needs at least one stage directory on each side")
    rows = []
    for split in splits:
        sides = {}
        reference = None
        for side, folders in (("base", base), ("variant", variant)):
            sides[side] = []
            for folder in folders:
                keys, ranks = read_ranks(folder, split)
                if reference is None:
                    reference = (folder, keys)
                elif keys != reference[1]:
                    raise ValueError(unpaired(f"{folder}/{split}_ranks.csv", keys,
                                              f"{reference[0]}/{split}_ranks.csv", reference[1]))
                sides[side].append(ranks)
        for metric in metrics:
            difference, error = paired_difference(sides["base"], sides["variant"], metric)
            rows.append({
                "split": split, "metric": metric, "users": len(reference[1]),
                "base": float(np.mean([per_user(r, metric).mean() for r in sides["base"]])),
                "variant": float(np.mean([per_user(r, metric).mean() for r in sides["variant"]])),
                "difference": difference, "standard_error": error,
            })
    if "valid" in splits and all((Path(folder) / EPOCH_RANKS).exists() for folder in [*base, *variant]):
        rows += _other_half_rows(base, variant, metrics, reference_keys=read_ranks(base[0], "valid")[0])
    return rows


def _other_half_rows(base: list[Path], variant: list[Path], metrics: tuple[str, ...],
                     reference_keys: list[str]) -> list[dict]:
    ranks = {}
    for side, folders in (("base", base), ("variant", variant)):
        ranks[side] = []
        for folder in folders:
            keys, _, by_epoch = read_epoch_ranks(folder)
            if keys != reference_keys:
                raise ValueError(unpaired(f"{folder}/{EPOCH_RANKS}", keys, f"{base[0]}/valid_ranks.csv", reference_keys))
            ranks[side].append((by_epoch, select_metric(folder)))
    rows = []
    for metric in metrics:
        values = {side: [other_half_values(r, metric, select) for r, select in runs] for side, runs in ranks.items()}
        difference, error = paired_difference_of_values(values["base"], values["variant"])
        rows.append({
            "split": OTHER_HALF, "metric": metric, "users": len(reference_keys),
            "base": float(np.mean([v.mean() for v in values["base"]])),
            "variant": float(np.mean([v.mean() for v in values["variant"]])),
            "difference": difference, "standard_error": error,
        })
    return rows
