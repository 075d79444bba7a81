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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs to time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--evaluate", action="store_true", help="also run RecBole's validation once")
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
    data_path = Path(recbole.__file__).parent / "dataset_example"
    if not (data_path / "ml-100k" / "ml-100k.inter").exists():
        sys.exit(f"{data_path}/ml-100k/ml-100k.inter is missing from the recbole wheel")

    here = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)  # RecBole's Trainer writes log_tensorboard/ into the working directory
        try:
            config = Config(model="SASRec", dataset="ml-100k", config_dict={
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
                "epochs": args.epochs,
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
            train_data, valid_data, _ = data_preparation(config, dataset)
            model = SASRec(config, train_data.dataset).to(config["device"])
            trainer = Trainer(config, model)
            seconds, losses = [], []
            for epoch in range(args.epochs):
                start = time.perf_counter()
                loss = trainer._train_epoch(train_data, epoch, show_progress=False)
                seconds.append(time.perf_counter() - start)
                losses.append(float(loss if not isinstance(loss, tuple) else sum(loss)))
                print(f"recbole SASRec epoch {epoch + 1}: {seconds[-1]:.1f} s, loss {losses[-1]:.4f}",
                      file=sys.stderr, flush=True)
            result = {
                "peer": "RecBole 1.2.1 SASRec (CE)",
                "threads": args.threads,
                "train_samples": len(train_data.dataset),
                "seconds_per_epoch": seconds,
                "train_loss": losses,
                "torch": torch.__version__,
                "cpu": _cpu_name(),
            }
            if args.evaluate:
                start = time.perf_counter()
                result["valid_recbole_protocol"] = dict(trainer.evaluate(valid_data, load_best_model=False))
                result["evaluate_seconds"] = time.perf_counter() - start
        finally:
            os.chdir(here)
    print(json.dumps(result))
    return 0


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
