"""Check a stage directory against a fresh evaluation of its own checkpoint (``ur4rec evaluate``).

Everything a stage writes after training is a function of its best checkpoint and the data:
``metrics.json``, ``valid_ranks.csv``, ``test_ranks.csv`` and, for Stages 2-3, ``internals/``
(router weights, per-expert score contributions, attention maps); the run's
``baselines/pop/metrics.json`` is a function of the data. ``ur4rec evaluate`` writes them again
into a scratch folder laid out like the run directory, with the same code, and compares file by
file with :func:`compare_outputs`, so every number the run directory holds can be recomputed
from what it saved. The training history (``log.jsonl``, ``valid_ranks_by_epoch.csv``,
``internals/gate.json``) records epochs whose weights are gone, so it is not recomputed.

Tolerances: metrics relative 1e-6; CSV numbers (written rounded to 6 decimals) and attention
weights absolute 1e-5; ids, ranks and integer arrays exactly.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from ur4rec.rundir import RunDirError, read_json

SHOWN = 5  # differences listed per file; the rest are counted
CSV_TOLERANCE = 1e-5


def compare_outputs(saved: Path, fresh: Path) -> tuple[list[str], list[str], list[str]]:
    """Compare every file under ``fresh`` with the file of the same name under ``saved``.

    Returns three lists of names relative to ``fresh``, the ``metrics.json`` files first and
    then in name order: the files compared; the files ``saved`` lacks (a run stopped before its final
    evaluation, or made by an older version), which are not checked; and the differences, each
    naming its file and, for a CSV, its line and column.
    """
    saved, fresh = Path(saved), Path(fresh)
    names = sorted(path.relative_to(fresh).as_posix() for path in fresh.rglob("*") if path.is_file())
    names.sort(key=lambda name: not name.endswith("metrics.json"))
    compared, absent, differences = [], [], []
    for name in names:
        if not (saved / name).exists():
            absent.append(name)
            continue
        compared.append(name)
        if name.endswith("metrics.json"):
            differences += [f"{name}: {difference}" for difference in _compare_metrics(saved / name, fresh / name)]
        elif name.endswith(".csv"):
            differences += _compare_csv(saved / name, fresh / name, name)
        elif name.endswith(".npz"):
            differences += _compare_npz(saved / name, fresh / name, name)
        elif (saved / name).read_bytes() != (fresh / name).read_bytes():
            differences.append(f"{name}: contents differ")
    return compared, absent, differences


def _compare_metrics(saved_path: Path, fresh_path: Path) -> list[str]:
    """Nested {split: {protocol: {metric: value}}}; a figure missing from the saved file counts."""
    try:
        saved = read_json(saved_path, "metrics")
    except RunDirError as error:
        return [str(error)]
    fresh = json.loads(fresh_path.read_text())
    differences = []
    for split in fresh:
        for protocol in fresh[split]:
            for name, value in fresh[split][protocol].items():
                old = saved.get(split, {}).get(protocol, {}).get(name)
                if old is None:
                    differences.append(f"{split}/{protocol}/{name}: missing from {saved_path.name}, now {value}")
                elif not math.isclose(old, value, rel_tol=1e-6, abs_tol=1e-9):
                    differences.append(f"{split}/{protocol}/{name}: saved {old} vs now {value}")
    return differences


def _compare_csv(saved_path: Path, fresh_path: Path, name: str) -> list[str]:
    with open(saved_path, newline="") as handle:
        saved = list(csv.reader(handle))
    with open(fresh_path, newline="") as handle:
        fresh = list(csv.reader(handle))
    if not saved or saved[0] != fresh[0]:
        return [f"{name}: header {saved[0] if saved else '(empty file)'} vs now {fresh[0]}"]
    header, differences = fresh[0], []
    if len(saved) != len(fresh):
        differences.append(f"{name}: {len(saved) - 1} rows saved vs {len(fresh) - 1} now")
    for line, (old_row, new_row) in enumerate(zip(saved[1:], fresh[1:]), start=2):
        for column, old, new in zip(header, old_row, new_row):
            if old != new and not _close(old, new):
                differences.append(f"{name} line {line} ({header[0]} {new_row[0]}): {column} saved {old} vs now {new}")
    return _shorten(differences, name)


def _close(old: str, new: str) -> bool:
    """Two CSV cells that are both decimals (not both integers) within the tolerance."""
    try:
        a, b = float(old), float(new)
    except ValueError:
        return False
    integers = old.lstrip("-").isdigit() and new.lstrip("-").isdigit()
    return not integers and math.isclose(a, b, rel_tol=0.0, abs_tol=CSV_TOLERANCE)


def _compare_npz(saved_path: Path, fresh_path: Path, name: str) -> list[str]:
    with np.load(saved_path) as saved_file, np.load(fresh_path) as fresh_file:
        saved = {key: saved_file[key] for key in saved_file.files}
        fresh = {key: fresh_file[key] for key in fresh_file.files}
    differences = [f"{name}: array {key} missing from the saved file" for key in sorted(set(fresh) - set(saved))]
    differences += [f"{name}: array {key} is not recomputed" for key in sorted(set(saved) - set(fresh))]
    for key in sorted(set(saved) & set(fresh)):
        old, new = saved[key], fresh[key]
        if old.shape != new.shape:
            differences.append(f"{name}: {key} has shape {old.shape} saved vs {new.shape} now")
        elif np.issubdtype(new.dtype, np.floating):
            gap = np.abs(old.astype(np.float64) - new.astype(np.float64))
            outside = ~(gap <= CSV_TOLERANCE)  # a NaN on either side counts
            if outside.any():
                differences.append(f"{name}: {key} differs by up to {gap[outside].max():.3g} at {int(outside.sum())} "
                                   f"of {gap.size} entries")
        elif not np.array_equal(old, new):
            differences.append(f"{name}: {key} differs at {int((old != new).sum())} of {new.size} entries")
    return differences


def _shorten(differences: list[str], name: str) -> list[str]:
    if len(differences) <= SHOWN:
        return differences
    return differences[:SHOWN] + [f"{name}: {len(differences) - SHOWN} more differences"]
