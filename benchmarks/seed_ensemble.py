"""What averaging independently trained Stage-1 models would buy: an upper reference, not a mode.

    .venv/bin/python benchmarks/seed_ensemble.py RUN0/stage1 RUN1/stage1 ... [--sizes 2,3,4,6,12]

Each Stage-1 directory is one SASRec trained to early stopping (one seed each, same config and
data). For each ensemble size k, the directories are cut into consecutive groups of k, each
group's log-softmax scores (over the items full ranking considers) are averaged, and the
group's validation and test metrics (full ranking, seen items excluded) are averaged over the
groups. Every member was chosen on validation alone; nothing here is chosen on test. An
ensemble of k costs k times the training and evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ur4rec.config import Config  # noqa: E402
from ur4rec.data import load_dataset  # noqa: E402
from ur4rec.evaluation import build_eval_inputs, sample_negatives  # noqa: E402
from ur4rec.evaluation.evaluate import excluded_items  # noqa: E402
from ur4rec.evaluation.metrics import metrics_from_ranks, rank_of_target  # noqa: E402
from ur4rec.training.checkpoint import load_model, read_checkpoint_info  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage_dirs", nargs="+", type=Path, help="Stage-1 directories, one per seed")
    parser.add_argument("--sizes", default="1,2,3,4,6,12", help="ensemble sizes k (those above the count are skipped)")
    args = parser.parse_args()
    info = read_checkpoint_info(args.stage_dirs[0])
    config = Config.from_dict(info["config"], source=str(args.stage_dirs[0] / "checkpoint.json"))
    dataset = load_dataset(config.data)
    negatives = sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
    models = [load_model(directory, dataset.fingerprint)[0].eval() for directory in args.stage_dirs]
    sizes = [int(k) for k in args.sizes.split(",") if int(k) <= len(models)]
    print(f"{len(models)} Stage-1 models from {args.stage_dirs[0].parent.parent}/...; full ranking, seen items excluded")
    print("| k | groups | valid NDCG@10 | valid HR@10 | test NDCG@10 | test HR@10 |")
    print("|---|---|---|---|---|---|")
    results = {k: {} for k in sizes}
    for split in ("valid", "test"):
        inputs = build_eval_inputs(dataset, split, config.data.max_len, negatives)
        excluded = excluded_items(inputs, slice(None), dataset.n_items + 1, config.eval.exclude_seen, inputs.targets)
        with torch.no_grad():
            scores = [torch.log_softmax(model.score_all(inputs.users, inputs.input_ids).float()
                                        .masked_fill(excluded, float("-inf")), dim=1) for model in models]
        for k in sizes:
            group_metrics = []
            for start in range(0, len(scores) - k + 1, k):
                mean = torch.stack(scores[start : start + k]).mean(0)
                ranks = rank_of_target(mean, mean.gather(1, inputs.targets[:, None]).squeeze(1), excluded)
                group_metrics.append(metrics_from_ranks(ranks.numpy()))
            results[k][split] = {name: float(np.mean([m[name] for m in group_metrics])) for name in ("ndcg@10", "hr@10")}
            results[k]["groups"] = len(group_metrics)
    for k in sizes:
        r = results[k]
        print(f"| {k} | {r['groups']} | {r['valid']['ndcg@10']:.4f} | {r['valid']['hr@10']:.4f} "
              f"| {r['test']['ndcg@10']:.4f} | {r['test']['hr@10']:.4f} |")


if __name__ == "__main__":
    main()
