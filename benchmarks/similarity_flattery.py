"""How much fitting the history-similarity weights on the validation users flatters their figure.

    .venv/bin/python benchmarks/similarity_flattery.py RUN/stage3 [RUN/ablations/full/stage2 ...]

Stages 2-3 fit their similarity weights (`ur4rec.training.stages.fit_similarity`) on every
validation user, so a user's validation rank uses weights its own target helped to fit; valid-oh
(`ur4rec compare`) removes the choice of epoch but not this. For each saved Stage-2/3 directory,
this script holds the checkpoint's other weights fixed and, over 50 random halvings of the users,
fits the weights on one half and reads NDCG@10 (full ranking) on the other half, against the
weights fitted on all users read on the same half. The mean difference is the flattery. Test is
not touched.
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
from ur4rec.evaluation.metrics import per_user, rank_of_target  # noqa: E402
from ur4rec.features import load_features  # noqa: E402
from ur4rec.training.checkpoint import read_checkpoint_info  # noqa: E402
from ur4rec.training.stages import fit_similarity_weights, load_stage_model, similarity_fit_inputs  # noqa: E402


def ndcg_at_10(base: torch.Tensor, terms: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> np.ndarray:
    """(N,) each user's NDCG@10 with ``weight`` (excluded items are -inf in ``base``)."""
    scores = base + torch.einsum("k,bkv->bv", weight, terms)
    ranks = rank_of_target(scores, scores.gather(1, targets[:, None]).squeeze(1))
    return per_user(ranks.numpy(), "ndcg@10")


def flattery(stage_directory: Path, halvings: int = 50, seed: int = 0) -> dict:
    info = read_checkpoint_info(stage_directory)
    config = Config.from_dict(info["config"], source=str(stage_directory / "checkpoint.json"))
    dataset = load_dataset(config.data)
    model, _ = load_stage_model(stage_directory, load_features(stage_directory.parent, dataset), dataset)
    model.eval()
    if not hasattr(model, "similarity"):
        raise SystemExit(f"{stage_directory}: this model has no similarity terms (moe.similarity is empty)")
    negatives = sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
    inputs = build_eval_inputs(dataset, "valid", config.data.max_len, negatives)
    base, terms, targets = similarity_fit_inputs(model, inputs, config, torch.arange(len(inputs.users)))
    zero = torch.zeros_like(model.similarity.weight.detach().float())
    fitted_all = fit_similarity_weights(base, terms, targets, model.similarity.weight)
    on_all = ndcg_at_10(base, terms, targets, fitted_all)
    rng = np.random.default_rng(seed)
    users = len(targets)
    differences, half_weights = [], []
    for _ in range(halvings):
        order = rng.permutation(users)
        fit_half, read_half = torch.from_numpy(order[: users // 2]), torch.from_numpy(order[users // 2 :])
        weight = fit_similarity_weights(base[fit_half], terms[fit_half], targets[fit_half], zero)
        half_weights.append(weight.numpy())
        out_of_half = ndcg_at_10(base[read_half], terms[read_half], targets[read_half], weight)
        differences.append(on_all[read_half.numpy()].mean() - out_of_half.mean())
    return {"weights": dict(zip(model.similarity.sources, fitted_all.tolist())),
            "half_weight_std": np.std(half_weights, axis=0).tolist(),
            "ndcg_without": float(ndcg_at_10(base, terms, targets, zero).mean()),
            "ndcg_fitted": float(on_all.mean()),
            "flattery": float(np.mean(differences)), "flattery_std": float(np.std(differences))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage_dirs", nargs="+", type=Path, help="Stage-2/3 directories (RUN/stageN)")
    parser.add_argument("--halvings", type=int, default=50)
    args = parser.parse_args()
    print("| stage directory | weights (fitted on all) | valid NDCG@10 without terms | with terms | flattery (± std over halvings) |")
    print("|---|---|---|---|---|")
    values = []
    for stage_directory in args.stage_dirs:
        result = flattery(stage_directory, args.halvings)
        values.append(result["flattery"])
        weights = ", ".join(f"{name} {value:.2f}" for name, value in result["weights"].items())
        print(f"| {stage_directory} | {weights} | {result['ndcg_without']:.4f} | {result['ndcg_fitted']:.4f} "
              f"| {result['flattery']:+.4f} ± {result['flattery_std']:.4f} |", flush=True)
    if len(values) > 1:
        print(f"\nmean flattery over {len(values)} directories: {np.mean(values):+.4f} "
              f"(standard error {np.std(values, ddof=1) / np.sqrt(len(values)):.4f})")


if __name__ == "__main__":
    main()
