"""Paired comparison of two sets of runs, user by user, from their saved ranks.

``ur4rec compare --base A1/stage1 A2/stage1 --variant B1/stage1 B2/stage1`` reads each stage
directory's ``valid_ranks.csv`` and ``test_ranks.csv`` (one directory per seed), averages every
user's metric over the seeds on each side and reports the mean difference with its standard
error over users (:func:`ur4rec.evaluation.metrics.paired_difference`). On ML-100K one
validation set is 943 users: differences under about two standard errors are within what
picking other users would change.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ur4rec.evaluation.metrics import paired_difference, per_user

SPLITS = ("valid", "test")


def read_ranks(stage_dir: Path, split: str) -> tuple[list[str], np.ndarray]:
    """(user_id,target_item keys, full-ranking ranks) from ``stage_dir/{split}_ranks.csv``."""
    path = Path(stage_dir) / f"{split}_ranks.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (runs made before 2026-11-24 saved test ranks only; "
                                "train again to get validation ranks)")
    keys, ranks = [], []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"user_id", "target_item", "rank_full"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                rank = int(row["rank_full"])
            except ValueError:
                raise ValueError(f"{path}, line {line}: rank_full {row['rank_full']!r} is not an integer") from None
            keys.append(f"{row['user_id']},{row['target_item']}")
            ranks.append(rank)
    return keys, np.asarray(ranks)


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
                    raise ValueError(f"{folder}/{split}_ranks.csv lists other users or targets than "
                                     f"{reference[0]}/{split}_ranks.csv: runs on different data cannot be paired")
                sides[side].append(ranks)
        for metric in metrics:
            difference, error = paired_difference(sides["base"], sides["variant"], metric)
            rows.append({
                "split": split, "metric": metric, "users": len(reference[1]),
                "base": float(np.mean([per_user(r, metric).mean() for r in sides["base"]])),
                "variant": float(np.mean([per_user(r, metric).mean() for r in sides["variant"]])),
                "difference": difference, "standard_error": error,
            })
    return rows
