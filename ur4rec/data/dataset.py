"""Sequence dataset: ids, the leave-one-out split by time, and a fingerprint.

Split rule (DESIGN section 2): per user, interactions are ordered by timestamp; equal
timestamps are ordered by a hash of the raw (user id, item id) pair (:func:`tie_break_keys`),
so the split depends neither on the order of lines in the file nor on how items are numbered.
The last item is the test target, the one before it the validation target, the rest is the
train part. Users with fewer than ``min_interactions`` interactions are dropped. Item id 0 is
padding; items are numbered 1..n_items in the order of their raw ids. Each sequence keeps its
timestamps, so training can tell which items are tied.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ur4rec.data.movielens import ItemMeta, RawInteractions

SPLIT_RULE = (
    "leave-one-out by time: per user, order by (timestamp, blake2b-64 of 'raw user id<TAB>raw item id'); "
    "last = test, second last = validation, rest = train"
)


@dataclass
class SequenceDataset:
    name: str
    source: str
    user_raw_ids: np.ndarray  # (n_users,) raw id of internal user u
    item_raw_ids: np.ndarray  # (n_items + 1,) raw id of internal item i; index 0 = padding
    sequences: list[np.ndarray]  # per user, all internal item ids in time order
    item_meta: list[ItemMeta]  # (n_items + 1,) metadata; index 0 = padding
    min_interactions: int = 3
    fingerprint: str = field(default="")
    timestamps: list[np.ndarray] | None = None  # per user, the timestamp of each item of ``sequences``

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = _fingerprint(self)

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_items(self) -> int:
        return len(self.item_raw_ids) - 1

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def train_sequence(self, user: int) -> np.ndarray:
        return self.sequences[user][:-2]

    def train_timestamps(self, user: int) -> np.ndarray | None:
        """Timestamps of ``train_sequence(user)``, or None when the dataset has none."""
        return None if self.timestamps is None else self.timestamps[user][:-2]

    def history(self, user: int, split: str) -> np.ndarray:
        """Items the model may see when predicting ``split`` ('valid' or 'test')."""
        return self.sequences[user][:-2] if split == "valid" else self.sequences[user][:-1]

    def target(self, split: str) -> np.ndarray:
        """(n_users,) held-out item of each user for 'valid' or 'test'."""
        offset = -2 if split == "valid" else -1
        return np.array([s[offset] for s in self.sequences], dtype=np.int64)

    def train_item_counts(self) -> np.ndarray:
        """(n_items + 1,) interactions of each item in the train parts (index 0 = 0)."""
        items = np.concatenate([self.train_sequence(u) for u in range(self.n_users)])
        return np.bincount(items, minlength=self.n_items + 1)

    def stats(self) -> dict:
        lengths = np.array([len(s) for s in self.sequences])
        percentiles = {f"p{p}": float(np.percentile(lengths, p)) for p in (5, 25, 50, 75, 95, 100)}
        return {
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "train_interactions": int(sum(len(s) - 2 for s in self.sequences)),
            "density": self.n_interactions / (self.n_users * self.n_items),
            "sequence_length": {"mean": float(lengths.mean()), "min": int(lengths.min()), **percentiles},
        }

    def summary(self) -> dict:
        """What ``RUN/data.json`` holds."""
        return {
            "name": self.name,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "split": SPLIT_RULE,
            "min_interactions": self.min_interactions,
            **self.stats(),
        }


def _sort_key(raw_ids: np.ndarray) -> np.ndarray:
    """Numeric order for integer-like raw ids, string order otherwise (also for integers beyond
    64 bits, which numpy refuses with OverflowError)."""
    try:
        return raw_ids.astype(np.int64)
    except (ValueError, OverflowError):
        return raw_ids


def tie_break_keys(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(N,) uint64 keys that order interactions sharing a user and a timestamp.

    The key is the 64-bit blake2b digest of ``"<raw user id>\t<raw item id>"``: stable across
    files, formats and machines, and unrelated to the item's id. Ordering ties by item id
    instead put the higher id last, and on ML-100K high ids are the rarely rated items: 44% of
    users have validation and test items with the same timestamp, and under that rule the
    test targets had 16% fewer train interactions on average than the validation targets
    (README, Data), so validation and test were not drawn alike.
    """
    pairs = np.char.add(np.char.add(users.astype(str), "\t"), items.astype(str))
    unique, inverse = np.unique(pairs, return_inverse=True)
    digests = [int.from_bytes(hashlib.blake2b(pair.encode(), digest_size=8).digest(), "little") for pair in unique]
    return np.array(digests, dtype=np.uint64)[inverse.reshape(-1)]


def build_dataset(raw: RawInteractions, min_interactions: int = 3) -> SequenceDataset:
    """Number users and items, order each user's interactions, and apply the filter."""
    if min_interactions < 3:
        raise ValueError("min_interactions must be at least 3: leave-one-out needs train, valid and test")
    # Keep only users with enough interactions; items are those the kept users touched.
    user_values, user_index, user_counts = np.unique(raw.users, return_inverse=True, return_counts=True)
    keep = user_counts[user_index] >= min_interactions
    users, items, stamps = raw.users[keep], raw.items[keep], raw.timestamps[keep]
    if len(users) == 0:
        raise ValueError(f"{raw.name} ({raw.source}): no user has {min_interactions} or more interactions "
                         "(data.min_interactions)")

    item_values = np.unique(items)
    item_values = item_values[np.argsort(_sort_key(item_values), kind="stable")]
    item_lookup = {value: index + 1 for index, value in enumerate(item_values)}
    item_ids = np.array([item_lookup[v] for v in items], dtype=np.int64)

    user_values = np.unique(users)
    user_values = user_values[np.argsort(_sort_key(user_values), kind="stable")]
    user_lookup = {value: index for index, value in enumerate(user_values)}
    user_ids = np.array([user_lookup[v] for v in users], dtype=np.int64)

    # Order by user, then timestamp, then the tie-break hash (then item id, for repeated pairs).
    order = np.lexsort((item_ids, tie_break_keys(users, items), stamps, user_ids))
    user_ids, item_ids = user_ids[order], item_ids[order]
    boundaries = np.flatnonzero(np.diff(user_ids)) + 1
    sequences = np.split(item_ids, boundaries)
    timestamps = np.split(stamps[order].astype(np.int64), boundaries)

    meta = [ItemMeta(title="[padding]")]
    for value in item_values:
        meta.append(raw.item_meta.get(value, ItemMeta(title=f"item {value}")))
    return SequenceDataset(
        name=raw.name,
        source=raw.source,
        user_raw_ids=user_values,
        item_raw_ids=np.concatenate([[""], item_values]).astype(str),
        sequences=sequences,
        item_meta=meta,
        min_interactions=min_interactions,
        timestamps=timestamps,
    )


def _fingerprint(dataset: SequenceDataset) -> str:
    """sha256 of the ids, ordered sequences and timestamps: equal whichever file format they
    came from. Timestamps count because training reorders items that share one."""
    digest = hashlib.sha256()
    digest.update(json.dumps([dataset.name, SPLIT_RULE, dataset.min_interactions]).encode())
    digest.update("\x00".join(map(str, dataset.user_raw_ids)).encode())
    digest.update("\x00".join(map(str, dataset.item_raw_ids)).encode())
    for sequence in dataset.sequences:
        digest.update(np.asarray(sequence, dtype=np.int64).tobytes())
        digest.update(b"|")
    for stamps in dataset.timestamps or []:
        digest.update(np.asarray(stamps, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]
