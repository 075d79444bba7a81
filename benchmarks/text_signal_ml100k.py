"""Does a side signal add anything to SASRec's ranking? A blend test, weights chosen on validation.

    .venv/bin/python benchmarks/text_signal_ml100k.py --run-dir RUN [--config C] [--set text.backend=json ...]

Takes the Stage-1 model of ``RUN`` and, for each signal below, ranks with
``z-score(SASRec scores) + lambda * z-score(signal)`` per user (full ranking, seen items
excluded, the evaluation harness's ranks), for lambda in a grid. The lambda is chosen on
validation NDCG@10 and its test NDCG@10 reported next to SASRec's own. If no lambda > 0 helps
on validation, the signal carries nothing SASRec lacks, whatever a model built on it does.

Signals (each a (user, item) score from what the model may see at that split):

* ``item text, last W``: mean cosine of the candidate's text feature to the texts of the
  user's last W history items (Sentence-BERT features of the run's text backend);
* ``user text``: cosine of the user's preference-text feature to the candidate's text;
* ``co-occurrence, last W`` (a collaborative reference, no content): mean cosine of
  item-item co-occurrence counts in the train parts between the candidate and the last W
  history items.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ur4rec.config import Config  # noqa: E402
from ur4rec.data import load_dataset  # noqa: E402
from ur4rec.evaluation import build_eval_inputs, sample_negatives  # noqa: E402
from ur4rec.evaluation.metrics import metrics_from_ranks, rank_of_target  # noqa: E402
from ur4rec.features import build_features  # noqa: E402
from ur4rec.rundir import stage_dir  # noqa: E402
from ur4rec.training.checkpoint import load_model  # noqa: E402

LAMBDAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


def standardise(scores: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """Per-row z-score over the items that take part in the ranking."""
    allowed = (~excluded).float()
    count = allowed.sum(1, keepdim=True)
    mean = (scores * allowed).sum(1, keepdim=True) / count
    std = (((scores - mean) ** 2 * allowed).sum(1, keepdim=True) / count).sqrt().clamp_min(1e-8)
    return (scores - mean) / std


def profile(similarity: torch.Tensor, histories: torch.Tensor, window: int) -> torch.Tensor:
    """(V, V) item similarity, (U, T) left-padded histories -> (U, V) mean similarity to the last W items."""
    recent = histories[:, -window:]  # (U, W)
    valid = (recent > 0).float()
    total = (similarity[recent] * valid[..., None]).sum(1)  # (U, V)
    return total / valid.sum(1, keepdim=True).clamp_min(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a run directory with a trained stage1/")
    parser.add_argument("--config", help="default: RUN/config.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. text.backend=json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    config = Config.load(args.config or run_dir / "config.yaml").override(["train.progress=false", *args.overrides])
    dataset = load_dataset(config.data)
    features = build_features(config, dataset, run_dir, progress=False)
    model, _ = load_model(stage_dir(run_dir, 1), fingerprint=dataset.fingerprint)
    model.eval()

    text = F.normalize(torch.from_numpy(np.asarray(features.item_text, dtype=np.float32)), dim=1)
    users_text = F.normalize(torch.from_numpy(np.asarray(features.user_text, dtype=np.float32)), dim=1)
    V = dataset.n_items + 1
    seen = torch.zeros(dataset.n_users, V)
    for user in range(dataset.n_users):
        seen[user, dataset.train_sequence(user)] = 1.0
    counts = seen.T @ seen  # (V, V) users who have both items in their train part
    norms = counts.diag().clamp_min(1.0).sqrt()
    cooccurrence = counts / (norms[:, None] * norms[None])
    cooccurrence.fill_diagonal_(0.0)
    item_text_similarity = text @ text.T

    negatives = sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
    results: dict[str, dict[str, list[float]]] = {}
    for split in ("valid", "test"):
        inputs = build_eval_inputs(dataset, split, config.data.max_len, negatives)
        with torch.no_grad():
            backbone = model.score_all(inputs.users, inputs.input_ids).float()
        excluded = torch.zeros_like(backbone, dtype=torch.bool)
        excluded[:, 0] = True
        excluded.scatter_(1, inputs.seen, True)
        excluded[torch.arange(len(backbone)), inputs.targets] = False
        signals = {f"item text, last {w}": profile(item_text_similarity, inputs.input_ids, w) for w in (5, 20)}
        signals["user text"] = users_text @ text.T
        signals.update({f"co-occurrence, last {w}": profile(cooccurrence, inputs.input_ids, w) for w in (5, 20)})
        base = standardise(backbone, excluded)
        for name, signal in signals.items():
            blended = [base + lam * standardise(signal, excluded) for lam in LAMBDAS]
            ndcg = [metrics_from_ranks(rank_of_target(z, z.gather(1, inputs.targets[:, None]).squeeze(1), excluded)
                                       .numpy(), [10])["ndcg@10"] for z in blended]
            results.setdefault(name, {})[split] = ndcg

    print(f"Stage 1 of {run_dir}; text backend {config.text.backend}; lambda grid {LAMBDAS}")
    print("| signal | best lambda (validation) | valid NDCG@10 SASRec -> blend | test NDCG@10 SASRec -> blend |")
    print("|---|---|---|---|")
    for name, splits in results.items():
        best = int(np.argmax(splits["valid"]))
        print(f"| {name} | {LAMBDAS[best]} | {splits['valid'][0]:.4f} -> {splits['valid'][best]:.4f} | "
              f"{splits['test'][0]:.4f} -> {splits['test'][best]:.4f} |")


if __name__ == "__main__":
    main()
