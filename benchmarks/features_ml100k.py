"""Text features on MovieLens-100K: encoding speed, feature quality and leakage, per text source.

    .venv/bin/python benchmarks/features_ml100k.py [--llm-texts ../shared/data/ml100k_llm] [--threads 0]

Two text sources: the offline ``template`` backend, and LLM texts generated elsewhere and
imported through the ``json`` backend (``--llm-texts``: a folder with user_preferences.json
and item_descriptions.json keyed by raw MovieLens ids). For each, from an empty feature
store: generate or import the texts, audit user texts for held-out titles, encode every item
(1,682) and every user text with all-MiniLM-L6-v2, and measure quality (lift of within-user
over random cosine, k-NN genre agreement, user-text to validation-item cosine).
Target: all ML-100K text features (items + users) in 30 s or less on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ur4rec.config import Config  # noqa: E402
from ur4rec.data import load_dataset  # noqa: E402
from ur4rec.features import build_text_features, load_features  # noqa: E402
from ur4rec.features.quality import feature_quality  # noqa: E402
from ur4rec.rundir import prepare_run  # noqa: E402
from ur4rec.text import audit_user_texts, read_texts, texts_dir  # noqa: E402
from ur4rec.text.json_backend import item_title_agreement  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-texts", type=Path, default=ROOT / ".." / "shared" / "data" / "ml100k_llm",
                        help="folder of pregenerated user_preferences.json and item_descriptions.json")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="encoder autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    sources = {"template": []}
    if args.llm_texts.is_dir():
        sources["llm (json)"] = ["text.backend=json", f"text.folder={args.llm_texts.resolve()}"]
    else:
        print(f"no LLM texts at {args.llm_texts}: benchmarking the template backend only")

    with tempfile.TemporaryDirectory() as scratch:
        os.environ["UR4REC_CACHE"] = str(Path(scratch) / "cache")  # an empty store: everything is encoded
        dataset = load_dataset(Config().data)
        print(f"{dataset.name}: {dataset.n_users} users, {dataset.n_items} items; torch threads "
              f"{torch.get_num_threads()}, precision {args.precision}, CPU {os.cpu_count()} cores\n")
        started = time.perf_counter()
        import sentence_transformers  # noqa: F401  (timed apart: a one-off cost per process)

        import_seconds = time.perf_counter() - started
        results = {}
        for name, overrides in sources.items():
            config = Config().override(overrides + ["train.progress=false", f"features.precision={args.precision}"])
            run_dir = prepare_run(Path(scratch) / name.split()[0], config, dataset)
            started = time.perf_counter()
            entry = build_text_features(config, dataset, run_dir, progress=False)
            total = time.perf_counter() - started
            users, items = read_texts(texts_dir(run_dir))
            results[name] = {
                "entry": entry,
                "total": total,
                "quality": feature_quality(load_features(run_dir, dataset), dataset),
                "audit": audit_user_texts(users, dataset).counts(),
                "title_agreement": item_title_agreement(items, dataset),
            }

    print(f"import sentence_transformers: {import_seconds:.1f} s (once per process, not in the totals)")
    print(f"{'source':<12} {'load s':>7} {'items s':>8} {'items/s':>8} {'users':>6} {'users s':>8} "
          f"{'users/s':>8} {'total s':>8}")
    for name, result in results.items():
        seconds, coverage = result["entry"]["seconds"], result["entry"]["coverage"]
        n_user_texts = round(coverage["user_text"] * dataset.n_users)
        print(f"{name:<12} {seconds['load_model']:>7.2f} {seconds['items']:>8.2f} "
              f"{dataset.n_items / seconds['items']:>8.0f} {n_user_texts:>6} {seconds['users']:>8.2f} "
              f"{n_user_texts / seconds['users']:>8.0f} {result['total']:>8.2f}")
    print("total s = texts + audit + model load + encoding + store, from an empty feature store; target <= 30 s\n")

    print("quality (item text features; k = 10)")
    print(f"{'source':<12} {'descr.':>7} {'within':>7} {'random':>7} {'lift %':>7} {'kNN genre':>10} "
          f"{'rand genre':>10} {'user->valid':>12} {'user->rand':>11} {'lift %':>7}")
    for name, result in results.items():
        text, user = result["quality"]["modalities"]["text"], result["quality"]["user_text"]
        print(f"{name:<12} {result['entry']['coverage']['item_description']:>7.1%} "
              f"{text['within_user_cosine']:>7.4f} {text['random_pair_cosine']:>7.4f} {text['lift_pct']:>7.1f} "
              f"{text['genre_agreement_knn']:>10.3f} {text['genre_agreement_random']:>10.3f} "
              f"{user['user_to_valid_item_cosine']:>12.4f} {user['user_to_random_item_cosine']:>11.4f} "
              f"{user['lift_pct']:>7.1f}")
    print("descr. = items with a generated/imported description (others use 'Title (year). Genres.')\n")

    print("leakage audit (user texts naming the user's own held-out item)")
    print(f"{'source':<12} {'texts':>6} {'valid':>6} {'test':>6} {'either':>7} {'%':>6} {'too generic':>12} "
          f"{'in train':>9} {'item ids ok':>12}")
    for name, result in results.items():
        audit = result["audit"]
        print(f"{name:<12} {audit['user_texts']:>6} {audit['names_valid_item']:>6} {audit['names_test_item']:>6} "
              f"{audit['names_either']:>7} {audit['names_either'] / max(audit['user_texts'], 1):>6.1%} "
              f"{audit['unauditable_held_out_titles']:>12} {audit['held_out_titles_also_in_train']:>9} "
              f"{result['title_agreement']:>12.1%}")
    print("too generic = held-out titles the audit cannot look for (one word under 4 letters); in train = held-out\n"
          "titles that are also a train item's title (duplicate ids), not counted; item ids ok = descriptions\n"
          "naming their own item's title (checks that the file's ids are this dataset's raw ids)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
