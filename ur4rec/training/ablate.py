"""Ablations of the multimodal stages: each expert off, memory off, gate off, Stage 2 skipped.

Every variant starts from the same Stage-1 checkpoint (``RUN/stage1``, trained once), trains
Stages 2 and 3 into ``RUN/ablations/<variant>/`` and is evaluated in the same harness;
``RUN/ablations.csv`` gets one row per variant with validation and test metrics.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from ur4rec.config import Config
from ur4rec.data.dataset import SequenceDataset
from ur4rec.rundir import prepare_run, stage_dir
from ur4rec.training.stages import train_stage

METRICS = ("hr@10", "ndcg@10", "mrr")


def ablation_variants(config: Config) -> dict[str, tuple[list[str], bool]]:
    """name -> (config overrides, skip Stage 2)."""
    experts = list(config.moe.experts)
    variants: dict[str, tuple[list[str], bool]] = {"full": ([], False)}
    for expert in experts:
        others = [e for e in experts if e != expert]
        variants[f"no_{expert}"] = ([f"moe.experts={others}"], False)
    variants["no_memory"] = (["moe.memory=false"], False)
    variants["gate_off"] = (["moe.gate=none"], False)
    variants["skip_stage2"] = ([], True)
    return variants


def run_ablations(config: Config, dataset: SequenceDataset, features, run_dir: Path,
                  only: list[str] | None = None) -> list[dict]:
    run_dir = Path(run_dir)
    stage1 = stage_dir(run_dir, 1)
    if not (stage1 / "checkpoint.json").exists():
        raise FileNotFoundError(f"{stage1} has no checkpoint: run `ur4rec train --stage 1 --run-dir {run_dir}` first")
    rows = []
    for name, (overrides, skip_stage2) in ablation_variants(config).items():
        if only and name not in only:
            continue
        variant_config = config.override(overrides) if overrides else config
        variant_dir = run_dir / "ablations" / name
        prepare_run(variant_dir, variant_config, dataset)
        shutil.copytree(stage1, stage_dir(variant_dir, 1), dirs_exist_ok=True)
        stages = [3] if skip_stage2 else [2, 3]
        result = None
        for stage in stages:
            result = train_stage(variant_config, dataset, features, variant_dir, stage, skip_stage2=skip_stage2)
        row = {"variant": name, "overrides": " ".join(overrides) or "-", "skip_stage2": skip_stage2,
               "best_epoch": result.best_epoch, "seconds_per_epoch": round(result.seconds_per_epoch, 3)}
        for split in ("valid", "test"):
            for protocol in ("full", "sampled"):
                for metric in METRICS:
                    row[f"{split}_{protocol}_{metric}"] = result.metrics[split][protocol][metric]
        rows.append(row)
        write_rows(run_dir / "ablations.csv", rows)
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
