"""Feature quality: do the features know what users put together? (DESIGN section 2)

Per modality (item text, item image):

* **coverage**: fraction of items with a feature (mask True).
* **within-user vs random cosine**: for each user, the mean cosine over pairs of distinct
  covered items in their TRAIN part, averaged over users (each user counts once, like the
  evaluation metrics); against the mean cosine over all pairs of distinct covered items.
  ``lift_pct = (within / random - 1) * 100``. Both means are exact, via the identity
  ``sum_{i != j} v_i . v_j = |sum_i v_i|^2 - n`` for unit vectors, so no sampling and no seed.
  The lift is undefined (None) when the random mean is not positive.
* **genre agreement**: fraction of an item's k nearest neighbours (cosine, k=10) sharing at
  least one genre with it, averaged over items with genres; against the same fraction for
  uniformly random neighbours (computed exactly: the share of all other covered items that
  share a genre).
* **projection**: the first two principal components (numpy SVD), with the sign of each
  fixed so that repeated runs give the same picture.

For user texts, the cosine between a user's paragraph and their validation item's text
against a random item's shows whether the paragraphs point where the user goes next. This
is a diagnostic on held-out data; it feeds nothing back into training.
"""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ur4rec.data.dataset import SequenceDataset
from ur4rec.features.build import FeatureSet
from ur4rec.features.semantic import normalise_rows
from ur4rec.rundir import write_json
from ur4rec.text.prompts import display_genres

DEFAULT_K = 10
ROW_CHUNK = 1024  # rows of the similarity matrix computed at once: memory stays O(ROW_CHUNK * n_items)


def within_user_cosine(vectors: np.ndarray, mask: np.ndarray, dataset: SequenceDataset) -> float:
    """Mean over users (with 2+ distinct covered train items) of their mean pairwise cosine."""
    unit = normalise_rows(vectors)
    means = []
    for user in range(dataset.n_users):
        items = np.unique(dataset.train_sequence(user))
        items = items[mask[items]]
        n = len(items)
        if n >= 2:
            total = unit[items].sum(axis=0)
            means.append((float(total @ total) - n) / (n * (n - 1)))
    return float(np.mean(means)) if means else float("nan")


def random_pair_cosine(vectors: np.ndarray, mask: np.ndarray) -> float:
    """Mean cosine over all pairs of distinct covered items."""
    unit = normalise_rows(vectors[mask])
    n = len(unit)
    if n < 2:
        return float("nan")
    total = unit.sum(axis=0)
    return (float(total @ total) - n) / (n * (n - 1))


def genre_agreement(vectors: np.ndarray, mask: np.ndarray, dataset: SequenceDataset, k: int = DEFAULT_K) -> tuple[float, float]:
    """(k-NN genre agreement, random-neighbour genre agreement) over covered items with genres."""
    items = np.flatnonzero(mask)
    genre_names = sorted({genre for item in items for genre in display_genres(dataset.item_meta[item])})
    if len(items) <= k or not genre_names:
        return float("nan"), float("nan")
    column = {genre: index for index, genre in enumerate(genre_names)}
    genres = np.zeros((len(items), len(genre_names)), dtype=np.float32)  # (N, G) multi-hot
    for row, item in enumerate(items):
        for genre in display_genres(dataset.item_meta[item]):
            genres[row, column[genre]] = 1.0
    unit = normalise_rows(vectors[items])  # (N, D)
    anchors = np.flatnonzero(genres.sum(axis=1) > 0)
    knn, random = [], []
    for start in range(0, len(anchors), ROW_CHUNK):
        rows = anchors[start:start + ROW_CHUNK]
        similarity = unit[rows] @ unit.T  # (R, N)
        similarity[np.arange(len(rows)), rows] = -np.inf  # an item is not its own neighbour
        neighbours = np.argpartition(-similarity, k, axis=1)[:, :k]  # (R, k)
        shares = (genres[rows] @ genres.T) > 0  # (R, N) shares a genre
        knn.append(np.take_along_axis(shares, neighbours, axis=1).mean(axis=1))
        random.append((shares.sum(axis=1) - 1) / (len(items) - 1))  # minus the item itself
    return float(np.concatenate(knn).mean()), float(np.concatenate(random).mean())


def projection_2d(vectors: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(covered item ids, (N, 2) coordinates on the first two principal components)."""
    items = np.flatnonzero(mask)
    centred = vectors[items] - vectors[items].mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)  # (min(N, D), D)
    components = components[:2]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    return items, centred @ (components * signs[:, None]).T


def lift(within: float, random: float) -> float | None:
    return (within / random - 1) * 100 if random > 0 else None


def modality_quality(vectors: np.ndarray, mask: np.ndarray, dataset: SequenceDataset, k: int = DEFAULT_K) -> dict:
    within = within_user_cosine(vectors, mask, dataset)
    random = random_pair_cosine(vectors, mask)
    knn, random_neighbours = genre_agreement(vectors, mask, dataset, k)
    return {
        "coverage": float(mask[1:].mean()),
        "items": int(mask.sum()),
        "dim": int(vectors.shape[1]),
        "within_user_cosine": within,
        "random_pair_cosine": random,
        "lift_pct": lift(within, random),
        "genre_agreement_knn": knn,
        "genre_agreement_random": random_neighbours,
        "k": k,
    }


def user_text_alignment(features: FeatureSet, dataset: SequenceDataset) -> dict:
    """Cosine of each user's paragraph with their validation item's text vs with a random item's."""
    users = np.flatnonzero(features.user_text_mask)
    targets = dataset.target("valid")[users]
    users, targets = users[features.item_text_mask[targets]], targets[features.item_text_mask[targets]]
    user_unit = normalise_rows(features.user_text[users])
    item_unit = normalise_rows(features.item_text)
    to_target = float(np.mean(np.sum(user_unit * item_unit[targets], axis=1))) if len(users) else float("nan")
    mean_item = item_unit[features.item_text_mask].mean(axis=0)  # exact mean over a uniformly random item
    to_random = float(np.mean(user_unit @ mean_item)) if len(users) else float("nan")
    return {
        "coverage": float(features.user_text_mask.mean()),
        "user_to_valid_item_cosine": to_target,
        "user_to_random_item_cosine": to_random,
        "lift_pct": lift(to_target, to_random),
    }


def feature_quality(features: FeatureSet, dataset: SequenceDataset, k: int = DEFAULT_K) -> dict:
    modalities = {"text": modality_quality(features.item_text, features.item_text_mask, dataset, k)}
    if features.item_image is not None:
        modalities["image"] = modality_quality(features.item_image, features.item_image_mask, dataset, k)
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "fingerprint": dataset.fingerprint,
        "modalities": modalities,
        "user_text": user_text_alignment(features, dataset),
    }


def write_quality(run_dir: Path, features: FeatureSet, dataset: SequenceDataset, k: int = DEFAULT_K) -> dict:
    """``RUN/features/quality.json`` and ``RUN/features/projection.csv`` (item_id,modality,x,y,genre)."""
    folder = Path(run_dir) / "features"
    folder.mkdir(parents=True, exist_ok=True)
    quality = feature_quality(features, dataset, k)
    write_json(folder / "quality.json", quality)
    modalities = {"text": (features.item_text, features.item_text_mask)}
    if features.item_image is not None:
        modalities["image"] = (features.item_image, features.item_image_mask)
    with open(folder / "projection.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item_id", "modality", "x", "y", "genre"])
        for modality, (vectors, mask) in modalities.items():
            items, coordinates = projection_2d(vectors, mask)
            for item, (x, y) in zip(items, coordinates):
                genres = display_genres(dataset.item_meta[item])
                writer.writerow([dataset.item_raw_ids[item], modality, f"{x:.6f}", f"{y:.6f}", genres[0] if genres else ""])
    return quality


def format_quality(quality: dict) -> str:
    """The quality table as text: one row per modality."""
    header = f"{'modality':<8} {'coverage':>8} {'within':>8} {'random':>8} {'lift %':>8} {'kNN genre':>10} {'rand genre':>10}"
    lines = [header, "-" * len(header)]
    for name, row in quality["modalities"].items():
        lift_text = f"{row['lift_pct']:>8.1f}" if row["lift_pct"] is not None else f"{'n/a':>8}"
        lines.append(f"{name:<8} {row['coverage']:>8.1%} {row['within_user_cosine']:>8.4f} {row['random_pair_cosine']:>8.4f} "
                     f"{lift_text} {row['genre_agreement_knn']:>10.3f} {row['genre_agreement_random']:>10.3f}")
    user = quality["user_text"]
    user_lift = f"{user['lift_pct']:.1f}%" if user["lift_pct"] is not None else "n/a"
    lines.append(f"user texts: coverage {user['coverage']:.1%}, cosine to validation item "
                 f"{user['user_to_valid_item_cosine']:.4f} vs random item {user['user_to_random_item_cosine']:.4f} "
                 f"(lift {user_lift})")
    return "\n".join(lines)
