"""Check a stage directory against a fresh evaluation of its own checkpoint (``ur4rec evaluate``).

Everything a stage writes after training is a function of its best checkpoint and the data:
``metrics.json``, ``valid_ranks.csv``, ``test_ranks.csv`` and, for Stages 2-3, ``internals/``
(router weights, per-expert score contributions, attention maps); the run's
``baselines/pop/metrics.json`` is a function of the data. ``ur4rec evaluate`` writes them again
into a scratch folder laid out like the run directory, with the same code, and compares file by
file with :func:`compare_outputs`, so every number the run directory holds can be recomputed
from what it saved. The training history (``log.jsonl``, ``valid_ranks_by_epoch.csv``,
``internals/gate.json``) records epochs whose weights are gone, so only its entries for the kept
epoch are checked (:func:`check_history`), with ``checkpoint.json``'s best value, gate and
similarity weights.

Tolerances: metrics, gate and similarity weights relative 1e-6; CSV numbers (written rounded to
6 decimals) and attention weights absolute 1e-5; ids, ranks and integer arrays exactly.
"""

from __future__ import annotations

import csv
import json
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ur4rec.rundir import RunDirError, read_json

SHOWN = 5  # differences listed per file; the rest are counted
CSV_TOLERANCE = 1e-5
UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)  # what reading a damaged file raises


def _does_not_read(name: str, error: Exception) -> str:
    return f"{name}: the saved file does not read ({type(error).__name__}: {error})"


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
        try:
            if name.endswith("metrics.json"):
                differences += [f"{name}: {difference}" for difference in _compare_metrics(saved / name, fresh / name)]
            elif name.endswith(".csv"):
                differences += _compare_csv(saved / name, fresh / name, name)
            elif name.endswith(".npz"):
                differences += _compare_npz(saved / name, fresh / name, name)
            elif (saved / name).read_bytes() != (fresh / name).read_bytes():
                differences.append(f"{name}: contents differ")
        except UNREADABLE as error:  # cut short or damaged: not UTF-8 text, not a whole zip archive
            differences.append(_does_not_read(name, error))
    return compared, absent, differences


def _compare_metrics(saved_path: Path, fresh_path: Path) -> list[str]:
    """Nested {split: {protocol: {metric: value}}}; a figure missing from the saved file counts."""
    try:
        saved = read_json(saved_path, "metrics")
    except RunDirError as error:
        return [str(error)]
    fresh = json.loads(fresh_path.read_text())
    return _compare_nested(saved, fresh, saved_path.name)


def _compare_nested(saved, fresh, file: str, path: str = "") -> list[str]:
    """Every number of the nested dict ``fresh`` against ``saved``; figures only ``saved`` has count
    too (nothing recomputes them), and so does a saved figure that is not a number."""
    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            return [f"{path.rstrip('/') or '(top level)'}: saved {saved!r} where {file} should hold a group of figures"]
        differences = []
        for key in fresh:
            if key in saved:
                differences += _compare_nested(saved[key], fresh[key], file, f"{path}{key}/")
            else:
                differences.append(f"{path}{key}: missing from {file}")
        differences += [f"{path}{key}: in {file} but not recomputed" for key in saved if key not in fresh]
        return differences
    path = path.rstrip("/")
    if isinstance(saved, bool) or not isinstance(saved, (int, float)):
        return [f"{path}: saved {saved!r} is not a number, now {fresh}"]
    if not math.isclose(saved, fresh, rel_tol=1e-6, abs_tol=1e-9):
        return [f"{path}: saved {saved} vs now {fresh}"]
    return []


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
        if len(old_row) != len(header):
            differences.append(f"{name} line {line}: {len(old_row)} cells saved, the header has {len(header)}")
            continue
        for column, old, new in zip(header, old_row, new_row):
            if old != new and not _close(old, new):
                differences.append(f"{name} line {line} ({header[0]} {new_row[0]}): {column} saved {old} vs now {new}")
    return _shorten(differences, name)


def _close(old: str, new: str) -> bool:
    """Two different CSV cells that still agree: decimals within the tolerance. Where the fresh
    cell is an integer (ids, ranks, counts) or not a number, only the same text agrees."""
    if new.lstrip("-").isdigit():
        return False
    try:
        a, b = float(old), float(new)
    except ValueError:
        return False
    return math.isclose(a, b, rel_tol=0.0, abs_tol=CSV_TOLERANCE)


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


def check_history(saved: Path, fresh: Path, state: dict | None = None) -> tuple[list[str], list[str]]:
    """The kept epoch's entries in the training history of the stage directory ``saved``, against
    the fresh evaluation in ``fresh`` (its ``metrics.json`` and ``valid_ranks.csv``) and ``state``
    (``{"gate": g, "similarity_weights": {source: w}}`` read from the saved weights; None for
    Stage 1): ``checkpoint.json``'s best value and similarity weights, the epoch's line in
    ``log.jsonl``, its column of ``valid_ranks_by_epoch.csv`` and its entry in ``internals/gate.json``.

    Returns (what was checked, differences), both naming the file. Stages 2-3 log no line for
    epoch 0 (the loaded weights, before any training), so a stage that kept it has none to check.
    """
    saved, fresh = Path(saved), Path(fresh)
    stage, state = saved.name, state or {}
    info = read_json(saved / "checkpoint.json", "the checkpoint description")
    epoch, metrics = info.get("epoch"), json.loads((fresh / "metrics.json").read_text())
    checked, differences = [f"{stage}/checkpoint.json (best value)"], []
    best = info.get("best") or {}
    try:
        split, protocol, metric = str(best.get("metric")).split("/")
        now = metrics[split][protocol][metric]
    except (ValueError, KeyError):
        differences.append(f"{stage}/checkpoint.json: best metric {best.get('metric')!r} is not one that is recomputed")
    else:
        differences += [f"{stage}/checkpoint.json: best {d}" for d in _compare_nested(best.get("value"), now, "", "value")]
    if "similarity_weights" in state:
        checked[-1] = f"{stage}/checkpoint.json (best value, similarity weights)"
        differences += [f"{stage}/checkpoint.json: {d}" for d in _compare_nested(
            info.get("similarity_weights"), state["similarity_weights"], "checkpoint.json", "similarity_weights/")]

    log = saved / "log.jsonl"
    records = []
    try:
        lines = log.read_text().splitlines() if log.exists() else []
    except UnicodeDecodeError as error:
        lines = None
        differences.append(_does_not_read(f"{stage}/log.jsonl", error))
    for number, line in enumerate(lines or [], start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            differences.append(f"{stage}/log.jsonl line {number}: not valid JSON")
    record = next((r for r in records if isinstance(r, dict) and r.get("epoch") == epoch), None)
    if lines is None:
        pass  # said above
    elif record is not None:
        checked.append(f"{stage}/log.jsonl (epoch {epoch})")
        logged = {"valid": record.get("valid")}
        expected = {"valid": metrics["valid"]}
        for key in ("gate", "similarity_weights"):
            if key in state:
                logged[key], expected[key] = record.get(key), state[key]
        differences += [f"{stage}/log.jsonl epoch {epoch}: {d}" for d in _compare_nested(logged, expected, "its line")]
    elif not log.exists():  # every stage writes it from its first epoch on
        differences.append(f"{stage}/log.jsonl is missing: the stage's training history is gone")
    elif not (epoch == 0 and info.get("stage", 1) > 1):
        differences.append(f"{stage}/log.jsonl: no line for the kept epoch {epoch}")

    by_epoch = saved / "valid_ranks_by_epoch.csv"
    if by_epoch.exists():
        try:
            with open(by_epoch, newline="") as handle:
                rows = list(csv.reader(handle))
        except UnicodeDecodeError as error:
            rows = None
            differences.append(_does_not_read(f"{stage}/valid_ranks_by_epoch.csv", error))
        with open(fresh / "valid_ranks.csv", newline="") as handle:
            ranks = list(csv.reader(handle))
        column = f"epoch_{epoch}"
        if rows is None:
            pass  # said above
        elif not rows or column not in rows[0]:
            differences.append(f"{stage}/valid_ranks_by_epoch.csv: no column {column}, the kept epoch")
        else:
            checked.append(f"{stage}/valid_ranks_by_epoch.csv ({column})")
            at = rows[0].index(column)
            kept = [[row[0], row[1], row[at]] if len(row) > at else row for row in rows[1:]]
            now = [row[:3] for row in ranks[1:]]  # user_id, target_item, rank_full
            if len(kept) != len(now):
                differences.append(f"{stage}/valid_ranks_by_epoch.csv: {len(kept)} rows saved vs {len(now)} now")
            wrong = [line for line, (old, new) in enumerate(zip(kept, now), start=2) if old != new]
            if wrong:
                differences.append(f"{stage}/valid_ranks_by_epoch.csv: {column} differs from the validation ranks "
                                   f"now at {len(wrong)} rows (first: line {wrong[0]})")

    gates = saved / "internals" / "gate.json"
    if "gate" in state and gates.exists():
        history = read_json(gates, "the gate history").get("gate", [])
        entry = next((e for e in history if isinstance(e, dict) and e.get("epoch") == epoch), None)
        if entry is None:
            differences.append(f"{stage}/internals/gate.json: no entry for the kept epoch {epoch}")
        else:
            checked.append(f"{stage}/internals/gate.json (epoch {epoch})")
            differences += [f"{stage}/internals/gate.json: epoch {epoch} {d}"
                            for d in _compare_nested(entry.get("gate"), state["gate"], "", "gate")]
    return checked, differences
