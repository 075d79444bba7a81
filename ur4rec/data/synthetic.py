"""A synthetic dataset with planted sequential structure, generated in-process.

Items lie on a hidden cycle (a random permutation). Each user starts at a random item and
walks: with probability ``1 - noise`` the next item is the successor of the current one on
the cycle, otherwise a uniformly random item. A sequential model that learns "successor of
the last item" ranks the target first most of the time; popularity cannot, because every
item is about equally popular. Genres are contiguous arcs of the cycle, so item metadata
carries signal too. Deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np

from ur4rec.data.movielens import ItemMeta, RawInteractions

SYNTHETIC_GENRES = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta"]


def make_synthetic(
    n_users: int = 300, n_items: int = 200, mean_length: int = 30, noise: float = 0.1, seed: int = 0
) -> RawInteractions:
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(n_items) + 1  # raw item ids 1..n_items in cycle order
    successor = np.empty(n_items + 1, dtype=np.int64)
    successor[cycle] = np.roll(cycle, -1)
    position = np.empty(n_items + 1, dtype=np.int64)
    position[cycle] = np.arange(n_items)

    users, items, stamps = [], [], []
    for user in range(1, n_users + 1):
        length = max(5, int(rng.poisson(mean_length)))
        item = int(rng.integers(1, n_items + 1))
        for step in range(length):
            users.append(str(user))
            items.append(str(item))
            stamps.append(1_000_000 + 60 * step)
            item = int(successor[item]) if rng.random() >= noise else int(rng.integers(1, n_items + 1))

    arc = max(1, n_items // len(SYNTHETIC_GENRES))
    meta = {}
    for item in range(1, n_items + 1):
        genre = SYNTHETIC_GENRES[min(position[item] // arc, len(SYNTHETIC_GENRES) - 1)]
        meta[str(item)] = ItemMeta(title=f"Item {item}", year=1950 + int(position[item]) % 50, genres=[genre])
    return RawInteractions(
        name="synthetic",
        source=f"synthetic(users={n_users}, items={n_items}, length={mean_length}, noise={noise}, seed={seed})",
        users=np.array(users),
        items=np.array(items),
        timestamps=np.array(stamps, dtype=np.int64),
        item_meta=meta,
    )
