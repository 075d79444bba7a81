"""RecBole 1.2.1's SASRec trained on UR4Rec's own split and ranked by UR4Rec's evaluation code:
the accuracy half of issue #2's peer comparison, measured on this CPU.

    bash benchmarks/setup_recbole_peer.sh                      # once: .venv-recbole
    .venv/bin/python benchmarks/recbole_accuracy.py [--threads 2]
    .venv/bin/ur4rec compare --base runs/benchmarks/recbole_accuracy --variant RUN/stage1 ...

1. Writes UR4Rec's split of the config's dataset (`configs/ml100k.yaml`) as a RecBole atomic file
   whose timestamps are each item's place in UR4Rec's time order, so RecBole's leave-one-out
   (split "LS", order "TO") holds out exactly UR4Rec's validation and test items and trains on
   exactly its train parts; and UR4Rec's validation and test inputs (the newest `max_len` items).
2. `benchmarks/peer_recbole.py --data-dir` (in .venv-recbole) trains RecBole's SASRec with its own
   defaults (CE over all items, 2 layers, d = 64, dropout 0.5, batch 2048, lr 0.001) to its own
   early stopping (validation NDCG@10 in RecBole's protocol, patience 10) and scores every item
   for every validation and test input with the best epoch's weights.
3. Ranks those scores with `ur4rec.evaluation.evaluate`, the code that ranks Stage 1: full
   ranking with each user's seen items excluded, and the 1+99 sampled protocol with UR4Rec's
   fixed negatives. Writes `metrics.json`, `valid_ranks.csv`, `test_ranks.csv` (the run-directory
   formats, so `ur4rec compare` pairs them with any UR4Rec run user by user), `data.json` (the
   dataset's summary and fingerprint) and `peer.json` (RecBole's epoch times and validation
   curve) into `--out`, where `benchmarks/stage1_ml100k.py` finds RecBole's accuracy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_recbole import SPLIT_NAME  # noqa: E402  (the dataset name the peer reads under --data-dir)

from ur4rec.config import Config  # noqa: E402
from ur4rec.data import load_dataset  # noqa: E402
from ur4rec.data.dataset import SequenceDataset  # noqa: E402
from ur4rec.evaluation import build_eval_inputs, evaluate, sample_negatives  # noqa: E402
from ur4rec.evaluation.evaluate import left_pad  # noqa: E402
from ur4rec.rundir import write_json, write_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def write_split(dataset: SequenceDataset, folder: Path) -> Path:
    """``folder/ur4rec-split/ur4rec-split.inter``: one line per interaction, tokens = UR4Rec's
    internal user and item ids, timestamp = the item's place in the user's sequence (0, 1, ...)."""
    path = Path(folder) / SPLIT_NAME / f"{SPLIT_NAME}.inter"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        handle.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user, sequence in enumerate(dataset.sequences):
            handle.writelines(f"{user}\t{item}\t{place}\n" for place, item in enumerate(sequence.tolist()))
    return path


def write_histories(dataset: SequenceDataset, max_len: int, folder: Path) -> Path:
    """``folder/histories.npz``: the left-padded validation and test inputs and their targets, UR4Rec
    item ids."""
    path = Path(folder) / "histories.npz"
    arrays = {"n_items": dataset.n_items}
    for split in ("valid", "test"):
        arrays[f"{split}_input_ids"] = left_pad([dataset.history(u, split) for u in range(dataset.n_users)], max_len)
        arrays[f"{split}_targets"] = dataset.target(split)
    np.savez(path, **arrays)
    return path


class SavedScores:
    """Scores computed elsewhere, served to ``evaluate`` as if by a model: row u is user u's."""

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))

    def score_all(self, users: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.scores[users.cpu()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first sentence, whole
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "ml100k.yaml",
                        help="the UR4Rec config whose data section (dataset, split, max_len) and eval section are used")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2020, help="RecBole's seed (its default)")
    parser.add_argument("--max-epochs", type=int, default=300, help="RecBole's epoch cap (its default)")
    parser.add_argument("--recbole-python", type=Path, default=ROOT / ".venv-recbole" / "bin" / "python",
                        help="the peer environment's Python (benchmarks/setup_recbole_peer.sh)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "recbole_accuracy")
    args = parser.parse_args()
    if not args.recbole_python.exists():
        sys.exit(f"{args.recbole_python} is missing: run `bash benchmarks/setup_recbole_peer.sh` first")
    config = Config.load(args.config)
    dataset = load_dataset(config.data)
    if config.data.max_len != 50:
        sys.exit(f"{args.config}: data.max_len is {config.data.max_len}; the peer is run with RecBole's 50")
    data_dir = args.out / "data"
    write_split(dataset, data_dir)
    write_histories(dataset, config.data.max_len, data_dir)
    print(f"{dataset.name}: {dataset.n_users} users, {dataset.n_items} items, fingerprint {dataset.fingerprint}; "
          f"RecBole trains on UR4Rec's split ({data_dir}), {args.threads} threads", flush=True)

    start = time.perf_counter()
    command = [str(args.recbole_python), str(ROOT / "benchmarks" / "peer_recbole.py"), "--data-dir", str(data_dir),
               "--threads", str(args.threads), "--seed", str(args.seed), "--max-epochs", str(args.max_epochs)]
    finished = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # its progress goes to stderr
    if finished.returncode != 0:
        sys.exit(f"{' '.join(command)} failed with exit status {finished.returncode}")
    peer = json.loads(finished.stdout.strip().splitlines()[-1])
    peer["wall_seconds"] = time.perf_counter() - start

    scores = np.load(data_dir / "scores.npz")
    negatives = sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
    metrics = {}
    for split in ("valid", "test"):
        inputs = build_eval_inputs(dataset, split, config.data.max_len, negatives)
        result = evaluate(SavedScores(scores[split]), inputs, config.eval)
        metrics[split] = result.metrics
        write_ranks(args.out / f"{split}_ranks.csv", dataset, split, result.rank_full, result.rank_sampled)
    write_json(args.out / "data.json", dataset.summary())
    write_json(args.out / "metrics.json", metrics)
    write_json(args.out / "peer.json", peer)

    seconds = peer["seconds_per_epoch"]
    print(f"\n{peer['peer']}: {peer['epochs_run']} epochs, best {peer['best_epoch']} (RecBole's validation), "
          f"{np.mean(seconds):.1f} s per epoch (median {np.median(seconds):.1f}), {peer['wall_seconds'] / 60:.1f} min "
          f"in all, {peer['train_samples']} training sequences per epoch")
    print("split  full hr@10 ndcg@10   mrr | sampled hr@10 ndcg@10")
    for split in ("valid", "test"):
        full, sampled = metrics[split]["full"], metrics[split]["sampled"]
        print(f"{split:<6} {full['hr@10']:>10.4f} {full['ndcg@10']:>7.4f} {full['mrr']:>5.4f} | "
              f"{sampled['hr@10']:>13.4f} {sampled['ndcg@10']:>7.4f}")
    print(f"(UR4Rec's harness: full ranking {'with seen items excluded' if config.eval.exclude_seen else 'of all items'}; "
          f"RecBole's own protocol read valid NDCG@10 {peer['valid_recbole_protocol'].get('ndcg@10', float('nan')):.4f})")
    print(f"\nkept in {args.out.resolve()}: `ur4rec compare --base {args.out} --variant RUN/stage1 ...` pairs it "
          "with UR4Rec runs user by user")


if __name__ == "__main__":
    main()
