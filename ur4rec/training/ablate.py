"""Ablations of the multimodal stages: each expert off, each history-similarity source off, memory
off, gate off, Stage 2 skipped.

Every variant starts from the same Stage-1 checkpoint (``RUN/stage1``, trained once), trains
Stages 2 and 3 into ``RUN/ablations/<variant>/`` and is evaluated in the same harness;
``RUN/ablations.csv`` gets one row per variant with validation and test metrics and the hash of
the Stage-1 weights it started from. A later run of some variants (``only``) replaces their
rows and keeps the others that started from the same Stage 1; rows from another Stage 1 are
dropped with a warning. A variant's row is removed when it starts training again and written
back when it finishes, so a stopped run leaves no row that its stages no longer back.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import warnings
from pathlib import Path

from ur4rec.config import Config
from ur4rec.data.dataset import SequenceDataset
from ur4rec.evaluation.evaluate import sample_negatives
from ur4rec.rundir import prepare_run, stage_dir, write_text_whole
from ur4rec.training.checkpoint import read_checkpoint_info, read_weights
from ur4rec.training.stages import check_previous_stage, stage_spec, train_stage

METRICS = ("hr@10", "ndcg@10", "mrr")


def ablation_variants(config: Config) -> dict[str, tuple[list[str], bool]]:
    """name -> (config overrides, skip Stage 2)."""
    experts = list(config.moe.experts)
    variants: dict[str, tuple[list[str], bool]] = {"full": ([], False)}
    for expert in experts:
        others = [e for e in experts if e != expert]
        variants[f"no_{expert}"] = ([f"moe.experts={others}"], False)
    sources = list(config.moe.similarity)
    for source in sources:
        others = [s for s in sources if s != source]
        variants[f"no_{source}_similarity"] = ([f"moe.similarity={others}"], False)
    variants["no_memory"] = (["moe.memory=false"], False)
    variants["gate_off"] = (["moe.gate=none"], False)
    variants["skip_stage2"] = ([], True)
    return variants


def select_variants(config: Config, only: list[str] | None = None) -> dict[str, tuple[list[str], bool]]:
    """The variants named in ``only`` (all when None); an unknown name is an error listing the known ones,
    and so is an ``eval.ks`` without the cut-off of the table's METRICS (before anything trains)."""
    if 10 not in config.eval.ks:
        raise ValueError(f"ur4rec ablate tabulates {', '.join(METRICS)}: eval.ks must include 10, got {config.eval.ks}")
    variants = ablation_variants(config)
    unknown = [name for name in only or [] if name not in variants]
    if unknown:
        raise ValueError(f"unknown ablation {', '.join(map(repr, unknown))}; the variants are: {', '.join(variants)}")
    return {name: spec for name, spec in variants.items() if not only or name in only}


def run_ablations(config: Config, dataset: SequenceDataset, features, run_dir: Path,
                  only: list[str] | None = None) -> list[dict]:
    run_dir = Path(run_dir)
    stage1 = check_stage1(run_dir, dataset, config, features)
    order = list(ablation_variants(config))
    table = run_dir / "ablations.csv"
    stage1_hash = hashlib.sha256((stage1 / "model.safetensors").read_bytes()).hexdigest()[:16]
    # too few unseen items for the sampled protocol fails every variant: say so before any row is forgotten
    sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
    rows = []
    for name, (overrides, skip_stage2) in select_variants(config, only).items():
        variant_config = config.override(overrides) if overrides else config
        variant_dir = run_dir / "ablations" / name
        forget_row(table, name)  # until it finishes again: a stopped variant keeps no row its stages no longer back
        prepare_run(variant_dir, variant_config, dataset)
        shutil.rmtree(stage_dir(variant_dir, 1), ignore_errors=True)  # no file of an earlier copy stays beside this one
        shutil.copytree(stage1, stage_dir(variant_dir, 1))
        if (run_dir / "features").is_dir():  # which feature sets it used: `ur4rec evaluate` on the variant needs them
            shutil.copytree(run_dir / "features", variant_dir / "features", dirs_exist_ok=True)
        stages = [3] if skip_stage2 else [2, 3]
        result = None
        for stage in stages:
            result = train_stage(variant_config, dataset, features, variant_dir, stage, skip_stage2=skip_stage2)
        row = {"variant": name, "stage1_sha256": stage1_hash, "overrides": " ".join(overrides) or "-",
               "skip_stage2": skip_stage2,
               "best_epoch": result.best_epoch, "seconds_per_epoch": round(result.seconds_per_epoch, 3)}
        for split in ("valid", "test"):
            for protocol in ("full", "sampled"):
                for metric in METRICS:
                    row[f"{split}_{protocol}_{metric}"] = result.metrics[split][protocol][metric]
        rows.append(row)
        write_rows(table, rows, order)
    return rows


def check_stage1(run_dir: Path, dataset: SequenceDataset, config: Config, features=None) -> Path:
    """``RUN/stage1``, once it is a finished Stage 1 of this data whose weights are the ones its checkpoint.json
    was written with: every variant trains from a copy of it, so a stopped or damaged one is refused here,
    naming it, before any variant's row or copy is touched (``ur4rec ablate`` asks before it builds texts and
    features as well)."""
    run_dir = Path(run_dir)
    stage1 = stage_dir(run_dir, 1)
    if not (stage1 / "checkpoint.json").exists():
        raise FileNotFoundError(f"{stage1} has no checkpoint: run `ur4rec train --stage 1 --run-dir {run_dir}` first")
    check_previous_stage(run_dir, stage_spec(2), dataset.fingerprint, config=config, features=features)
    read_weights(stage1, read_checkpoint_info(stage1))
    return stage1


def read_rows(path: Path) -> list[dict]:
    """The rows of the table at ``path`` (none when it is missing or empty). A table without a variant column,
    or a row whose fields do not match the header, is an error naming the file and line: the table is
    written whole (:func:`write_table`), so only a hand edit or a damaged file has one."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        if header and "variant" not in header:
            raise ValueError(f"{path}, line 1: no variant column (the header is {','.join(header)})")
        rows = []
        for line, cells in enumerate(reader, start=2):
            if len(cells) != len(header):
                raise ValueError(f"{path}, line {line}: {len(cells)} fields, the header has {len(header)}")
            rows.append(dict(zip(header, cells)))
    return rows


def write_table(path: Path, fields: list[str], rows) -> None:
    """The table at ``path`` written whole or not at all: a run stopped while writing it keeps the old one."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_whole(path, text.getvalue())


def forget_row(path: Path, variant: str) -> None:
    """Remove ``variant``'s row from the table at ``path``, if it has one."""
    old = read_rows(path)
    if any(row["variant"] == variant for row in old):
        write_table(path, list(old[0]), [row for row in old if row["variant"] != variant])


def write_rows(path: Path, rows: list[dict], order: list[str]) -> None:
    """Write ``rows`` into the table at ``path``, keeping other variants' rows from the same Stage 1."""
    old = read_rows(path)
    stale = [row["variant"] for row in old if row.get("stage1_sha256") != rows[0]["stage1_sha256"]]
    if stale:
        warnings.warn(f"{path}: dropped the rows of {', '.join(stale)}: they started from another Stage 1",
                      stacklevel=2)
    kept = {row["variant"]: row for row in old if row["variant"] not in stale}
    kept.update({row["variant"]: row for row in rows})
    ordered = sorted(kept.values(), key=lambda row: order.index(row["variant"]) if row["variant"] in order else len(order))
    # kept rows share the fields: older layouts lack the hash and are dropped
    write_table(path, list(rows[0]), ordered)
