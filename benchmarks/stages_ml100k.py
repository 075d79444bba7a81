"""Stages 1-3 and every ablation on MovieLens-100K over several seeds, mean ± std.

    .venv/bin/python benchmarks/stages_ml100k.py [--seeds 0,1,2] [--only full,skip_stage2,...]

Per seed: Stage 1 (SASRec) to early stopping, then Stages 2-3 of each ablation variant from
that Stage-1 checkpoint (`ur4rec.training.ablate`), all chosen by validation NDCG@10 only.
Prints test metrics (full and sampled), epoch time of each stage, the time of one
full-ranking evaluation of all users by the Stage-3 model ("full" variant), and each model's
difference from Stage 1, and each ablation's from full Stage 3, paired over users (each user's
NDCG@10 averaged over the seeds) with its standard error, on validation, test and valid-oh
(validation at the epoch the other half of the users chose: `ur4rec compare`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ur4rec.config import Config  # noqa: E402
from ur4rec.data import load_dataset  # noqa: E402
from ur4rec.evaluation import build_eval_inputs, evaluate, sample_negatives  # noqa: E402
from ur4rec.evaluation.compare import compare  # noqa: E402
from ur4rec.features import build_features  # noqa: E402
from ur4rec.rundir import prepare_run, stage_dir  # noqa: E402
from ur4rec.training.ablate import run_ablations, select_variants  # noqa: E402
from ur4rec.training.stages import load_stage_model  # noqa: E402
from ur4rec.training.trainer import train_stage1  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = [("test", "full", "hr@10"), ("test", "full", "ndcg@10"), ("test", "sampled", "hr@10"),
           ("test", "sampled", "ndcg@10"), ("valid", "full", "ndcg@10")]


def in_stage_order(rows: dict) -> list:
    """Keys with Stage 1, Stage 2 and Stage 3 first (in that order), then the ablations as run."""
    def rank(name: str) -> int:
        for position, prefix in enumerate(("stage 1", "stage 2", "stage 3 (UR4Rec)", "stage 3 full")):
            if name.startswith(prefix):
                return position
        return 4
    return sorted(rows, key=rank)  # stable: ablations keep their order


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "ml100k.yaml"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", help="comma-separated ablation variants (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "stages_ml100k",
                        help="where the runs are kept: one run directory per seed, ablations inside it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = Config.load(args.config).override(["train.progress=false", *args.overrides])
    only = args.only.split(",") if args.only else None
    try:
        select_variants(base, only)  # an unknown name: refused here, not after Stage 1 has trained
    except ValueError as error:
        parser.error(str(error))
    dataset = load_dataset(base.data)
    table: dict[str, dict[tuple, list[float]]] = {}
    seconds: dict[str, list[float]] = {}
    eval_seconds = []
    stage_dirs: dict[str, list[Path]] = {}  # model -> its stage directory per seed, for paired differences
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        config = base.override([f"train.seed={seed}"])
        run_dir = args.out / f"seed{seed}"
        prepare_run(run_dir, config, dataset)
        features = build_features(config, dataset, run_dir, progress=False)
        stage1 = train_stage1(config, dataset, run_dir)
        row = table.setdefault("stage 1 (SASRec)", {})
        for key in COLUMNS:
            row.setdefault(key, []).append(stage1.metrics[key[0]][key[1]][key[2]])
        seconds.setdefault("stage 1", []).append(stage1.seconds_per_epoch)
        stage_dirs.setdefault("stage 1 (SASRec)", []).append(stage_dir(run_dir, 1))
        rows = run_ablations(config, dataset, features, run_dir, only)
        for ablation in rows:
            name = "stage 3 (UR4Rec)" if ablation["variant"] == "full" else f"  ablation {ablation['variant']}"
            row = table.setdefault(name, {})
            for key in COLUMNS:
                row.setdefault(key, []).append(ablation[f"{key[0]}_{key[1]}_{key[2]}"])
            seconds.setdefault(f"stage 3 {ablation['variant']}", []).append(ablation["seconds_per_epoch"])
            stage_dirs.setdefault(name, []).append(stage_dir(run_dir / "ablations" / ablation["variant"], 3))
            if ablation["variant"] == "full":
                full_dir = run_dir / "ablations" / "full"
                stage_dirs.setdefault("stage 2", []).append(stage_dir(full_dir, 2))
                stage2 = json.loads((stage_dir(full_dir, 2) / "metrics.json").read_text())
                row = table.setdefault("stage 2", {})
                for key in COLUMNS:
                    row.setdefault(key, []).append(stage2[key[0]][key[1]][key[2]])
                stage2_log = (stage_dir(full_dir, 2) / "log.jsonl").read_text().splitlines()
                seconds.setdefault("stage 2", []).append(
                    float(np.mean([json.loads(line)["seconds"] for line in stage2_log])))
                model, _ = load_stage_model(stage_dir(full_dir, 3), features, dataset)
                negatives = sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
                inputs = build_eval_inputs(dataset, "test", config.data.max_len, negatives)
                start = time.perf_counter()
                evaluate(model, inputs, config.eval)
                eval_seconds.append(time.perf_counter() - start)
        print(f"seed {seed} done", flush=True)
        print_table(table, seconds, eval_seconds, dataset.n_users)
        print_paired(stage_dirs)
    print(f"\nruns kept in {args.out.resolve()} (seedS/, each ablation in seedS/ablations/VARIANT/): "
          "`ur4rec compare` recomputes any paired difference above from them")


def print_paired(stage_dirs: dict[str, list[Path]]) -> None:
    """Each model minus Stage 1, then each ablation minus full Stage 3 (what switching that part
    off costs): NDCG@10 paired over users, ± the standard error of that difference."""
    for reference_name, title in (("stage 1 (SASRec)", "against Stage 1"),
                                  ("stage 3 (UR4Rec)", "ablations against full Stage 3")):
        if reference_name not in stage_dirs:
            continue
        print(f"\n{title}, paired over users (NDCG@10 difference ± standard error):")
        for name in in_stage_order(stage_dirs):
            folders = stage_dirs[name]
            if name == reference_name or (reference_name.startswith("stage 3") and "ablation" not in name):
                continue
            rows = compare(stage_dirs[reference_name], folders, ("ndcg@10",))
            print(f"  {name.strip():<28} " + "  ".join(
                f"{row['split']} {row['difference']:+.4f} ± {row['standard_error']:.4f}" for row in rows), flush=True)


def print_table(table, seconds, eval_seconds, n_users) -> None:
    """The table so far (printed after every seed, so a long run is useful before it ends)."""
    header = "| model | " + " | ".join(f"{split} {protocol} {metric}" for split, protocol, metric in COLUMNS) + " |"
    print("\n" + header)
    print("|" + "---|" * (len(COLUMNS) + 1))
    for name in in_stage_order(table):
        print(f"| {name.strip()} | " + " | ".join(mean_std(table[name][key]) for key in COLUMNS) + " |")
    print("\nseconds per epoch (mean over seeds):")
    for name in in_stage_order(seconds):
        print(f"  {name:<28} {np.mean(seconds[name]):.2f}")
    if eval_seconds:
        print(f"full-ranking evaluation of all {n_users} users, Stage 3: {np.mean(eval_seconds):.2f} s")
    if "stage 3 (UR4Rec)" in table:
        ratio = np.mean(table["stage 3 (UR4Rec)"][COLUMNS[1]]) / np.mean(table["stage 1 (SASRec)"][COLUMNS[1]])
        print(f"Stage 3 / Stage 1 test NDCG@10 (full): {ratio:.3f} (target >= 1.05)", flush=True)


if __name__ == "__main__":
    main()
