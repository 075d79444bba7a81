"""How the tie-break for equal timestamps shapes the leave-one-out split of MovieLens.

    .venv/bin/python benchmarks/split_ties_ml100k.py [--dataset ml-100k] [--path FOLDER]

For each rule that orders a user's interactions with the same timestamp (item id, line order
of the file, and the pair hash UR4Rec uses), prints how often the validation and test items
share a timestamp and how many train interactions the validation and test targets have
(mean and median). A rule under which the two columns differ a lot makes validation a poor
guide to test. Reads data only; trains nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ur4rec.data import load_movielens  # noqa: E402
from ur4rec.data.dataset import _sort_key, tie_break_keys  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--path", default=None)
    args = parser.parse_args()
    raw = load_movielens(args.dataset, args.path)
    users = np.unique(raw.users, return_inverse=True)[1].reshape(-1)
    item_values, items = np.unique(raw.items, return_inverse=True)
    items = items.reshape(-1)
    id_rank = np.argsort(np.argsort(_sort_key(item_values), kind="stable"))  # numeric order of raw ids
    rules = {
        "item id": id_rank[items],
        "file line order": np.arange(len(users)),
        "pair hash (UR4Rec)": tie_break_keys(raw.users, raw.items),
    }
    print(f"{raw.name}: {len(users)} interactions from {raw.source}")
    print(f"{'tie-break':<20} {'valid/test tied':>15} {'valid target train count':>26} {'test target train count':>25}")
    for name, key in rules.items():
        order = np.lexsort((key, raw.timestamps, users))
        u, i, t = users[order], items[order], raw.timestamps[order]
        bounds = np.flatnonzero(np.diff(u)) + 1
        sequences, stamps = np.split(i, bounds), np.split(t, bounds)
        kept = [n for n, s in enumerate(sequences) if len(s) >= 3]
        counts = np.bincount(np.concatenate([sequences[n][:-2] for n in kept]), minlength=items.max() + 1)
        valid = np.array([counts[sequences[n][-2]] for n in kept])
        test = np.array([counts[sequences[n][-1]] for n in kept])
        tied = np.mean([stamps[n][-1] == stamps[n][-2] for n in kept])
        print(f"{name:<20} {tied:>15.1%} {f'mean {valid.mean():.1f}, median {np.median(valid):.0f}':>26} "
              f"{f'mean {test.mean():.1f}, median {np.median(test):.0f}':>25}")


if __name__ == "__main__":
    main()
