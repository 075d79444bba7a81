"""Command line: ``ur4rec <command>`` or ``python -m ur4rec <command>``.

Every command that trains or builds texts or features takes ``--config`` (with ``--set``
overrides) and ``--run-dir`` and writes the run directory described in :mod:`ur4rec.rundir`;
``evaluate`` takes ``--run-dir`` alone (the config is the one in the stage's checkpoint.json)
and writes nothing there, and ``compare`` reads stage directories.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ur4rec.config import Config, ConfigError, describe
from ur4rec.data import DataFormatError, DatasetNotFoundError, load_dataset
from ur4rec.precision import check_device
from ur4rec.rundir import RunDirError
from ur4rec.training.checkpoint import CheckpointError, read_checkpoint_info


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except (ConfigError, DataFormatError, DatasetNotFoundError, CheckpointError, RunDirError, ValueError,
            OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # a non-finite loss; the message says what the stage kept
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; a stage that was training keeps its last good checkpoint and log", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ur4rec", description="UR4Rec multimodal sequential recommendation workbench")
    commands = parser.add_subparsers(metavar="command")

    data = commands.add_parser("data", help="dataset commands").add_subparsers(metavar="action")
    stats = data.add_parser("stats", help="print users, items, interactions and sequence-length percentiles")
    _config_arguments(stats)
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(handler=command_data_stats)

    config = commands.add_parser("config", help="config commands").add_subparsers(metavar="action")
    show = config.add_parser("show", help="print every config key with its value and meaning")
    _config_arguments(show)
    show.set_defaults(handler=command_config_show)

    train = commands.add_parser("train", help="train a stage, keep its best checkpoint, evaluate it")
    _config_arguments(train)
    which = train.add_mutually_exclusive_group()
    which.add_argument("--stage", type=int, choices=[1, 2, 3], help="one stage to train (default 1)")
    which.add_argument("--stages", help="comma-separated stages to train in order, e.g. 1,2,3")
    train.add_argument("--skip-stage2", action="store_true",
                       help="let Stage 3 start from Stage 1 without a Stage-2 checkpoint (recorded in the run)")
    train.add_argument("--run-dir", required=True, type=Path, help="run directory to write")
    train.set_defaults(handler=command_train)

    ablate = commands.add_parser("ablate", help="train and evaluate each ablation of Stages 2-3 (needs RUN/stage1)")
    _config_arguments(ablate)
    ablate.add_argument("--run-dir", required=True, type=Path, help="run directory holding stage1/")
    ablate.add_argument("--only", help="comma-separated variant names (default: all)")
    ablate.set_defaults(handler=command_ablate)

    evaluate = commands.add_parser("evaluate", help="recompute what a stage saved (metrics, ranks, internals, Pop) from its "
                                      "checkpoint and check it")
    evaluate.add_argument("--run-dir", required=True, type=Path, help="run directory to read")
    evaluate.add_argument("--stage", type=int, default=1, help="stage to evaluate (default 1)")
    evaluate.add_argument("--device", help="evaluate on this device (default: the one the stage trained on, or cpu "
                                           "where that one is not available here)")
    evaluate.set_defaults(handler=command_evaluate)

    compare = commands.add_parser("compare", help="paired difference of two sets of runs, user by user, from "
                                                  "their saved ranks (validation and test)")
    compare.add_argument("--base", nargs="+", required=True, type=Path, metavar="STAGE_DIR",
                         help="stage directories of the reference, one per seed, e.g. runs/s0/stage1")
    compare.add_argument("--variant", nargs="+", required=True, type=Path, metavar="STAGE_DIR",
                         help="stage directories of what is compared with it, one per seed")
    compare.add_argument("--metrics", default="ndcg@10,hr@10", help="comma-separated: hr@k, ndcg@k, mrr")
    compare.set_defaults(handler=command_compare)

    from ur4rec.features.cli import register as register_feature_commands
    from ur4rec.text.cli import register as register_text_commands

    register_text_commands(commands)
    register_feature_commands(commands)
    return parser


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config (default: the built-in defaults on ML-100K; the settings chosen on "
                        "ML-100K are in configs/ml100k.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.epochs=5 (repeatable)")


def _load_config(args) -> Config:
    config = Config.load(args.config) if args.config else Config()
    return config.override(args.overrides) if args.overrides else config


def command_data_stats(args) -> int:
    config = _load_config(args)
    dataset = load_dataset(config.data)
    summary = dataset.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    lengths = summary.pop("sequence_length")
    for key, value in summary.items():
        print(f"{key:>20}  {value}")
    print(f"{'sequence length':>20}  " + "  ".join(f"{k}={v:g}" for k, v in lengths.items()))
    return 0


def command_config_show(args) -> int:
    config = _load_config(args).to_dict()
    for key, _default, meaning in describe():
        section, name = key.split(".", 1)
        print(f"{key:<32} {json.dumps(config[section][name]):<14} # {meaning}")
    return 0


def _stages(args) -> list[int]:
    if args.stages:
        try:
            stages = [int(part) for part in args.stages.split(",")]
        except ValueError:
            raise ValueError(f"--stages {args.stages!r}: expected comma-separated stage numbers, e.g. 1,2,3") from None
        if any(stage not in (1, 2, 3) for stage in stages) or stages != sorted(set(stages)):
            raise ValueError(f"--stages {args.stages!r}: stages are 1, 2, 3 in increasing order")
    else:
        stages = [args.stage or 1]
    if args.skip_stage2 and (2 in stages or 3 not in stages):
        raise ValueError("--skip-stage2 trains Stage 3 straight from Stage 1: use it with --stage 3 or --stages 1,3 "
                         f"(got {'--stages ' + args.stages if args.stages else f'--stage {stages[0]}'})")
    return stages


def write_pop_baseline(run_dir: Path, dataset, config: Config) -> dict:
    """The Pop baseline's metrics in the same harness, into ``run_dir/baselines/pop/metrics.json``."""
    from ur4rec.evaluation.evaluate import Popularity, build_eval_inputs, evaluate, sample_negatives
    from ur4rec.rundir import write_json

    negatives = sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
    pop = {split: evaluate(Popularity(dataset), build_eval_inputs(dataset, split, config.data.max_len, negatives),
                           config.eval).metrics for split in ("valid", "test")}
    write_json(Path(run_dir) / "baselines" / "pop" / "metrics.json", pop)
    return pop


def command_train(args) -> int:
    from ur4rec.rundir import prepare_run
    from ur4rec.training.trainer import train_stage1

    config = _load_config(args)
    stages = _stages(args)
    check_device(config.train.device, "train.device")  # Stages 2-3 build texts and features before training
    dataset = load_dataset(config.data)
    run_dir = prepare_run(args.run_dir, config, dataset)
    print(f"{dataset.name}: {dataset.n_users} users, {dataset.n_items} items, "
          f"{dataset.n_interactions} interactions (fingerprint {dataset.fingerprint}, {dataset.source})")
    rows, features = {}, None
    if stages[0] > 1:  # refuse before building features (minutes on ML-100K) when the previous stage is missing
        from ur4rec.training.stages import check_previous_stage, stage_spec

        check_previous_stage(run_dir, stage_spec(stages[0], args.skip_stage2), dataset.fingerprint, args.skip_stage2,
                             config)
    for stage in stages:
        if stage == 1:
            result = train_stage1(config, dataset, run_dir)
            name = "SASRec (stage 1)"
        else:
            from ur4rec.features import build_features
            from ur4rec.training.stages import train_stage

            if features is None:
                features = build_features(config, dataset, run_dir, progress=config.train.progress)
            result = train_stage(config, dataset, features, run_dir, stage, skip_stage2=args.skip_stage2)
            name = f"UR4Rec (stage {stage})"
        rows[name] = result.metrics["test"]
        print(f"\nstage {stage}: best epoch {result.best_epoch} of {result.epochs_run}, "
              f"{result.seconds_per_epoch:.2f} s/epoch, {result.total_seconds:.1f} s in all")
    rows["Pop"] = write_pop_baseline(run_dir, dataset, config)["test"]
    config.save(run_dir / "baselines" / "pop" / "config.yaml")  # what `ur4rec evaluate` recomputes it with
    print_table(rows, "test", config.eval.num_sampled_negatives)
    print(f"\nrun directory: {run_dir.resolve()}")
    return 0


def command_ablate(args) -> int:
    from ur4rec.features import build_features
    from ur4rec.training.ablate import check_stage1, run_ablations, select_variants

    config = _load_config(args)
    only = args.only.split(",") if args.only else None
    select_variants(config, only)  # an unknown name fails here, before features are built
    check_device(config.train.device, "train.device")  # and so does a device torch cannot use here
    dataset = load_dataset(config.data)
    check_stage1(args.run_dir, dataset, config)  # before texts and features are built (minutes on ML-100K)
    features = build_features(config, dataset, args.run_dir, progress=config.train.progress)
    rows = run_ablations(config, dataset, features, args.run_dir, only)
    width = max(len("variant"), *(len(row["variant"]) for row in rows))
    print(f"\n{'variant':<{width}} {'valid ndcg@10':>14} {'test hr@10':>11} {'test ndcg@10':>13}")
    for row in rows:
        print(f"{row['variant']:<{width}} {row['valid_full_ndcg@10']:>14.4f} {row['test_full_hr@10']:>11.4f} "
              f"{row['test_full_ndcg@10']:>13.4f}")
    print(f"\nwritten: {(args.run_dir / 'ablations.csv').resolve()}")
    return 0


def command_evaluate(args) -> int:
    from ur4rec.reproduce import check_history, compare_outputs
    from ur4rec.training.trainer import evaluate_stage

    stage_path = args.run_dir / f"stage{args.stage}"
    info = read_checkpoint_info(stage_path)
    config = Config.from_dict(info["config"], source=str(stage_path / "checkpoint.json"))
    config = config.override([f"train.device={evaluation_device(config.train.device, args.device)}"])
    dataset = load_dataset(config.data)
    with tempfile.TemporaryDirectory(prefix="ur4rec-evaluate-") as scratch:
        fresh = Path(scratch)  # laid out like the run directory
        if args.stage == 1:
            metrics = evaluate_stage(args.run_dir, dataset, config, stage=1, into=fresh / stage_path.name)
            state = None
        else:
            from ur4rec.features import load_features
            from ur4rec.training.stages import evaluate_multimodal_stage

            features = load_features(args.run_dir, dataset)
            metrics, state = evaluate_multimodal_stage(args.run_dir, dataset, features, config, args.stage,
                                                       into=fresh / stage_path.name)
        pop = args.run_dir / "baselines" / "pop"
        if (pop / "metrics.json").exists():  # in the table `train` prints, with the config it was computed with
            # (runs made before that config was kept: the run's config.yaml, which `train` wrote with it)
            saved = pop / "config.yaml" if (pop / "config.yaml").exists() else args.run_dir / "config.yaml"
            write_pop_baseline(fresh, dataset, Config.load(saved))
        print_table({f"stage {args.stage}": metrics["test"]}, "test", config.eval.num_sampled_negatives)
        compared, absent, differences = compare_outputs(args.run_dir, fresh)
        finished = f"{stage_path.name}/metrics.json" in compared
        if finished:  # the kept epoch's entries in the training history
            checked, history_differences = check_history(stage_path, fresh / stage_path.name, state)
            compared, differences = compared + checked, differences + history_differences
            if not (stage_path / "valid_ranks_by_epoch.csv").exists():  # runs before 2026-11-24 have none
                absent.append(f"{stage_path.name}/valid_ranks_by_epoch.csv")
    if absent:
        print(f"not in {args.run_dir}, so not checked: {', '.join(absent)}")
    if differences:
        print(f"{args.run_dir} differs from what its checkpoint gives:\n  " + "\n  ".join(differences), file=sys.stderr)
        from ur4rec.training.checkpoint import source_commit

        written_by, now = info.get("versions", {}).get("ur4rec_commit"), source_commit()
        if written_by and written_by != now:  # a later fix may have changed what these weights score
            print(f"{stage_path} was written by ur4rec commit {written_by}, and this is {now or 'not a git checkout'}: "
                  f"`git checkout {written_by.removesuffix('+modified')}` reproduces it if the code is the cause",
                  file=sys.stderr)
        return 1
    if not finished:  # the stage's own figures were never saved: the table above is unverified
        print(f"{stage_path} has no metrics.json: the stage stopped before its final evaluation, so nothing of it "
              f"was reproduced (`ur4rec train` it again)", file=sys.stderr)
        return 1
    print(f"reproduced {args.run_dir}: every metric matches, and every value in {', '.join(compared)}")
    return 0


def command_compare(args) -> int:
    from ur4rec.evaluation.compare import compare

    rows = compare(args.base, args.variant, tuple(args.metrics.split(",")))
    print(f"{len(args.base)} base run(s) against {len(args.variant)} variant run(s); each user's value is "
          f"averaged over a side's runs, then differenced (full ranking, {rows[0]['users']} users)")
    print(f"{'split':<8} {'metric':<8} {'base':>8} {'variant':>8} {'difference':>11} {'paired SE':>10} {'diff/SE':>8}")
    for row in rows:
        # no spread over users (identical runs): no ratio to show
        ratio = f"{row['difference'] / row['standard_error']:>8.1f}" if row["standard_error"] > 0 else f"{'-':>8}"
        print(f"{row['split']:<8} {row['metric']:<8} {row['base']:>8.4f} {row['variant']:>8.4f} "
              f"{row['difference']:>+11.4f} {row['standard_error']:>10.4f} {ratio}")
    if any(row["split"] == "valid-oh" for row in rows):
        print("valid-oh: validation at the epoch chosen on the other half of the users (50 random halvings), "
              "which the choice of epoch cannot flatter")
    return 0


def evaluation_device(trained_on: str, asked: str | None) -> str:
    """``--device`` when given (it must work here); else the training device, or cpu where that one is
    not available here (said on stderr: scores on another device may differ in the last bits, and a
    rank that moves with them shows as a difference)."""
    from ur4rec.precision import check_device

    if asked:
        return check_device(asked, "--device")
    try:
        return check_device(trained_on, "train.device")
    except ValueError as error:
        print(f"{error}: evaluating on cpu instead (pass --device to choose)", file=sys.stderr)
        return "cpu"


def print_table(rows: dict[str, dict[str, dict[str, float]]], split: str, negatives: int) -> None:
    """One line per model and protocol; the columns are the metrics every row has (eval.ks decides the
    cut-offs): hr@k and ndcg@k by k, then mrr and mean_rank."""
    shared = set.intersection(*(set(metrics[protocol]) for metrics in rows.values() for protocol in ("full", "sampled")))
    columns = sorted(shared, key=_column_order)
    header = f"{'model':<20} {'protocol':<8} " + " ".join(f"{m:>9}" for m in columns)
    print(f"\n{split} metrics (full = all items, seen excluded; sampled = 1 + {negatives} fixed negatives)")
    print(header)
    print("-" * len(header))
    for name, metrics in rows.items():
        for protocol in ("full", "sampled"):
            values = metrics[protocol]
            print(f"{name:<20} {protocol:<8} " + " ".join(
                f"{values[m]:>9.1f}" if m == "mean_rank" else f"{values[m]:>9.4f}" for m in columns))


def _column_order(metric: str) -> tuple[int, int]:
    name, _, k = metric.partition("@")
    return ({"hr": 0, "ndcg": 1, "mrr": 2, "mean_rank": 3}.get(name, 4), int(k) if k.isdigit() else 0)
