"""Stage 1 (SASRec) on MovieLens-100K: speed, memory and accuracy, settings chosen on validation.

    .venv/bin/python benchmarks/stage1_ml100k.py [--settings base,...] [--seeds 42] [--threads 2]

For each setting and seed: train to early stopping (every train interaction a target once per
epoch), report seconds per epoch, total wall time, peak RSS and validation/test metrics
(full ranking with seen items excluded, and sampled 1+99). The table gives means over the
seeds. Settings are compared on validation NDCG@10 at the epoch chosen by the *other* half of
the validation users ("valid-oh", `ur4rec.evaluation.compare.other_half_values`): a run's own
best-epoch figure is the maximum of its noisy epochs on the same users and flatters noisier and
longer runs. The chosen setting is the one with the best mean valid-oh NDCG@10, unless its gain
over base is no more than two standard errors of the paired difference over users (each user's
value averaged over the seeds, then differenced): then base. Its test metrics are the headline.
Also times one full-ranking evaluation of all users.

The peer's speed is measured in the same run: RecBole 1.2.1's SASRec (CE) trains
``--recbole-epochs`` epochs on the same CPU (``benchmarks/peer_recbole.py``, in the environment
``bash benchmarks/setup_recbole_peer.sh`` builds; without it the figure quoted below is used and
the output says so). Its accuracy is the mean of what ``benchmarks/recbole_accuracy.py`` measured
on this split, over the seeds whose output is there (``--recbole-accuracy``); otherwise it, and always pmixer's
SASRec.pytorch (not on PyPI), are the figures issue #2 quotes, measured on a 2-core AVX2 CPU
(leave-one-out by time, same metrics): RecBole ~235 s/epoch, best at epoch 11 (~47 min), test
HR@10 0.221 / NDCG@10 0.111; pmixer 1.3-4.5 s/epoch, test HR@10 0.187 / NDCG@10 0.099.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ur4rec.config import Config  # noqa: E402
from ur4rec.data import load_dataset  # noqa: E402
from ur4rec.evaluation import build_eval_inputs, evaluate, sample_negatives  # noqa: E402
from ur4rec.evaluation.compare import other_half_values, read_epoch_ranks  # noqa: E402
from ur4rec.evaluation.metrics import paired_difference_of_values  # noqa: E402
from ur4rec.precision import resolve_precision  # noqa: E402
from ur4rec.rundir import prepare_run, stage_dir  # noqa: E402
from ur4rec.training.checkpoint import load_model  # noqa: E402
from ur4rec.training.trainer import train_stage1  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "base": [],
    "cosine": ["train.lr_schedule=cosine", "train.epochs=60", "train.warmup_epochs=2", "train.patience=60"],
    "dropout0.1": ["model.dropout=0.1"],
    "dropout0.3-b64": ["model.dropout=0.3", "train.batch_size=64", "train.learning_rate=0.001"],
    "heads2": ["model.num_heads=2"],
    "layers2": ["model.num_layers=2"],
}
PEERS = {"RecBole SASRec (CE)": (235.0, 0.221, 0.111), "pmixer SASRec (BCE)": (4.5, 0.187, 0.099)}
RECBOLE = "RecBole SASRec (CE)"


def recbole_accuracy(folders: list[Path], fingerprint: str) -> tuple[float, float, list[Path]] | None:
    """(test HR@10, NDCG@10) that ``benchmarks/recbole_accuracy.py`` measured for RecBole's SASRec
    on the dataset with ``fingerprint``, averaged over the ``folders`` (one per RecBole seed) that
    hold such a measurement, and those folders; None when there is none."""
    measured = []
    for folder in folders:
        try:
            data = json.loads((folder / "data.json").read_text())
            test = json.loads((folder / "metrics.json").read_text())["test"]["full"]
        except FileNotFoundError:
            continue
        if data["fingerprint"] != fingerprint:
            print(f"{folder} was measured on another dataset (fingerprint {data['fingerprint']}); left out")
            continue
        measured.append((folder, test["hr@10"], test["ndcg@10"]))
    if not measured:
        return None
    return (statistics.fmean(hr for _, hr, _ in measured), statistics.fmean(ndcg for _, _, ndcg in measured),
            [folder for folder, _, _ in measured])


def time_recbole(python: Path, epochs: int, threads: int) -> float | None:
    """Mean seconds per epoch of RecBole's SASRec on this CPU, or None (with the reason printed)."""
    if epochs <= 0:
        return None
    if not python.exists():
        print(f"{RECBOLE} not timed: {python} is missing (bash benchmarks/setup_recbole_peer.sh builds it); "
              "its speed below is the figure issue #2 quotes from another CPU")
        return None
    print(f"timing {RECBOLE} for {epochs} epoch(s) on this CPU ({threads} threads) ...", flush=True)
    command = [str(python), str(ROOT / "benchmarks" / "peer_recbole.py"), "--epochs", str(epochs),
               "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{RECBOLE} failed (exit {done.returncode}); its speed below is the quoted figure:\n"
              f"{done.stderr[-2000:]}")
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    seconds = statistics.fmean(result["seconds_per_epoch"])
    print(f"{RECBOLE}: {', '.join(f'{s:.1f}' for s in result['seconds_per_epoch'])} s per epoch "
          f"({result['train_samples']} training sequences, torch {result['torch']}, {result['cpu']})", flush=True)
    return seconds


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def choose(rows, other_half: dict[str, list]):
    """The setting with the best mean valid-oh NDCG@10, unless its gain over base is no more than
    two paired standard errors over users: then base, the simpler choice. Test plays no part.
    Returns the row and a line saying why."""
    valid = {name: statistics.fmean(float(v.mean()) for v in values) for name, values in other_half.items()}
    best = max(rows, key=lambda row: valid[row[0]])
    if best[0] == "base" or "base" not in valid:
        return best, f"{best[0]} has the best mean valid-oh NDCG@10"
    gain, error = paired_difference_of_values(other_half["base"], other_half[best[0]])
    why = f"{best[0]} - base on valid-oh NDCG@10: {gain:+.4f}, paired standard error over users {error:.4f}"
    if gain <= 2 * error:
        return next(row for row in rows if row[0] == "base"), why + ": within two errors, base kept"
    return best, why + ": more than two errors"


def mean(results, *keys) -> float:
    """Mean over seeds of ``result.metrics[k0][k1]...``."""
    values = []
    for result in results:
        value = result.metrics
        for key in keys:
            value = value[key]
        values.append(value)
    return statistics.fmean(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "ml100k.yaml"))
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names from SETTINGS")
    parser.add_argument("--seeds", default="42", help="comma-separated training seeds; settings are compared on "
                                                      "their mean valid-oh NDCG@10 (see above)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="applied to every setting, after the setting's own values, e.g. "
                             "train.precision=fp32 (repeatable)")
    parser.add_argument("--recbole-epochs", type=int, default=2,
                        help="epochs of RecBole's SASRec to time on this CPU in the same run (0: use the quoted figure)")
    parser.add_argument("--recbole-python", type=Path, default=ROOT / ".venv-recbole" / "bin" / "python",
                        help="the peer environment's Python (benchmarks/setup_recbole_peer.sh)")
    parser.add_argument("--recbole-accuracy", type=Path, nargs="+",
                        default=[ROOT / "runs" / "benchmarks" / "recbole_accuracy",
                                 ROOT / "runs" / "benchmarks" / "recbole_accuracy_2021"],
                        help="benchmarks/recbole_accuracy.py's outputs, one per RecBole seed: their mean test "
                             "accuracy on this split is used instead of the quoted figure when present")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "stage1_ml100k",
                        help="where the runs are kept, one run directory per setting and seed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    unknown = [name for name in args.settings.split(",") if name not in SETTINGS]
    if unknown:  # before anything trains, not once the settings before it have
        parser.error(f"unknown setting {', '.join(map(repr, unknown))}; the settings are: {', '.join(SETTINGS)}")
    base = Config.load(args.config).override(["train.progress=false", *args.overrides])
    dataset = load_dataset(base.data)
    print(f"{dataset.name}: {dataset.n_users} users, {dataset.n_items} items, {dataset.n_interactions} "
          f"interactions, fingerprint {dataset.fingerprint}; torch {torch.__version__}, {args.threads} threads, "
          f"training precision {resolve_precision(base.train.precision, base.train.device)} "
          f"(RecBole trains in fp32), seeds {seeds}")
    ml100k = dataset.name == "ml-100k"  # the peers' figures are for ML-100K only
    recbole_seconds = time_recbole(args.recbole_python, args.recbole_epochs if ml100k else 0, args.threads)

    rows = []  # (setting, [StageResult per seed], [evaluation seconds per seed])
    other_half: dict[str, list] = {}  # setting -> per seed, every user's valid-oh NDCG@10
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.settings.split(","):
        results, eval_times = [], []
        other_half[name] = []
        for seed in seeds:
            config = base.override([*SETTINGS[name], *args.overrides, f"train.seed={seed}"])  # --set wins
            run_dir = args.out / f"{name}_seed{seed}"
            prepare_run(run_dir, config, dataset)
            result = train_stage1(config, dataset, run_dir)
            other_half[name].append(other_half_values(read_epoch_ranks(stage_dir(run_dir, 1))[2]))
            model, _ = load_model(stage_dir(run_dir, 1))
            negatives = sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
            inputs = build_eval_inputs(dataset, "test", config.data.max_len, negatives)
            evaluate(model, inputs, config.eval)  # warm-up
            start = time.perf_counter()
            evaluate(model, inputs, config.eval)
            eval_times.append(time.perf_counter() - start)
            results.append(result)
            test = result.metrics["test"]
            print(f"[{name}, seed {seed}] best epoch {result.best_epoch}/{result.epochs_run}  "
                  f"{result.seconds_per_epoch:.2f} s/epoch  total {result.total_seconds:.1f} s  "
                  f"valid ndcg@10 {result.metrics['valid']['full']['ndcg@10']:.4f} (valid-oh "
                  f"{other_half[name][-1].mean():.4f})  "
                  f"test hr@10 {test['full']['hr@10']:.4f} ndcg@10 {test['full']['ndcg@10']:.4f}  "
                  f"eval(all users) {eval_times[-1]:.3f} s  process peak RSS so far {peak_rss_mib():.0f} MiB", flush=True)
        rows.append((name, results, eval_times))

    print(f"\nmeans over seeds {seeds}")
    print("setting            s/epoch  total s  best ep  valid ndcg@10 valid-oh | test full hr@10 ndcg@10 | "
          "sampled hr@10 ndcg@10 | eval s")
    for name, results, eval_times in rows:
        print(f"{name:<18} {statistics.fmean(r.seconds_per_epoch for r in results):>7.2f} "
              f"{statistics.fmean(r.total_seconds for r in results):>8.1f} "
              f"{'/'.join(str(r.best_epoch) for r in results):>8} "
              f"{mean(results, 'valid', 'full', 'ndcg@10'):>14.4f} "
              f"{statistics.fmean(float(v.mean()) for v in other_half[name]):>8.4f} | "
              f"{mean(results, 'test', 'full', 'hr@10'):>15.4f} "
              f"{mean(results, 'test', 'full', 'ndcg@10'):>7.4f} | {mean(results, 'test', 'sampled', 'hr@10'):>13.4f} "
              f"{mean(results, 'test', 'sampled', 'ndcg@10'):>7.4f} | {statistics.fmean(eval_times):>6.3f}")
    (name, results, _), why = choose(rows, other_half)
    hr, ndcg = mean(results, "test", "full", "hr@10"), mean(results, "test", "full", "ndcg@10")
    seconds = statistics.fmean(r.seconds_per_epoch for r in results)
    print(f"\n{why}\nchosen on validation: {name}: test HR@10 {hr:.4f}, NDCG@10 {ndcg:.4f}, "
          f"{seconds:.2f} s/epoch, {statistics.fmean(r.total_seconds for r in results):.1f} s to early stopping, "
          f"peak RSS {peak_rss_mib():.0f} MiB")
    measured = recbole_accuracy(args.recbole_accuracy, dataset.fingerprint) if ml100k else None
    for peer, (peer_seconds, peer_hr, peer_ndcg) in PEERS.items() if ml100k else ():
        where, accuracy_from = "quoted from issue #2, another CPU", "accuracy quoted from issue #2"
        if peer == RECBOLE and recbole_seconds is not None:
            peer_seconds, where = recbole_seconds, "measured in this run"
        if peer == RECBOLE and measured is not None:
            peer_hr, peer_ndcg, folders = measured
            accuracy_from = f"accuracy on this split, mean of {', '.join(str(folder) for folder in folders)}"
        print(f"  vs {peer}: {peer_seconds / seconds:.0f}x faster per epoch ({peer_seconds:.1f} s, {where}), "
              f"HR@10 {hr / peer_hr - 1:+.1%}, NDCG@10 {ndcg / peer_ndcg - 1:+.1%} ({accuracy_from})")
    print(f"\nruns kept in {args.out.resolve()} (SETTING_seedS/): `ur4rec evaluate --run-dir RUN --stage 1` "
          "reproduces a run's metrics; `ur4rec compare` recomputes a paired difference")


if __name__ == "__main__":
    main()
