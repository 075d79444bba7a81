"""The run directory: the contract that notebooks, the app, benchmarks and checks read.

::

    RUN/config.yaml                  resolved config of the newest stage trained
    RUN/data.json                    dataset name, fingerprint, counts, split rule
    RUN/stageN/model.safetensors     weights of the best validation epoch
    RUN/stageN/checkpoint.json       config, stage, epoch, best metric, fingerprint, versions
    RUN/stageN/log.jsonl             one line per epoch: epoch, seconds, train_loss, lr, valid
    RUN/stageN/metrics.json          {"valid"|"test": {"full"|"sampled": {"hr@10": ...}}}
    RUN/stageN/test_ranks.csv        user_id,target_item,rank_full,rank_sampled (1-based)
    RUN/stageN/valid_ranks.csv       the same for the validation item
    RUN/stageN/valid_ranks_by_epoch.csv  user_id,target_item,epoch_E,...: the validation rank after each validated epoch
    RUN/stageN.prev/                 the stage as it was before the last run that retrained it (see start_stage)
    RUN/baselines/pop/metrics.json   the Pop baseline in the same harness
    RUN/baselines/pop/config.yaml    the config it was computed with
    RUN/stageN/internals/            Stages 2-3: router weights, score contributions, gate per epoch, attention maps
    RUN/texts/                       generated texts (JSONL cache, user_texts.json, item_texts.json), audit.csv
    RUN/features/manifest.json       the feature sets used (quality.json, projection.csv: ``ur4rec features quality``)
    RUN/ablations.csv                one row per ablation variant (``ur4rec ablate``), RUN/ablations/<variant>/ its run
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np

from ur4rec.config import Config
from ur4rec.data.dataset import SequenceDataset


class RunDirError(RuntimeError):
    """A run directory that belongs to another dataset or lacks what a command needs."""


def stage_dir(run_dir: Path, stage: int) -> Path:
    return Path(run_dir) / f"stage{stage}"


def start_stage(run_dir: Path, stage: int, config: Config) -> Path:
    """The empty ``RUN/stageN/`` a training run writes into; ``RUN/config.yaml`` becomes ``config``.

    A finished stage (one with ``metrics.json``) is not overwritten: it moves to
    ``stageN.prev/`` (replacing an older one), and so do the later stages, which were built from
    it and would no longer match. So a rerun into the same run directory, even one that fails or
    is stopped, loses no finished stage. An unfinished stage (a run that stopped before its final
    evaluation) is what the new run starts over, so it is removed instead: ``.prev`` always holds
    the last finished one.

    ``config.yaml`` is written here, once a stage is about to train, so a command refused
    before that (a missing Stage 2, a checkpoint that does not fit the config) leaves it as it was.
    """
    kept, dropped = [], []
    for later in range(stage, 4):
        folder = stage_dir(run_dir, later)
        if not folder.is_dir() or not any(folder.iterdir()):
            continue
        if (folder / "metrics.json").exists():
            keep = folder.with_name(f"{folder.name}.prev")
            shutil.rmtree(keep, ignore_errors=True)
            folder.rename(keep)
            kept.append(folder.name)
        else:
            shutil.rmtree(folder)
            dropped.append(folder.name)
    if kept:
        print(f"{run_dir}: the earlier {', '.join(kept)} kept as {', '.join(f'{name}.prev' for name in kept)}",
              file=sys.stderr)
    if dropped:
        print(f"{run_dir}: the unfinished {', '.join(dropped)} (stopped before its final evaluation) started over",
              file=sys.stderr)
    out = stage_dir(run_dir, stage)
    out.mkdir(parents=True, exist_ok=True)
    config.save(Path(run_dir) / "config.yaml")
    return out


def prepare_run(run_dir: Path, config: Config, dataset: SequenceDataset) -> Path:
    """Create ``run_dir`` and write data.json (and config.yaml when the run has none yet: later it
    is the config of the newest stage trained, :func:`start_stage`); refuse another dataset's run."""
    run_dir = Path(run_dir)
    data_file = run_dir / "data.json"
    if data_file.exists():
        previous = read_json(data_file, "the run's dataset summary").get("fingerprint")
        if previous != dataset.fingerprint:
            raise RunDirError(
                f"{run_dir} holds a run on data {previous}, not {dataset.fingerprint}; "
                "use a new --run-dir"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.yaml").exists():
        config.save(run_dir / "config.yaml")
    write_json(data_file, dataset.summary())
    return run_dir


def read_json(path: Path, what: str = "a JSON object", error: type[Exception] = RunDirError) -> dict:
    """``path`` parsed as a JSON object; anything else raises ``error`` naming the file."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path}: not valid JSON ({problem})") from problem
    if not isinstance(payload, dict):
        raise error(f"{path}: expected {what}, got a JSON {type(payload).__name__}")
    return payload


def write_json(path: Path, payload: dict) -> None:
    """Write ``path`` whole or not at all: a reader (another command on the same run directory)
    sees the old file or the new one, never a torn one, and a failed write keeps the old file."""
    write_text_whole(path, json.dumps(payload, indent=2))


def write_text_whole(path: Path, text: str, encoding: str | None = None) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (see :func:`write_json`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one temporary name per writer (process and thread), so concurrent writers never share one
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        temporary.write_text(text, encoding=encoding)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_ranks(path: Path, dataset: SequenceDataset, split: str, rank_full: np.ndarray,
                rank_sampled: np.ndarray) -> None:
    """user_id,target_item,rank_full,rank_sampled of ``split`` with raw dataset ids and 1-based ranks."""
    targets = dataset.target(split)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "target_item", "rank_full", "rank_sampled"])
        for user in range(dataset.n_users):
            writer.writerow([dataset.user_raw_ids[user], dataset.item_raw_ids[targets[user]],
                             int(rank_full[user]), int(rank_sampled[user])])


class EpochRanks:
    """``valid_ranks_by_epoch.csv``: each validated epoch's full-ranking rank of every user's
    validation item (raw ids, 1-based), one column ``epoch_E`` per epoch, rewritten whole after
    each validation so a stopped run keeps what it validated.

    The best epoch's column is ``valid_ranks.csv``'s ``rank_full``. With all the columns, a
    comparison can choose the epoch on some users and score it on the others
    (:func:`ur4rec.evaluation.compare.other_half_values`): the best epoch's own validation
    figure is the maximum of many noisy ones and flatters the run.
    """

    def __init__(self, path: Path, dataset: SequenceDataset, split: str = "valid") -> None:
        self.path = Path(path)
        targets = dataset.target(split)
        self.keys = [[str(dataset.user_raw_ids[user]), str(dataset.item_raw_ids[targets[user]])]
                     for user in range(dataset.n_users)]
        self.epochs: list[int] = []
        self.ranks: list[np.ndarray] = []

    def add(self, epoch: int, rank_full: np.ndarray) -> None:
        self.epochs.append(epoch)
        self.ranks.append(np.asarray(rank_full, dtype=np.int64))
        table = np.stack(self.ranks, axis=1)  # (users, epochs)
        text = io.StringIO()  # quoted as csv reads it: a raw id may hold a comma
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["user_id", "target_item", *(f"epoch_{e}" for e in self.epochs)])
        writer.writerows(key + ranks for key, ranks in zip(self.keys, table.tolist()))
        write_text_whole(self.path, text.getvalue())


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
