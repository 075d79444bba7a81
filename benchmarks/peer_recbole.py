"""RecBole 1.2.1's SASRec (CE) on MovieLens-100K, timed per epoch: the peer of issue #2, run on
the same CPU as UR4Rec's Stage 1.

Runs in its own environment, because RecBole 1.2.1 needs numpy < 2 (its config sets
``np.float = np.float_``), which UR4Rec's pinned stack does not have:

    bash benchmarks/setup_recbole_peer.sh                       # .venv-recbole, about 1 minute
    .venv-recbole/bin/python benchmarks/peer_recbole.py --epochs 2 --threads 2

``benchmarks/stage1_ml100k.py --recbole-epochs N`` runs this script in the same run and prints
the measured ratio. The data is the ML-100K copy bundled in the recbole wheel; the model is
RecBole's SASRec with its own defaults (2 layers, 2 heads, d = 64, inner size 256, dropout 0.5,
batch 2048, learning rate 0.001) and CE loss over all items, the settings issue #2 quotes. Every
epoch trains on every prefix of every user's train sequence, RecBole's own data preparation.
Prints one JSON object: seconds per epoch, train loss per epoch, and with ``--evaluate``
RecBole's validation metrics after the last epoch (RecBole's own protocol, for information).

With ``--data-dir D`` it trains on UR4Rec's own split instead and measures accuracy:
``benchmarks/recbole_accuracy.py`` writes ``D/ur4rec-split/ur4rec-split.inter`` (each user's
items with their place in UR4Rec's time order as the timestamp, so RecBole's leave-one-out gives
the same train, validation and test items) and ``D/histories.npz`` (the validation and test
inputs, UR4Rec item ids, left-padded). RecBole trains to its own early stopping (``Trainer.fit``:
validation NDCG@10 in its own protocol, patience 10) and the best epoch's weights score every
item for every history; the scores, columns in UR4Rec's item order, go to ``D/scores.npz``, which
the caller ranks in UR4Rec's evaluation harness.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first sentence, whole
    parser.add_argument("--epochs", type=int, default=2, help="epochs to time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--evaluate", action="store_true", help="also run RecBole's validation once")
    parser.add_argument("--data-dir", type=Path, help="train to early stopping on UR4Rec's split written here "
                        "by benchmarks/recbole_accuracy.py, and write the scores of its histories")
    parser.add_argument("--max-epochs", type=int, default=300, help="with --data-dir: RecBole's `epochs` cap")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value pairs from the command line

    try:
        import recbole
        import torch
        from recbole.config import Config
        from recbole.data import create_dataset, data_preparation
        from recbole.model.sequential_recommender import SASRec
        from recbole.trainer import Trainer
        from recbole.utils import init_seed
    except ImportError as error:
        sys.exit(f"{error}: run this script with the peer environment's Python, made by "
                 "`bash benchmarks/setup_recbole_peer.sh` (.venv-recbole/bin/python)")
    if recbole.__version__ != "1.2.1":
        sys.exit(f"recbole {recbole.__version__} is installed; issue #2's peer is recbole 1.2.1")
    torch.set_num_threads(args.threads)
    if args.data_dir is None:
        data_path, name = Path(recbole.__file__).parent / "dataset_example", "ml-100k"
    else:
        data_path, name = args.data_dir.resolve(), SPLIT_NAME
    if not (data_path / name / f"{name}.inter").exists():
        sys.exit(f"{data_path / name / name}.inter is missing"
                 + (" from the recbole wheel" if args.data_dir is None else ": run benchmarks/recbole_accuracy.py"))

    here = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)  # RecBole's Trainer writes log_tensorboard/ into the working directory
        try:
            config = Config(model="SASRec", dataset=name, config_dict={
                "data_path": str(data_path),
                "checkpoint_dir": scratch,
                "loss_type": "CE",
                "train_neg_sample_args": None,
                "MAX_ITEM_LIST_LENGTH": 50,
                "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
                "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
                "metrics": ["Hit", "NDCG"],
                "topk": [10],
                "valid_metric": "NDCG@10",
                "epochs": args.epochs if args.data_dir is None else args.max_epochs,
                "seed": args.seed,
                "reproducibility": True,
                "device": "cpu",
                "use_gpu": False,
                "worker": 0,
                "show_progress": False,
                "state": "WARNING",
            })
            logging.getLogger().setLevel(logging.WARNING)
            init_seed(config["seed"], config["reproducibility"])
            dataset = create_dataset(config)
            train_data, valid_data, test_data = data_preparation(config, dataset)
            if args.data_dir is not None:
                check_split(dataset, valid_data, test_data, np.load(args.data_dir / "histories.npz"))
            model = SASRec(config, train_data.dataset).to(config["device"])
            trainer = Trainer(config, model)
            result = {
                "peer": "RecBole 1.2.1 SASRec (CE)",
                "threads": args.threads,
                "train_samples": len(train_data.dataset),
                "torch": torch.__version__,
                "cpu": _cpu_name(),
            }
            if args.data_dir is None:
                result.update(_time_epochs(trainer, train_data, args.epochs))
                if args.evaluate:
                    start = time.perf_counter()
                    result["valid_recbole_protocol"] = dict(trainer.evaluate(valid_data, load_best_model=False))
                    result["evaluate_seconds"] = time.perf_counter() - start
            else:
                result.update(_fit_and_score(trainer, train_data, valid_data, dataset, args.data_dir))
        finally:
            os.chdir(here)
    print(json.dumps(result))
    return 0


def _time_epochs(trainer, train_data, epochs: int) -> dict:
    seconds, losses = [], []
    for epoch in range(epochs):
        start = time.perf_counter()
        loss = trainer._train_epoch(train_data, epoch, show_progress=False)
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss if not isinstance(loss, tuple) else sum(loss)))
        print(f"recbole SASRec epoch {epoch + 1}: {seconds[-1]:.1f} s, loss {losses[-1]:.4f}",
              file=sys.stderr, flush=True)
    return {"seconds_per_epoch": seconds, "train_loss": losses}


def _fit_and_score(trainer, train_data, valid_data, dataset, data_dir: Path) -> dict:
    """RecBole's own training loop to its early stopping; then the best epoch's scores of UR4Rec's
    validation and test histories, written to ``data_dir/scores.npz``."""
    import torch

    seconds, log = [], []
    best = {"score": float("-inf"), "epoch": None, "state": None}
    train_epoch = trainer._train_epoch

    def timed_train_epoch(*args, **kwargs):
        start = time.perf_counter()
        loss = train_epoch(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return loss

    def after_validation(epoch: int, valid_score: float) -> None:
        log.append({"epoch": epoch + 1, "seconds": seconds[-1], "valid_ndcg@10_recbole_protocol": valid_score})
        print(f"recbole SASRec epoch {epoch + 1}: {seconds[-1]:.1f} s, valid NDCG@10 (RecBole protocol) "
              f"{valid_score:.4f}", file=sys.stderr, flush=True)
        if valid_score >= best["score"]:  # RecBole's own rule: a later epoch that ties the best replaces it
            state = {key: value.detach().clone() for key, value in trainer.model.state_dict().items()}
            best.update(score=valid_score, epoch=epoch + 1, state=state)

    trainer._train_epoch = timed_train_epoch
    start = time.perf_counter()
    best_score, best_result = trainer.fit(train_data, valid_data, verbose=False, saved=False,
                                          callback_fn=after_validation)
    fit_seconds = time.perf_counter() - start
    if best["score"] != best_score:
        sys.exit(f"the best validation score kept here ({best['score']}) is not RecBole's ({best_score})")
    trainer.model.load_state_dict(best["state"])  # the best epoch's weights, kept in memory: no pickle
    model = trainer.model.eval()

    histories = np.load(data_dir / "histories.npz")
    token_to_id = dataset.field2token_id["item_id"]
    lookup = recbole_ids(int(histories["n_items"]), token_to_id)
    scores = {}
    with torch.no_grad():
        for split in ("valid", "test"):
            item_seq, lengths = right_padded(histories[f"{split}_input_ids"], lookup)
            rows = []
            for begin in range(0, len(item_seq), 256):
                output = model.forward(torch.from_numpy(item_seq[begin:begin + 256]),
                                       torch.from_numpy(lengths[begin:begin + 256]))
                rows.append((output @ model.item_embedding.weight.T).numpy())
            scores[split] = in_ur4rec_order(np.concatenate(rows), lookup)
    np.savez(data_dir / "scores.npz", **scores)
    return {
        "seconds_per_epoch": seconds,
        "fit_seconds": fit_seconds,
        "epochs_run": len(seconds),
        "best_epoch": best["epoch"],
        "valid_recbole_protocol": {key: float(value) for key, value in dict(best_result).items()},
        "log": log,
    }


SPLIT_NAME = "ur4rec-split"


def check_split(dataset, valid_data, test_data, histories) -> None:
    """Stop unless RecBole's leave-one-out holds out UR4Rec's validation and test item of every
    user (otherwise RecBole would train on UR4Rec's test items)."""
    for split, data in (("valid", valid_data), ("test", test_data)):
        feat = data.dataset.inter_feat
        users = dataset.id2token(dataset.uid_field, feat[dataset.uid_field].numpy()).astype(np.int64)
        items = dataset.id2token(dataset.iid_field, feat[dataset.iid_field].numpy()).astype(np.int64)
        expected = histories[f"{split}_targets"]
        if len(users) != len(expected) or not np.array_equal(items, expected[users]):
            sys.exit(f"RecBole's {split} items differ from UR4Rec's split ({len(users)} users against "
                     f"{len(expected)}): the comparison would not be on the same data")


def recbole_ids(n_items: int, token_to_id: dict) -> np.ndarray:
    """(n_items + 1,) RecBole's internal id of each UR4Rec item id (tokens are UR4Rec's ids as
    text); 0 (padding, and any item RecBole never saw) maps to RecBole's padding id 0."""
    lookup = np.zeros(n_items + 1, dtype=np.int64)
    for item in range(1, n_items + 1):
        lookup[item] = token_to_id.get(str(item), 0)
    return lookup


def right_padded(left_padded: np.ndarray, lookup: np.ndarray) -> tuple:
    """UR4Rec's left-padded (U, L) histories as RecBole's right-padded item sequences and lengths."""
    item_seq = np.zeros_like(left_padded)
    lengths = np.zeros(len(left_padded), dtype=np.int64)
    for row, history in enumerate(left_padded):
        items = lookup[history[history > 0]]
        item_seq[row, : len(items)] = items
        lengths[row] = len(items)
    return item_seq, lengths


def in_ur4rec_order(scores: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """(U, n_items + 1) float32: column i is UR4Rec item i's score; the lowest finite float32 for
    padding and for items RecBole never saw (never ranked above an item it scored)."""
    ordered = np.full((len(scores), len(lookup)), np.finfo(np.float32).min, dtype=np.float32)
    known = lookup > 0
    ordered[:, known] = scores[:, lookup[known]]
    return ordered


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


if __name__ == "__main__":
    sys.exit(main())
