"""Local dynamic memory: what each user's history holds, in two tiers (DESIGN section 3).

* **Short-term**: the last ``W`` items of the user's train sequence (a FIFO).
* **Long-term**: an item is written only when it is novel enough,
  ``novelty = 1 - max cosine(item, stored entries) > threshold``, on the combined
  L2-normalised text + visual feature. A non-novel item counts as an access of its most
  similar entry instead. When the store is full, the entry with the lowest combined
  recency-frequency value is evicted: LRFU's ``CRF(t) = sum over accesses 2^(-(t - t_a) / h)``
  (Lee et al., "LRFU: a spectrum of policies that subsumes the least recently used and least
  frequently used policies", IEEE Trans. Computers 2001), with half-life ``h`` in steps.
  An item with no feature at all is compared by identity: novel unless the same item is stored.

The long-term tier is built from the **train part only** (``dataset.train_sequence(u)``), so
nothing of a user's validation or test items reaches it. Every row reads the memory **as of its
target**: the short-term tier from its own input, the last W items before the target
(:class:`MemoryReader`), and the long-term tier from a snapshot taken just before the target's
train position. A snapshot depends only on the items before that position. Filtering the
end-of-train memory by write time instead is not the same: which early entries survive
eviction depends on later accesses, the training target's own among them, so training rows
would see entries picked for their similarity to the target, and nearly empty long-term
tiers besides, while evaluation rows see a full, unbiased one.

:func:`build_memory` is the pure function that turns every user's train sequence into the
padded long-term snapshots at every train position; :class:`LocalMemory` holds one user's
long-term tier with its write semantics;
:func:`read_entries` retrieves, for each (user, candidate item), the top-K visible entries most
relevant to the candidate (cosine on the content features; the model falls back to ID
embeddings for items without any); :class:`MemoryReader` is the model's ``memory`` group:
the memory tensors as buffers and a learned per-tier bias on the experts' attention logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def combined_item_features(features) -> np.ndarray:
    """(n_items + 1, D_text + D_image) L2-normalised text ++ image features; zero rows have neither.

    ``features`` is any object with the FeatureSet attributes (``item_text``, ``item_text_mask``,
    ``item_image`` and ``item_image_mask``, the last two possibly None).
    """
    parts = [_normalised(features.item_text, features.item_text_mask)]
    if features.item_image is not None:
        parts.append(_normalised(features.item_image, features.item_image_mask))
    combined = np.concatenate(parts, axis=1)
    norm = np.linalg.norm(combined, axis=1, keepdims=True)
    return (combined / np.maximum(norm, 1e-12)).astype(np.float32)


def _normalised(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32) * np.asarray(mask, dtype=bool)[:, None]
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)


@dataclass
class _Entry:
    item: int
    feature: np.ndarray
    written_at: int
    last_access: int
    crf: float  # LRFU combined recency-frequency value at ``last_access``


class LocalMemory:
    """One user's long-term tier: ``write`` every item in time order, read ``long_term``. (The
    short-term tier is no state: it is the last W items of a row's input, :class:`MemoryReader`.)"""

    def __init__(self, long_term_capacity: int, novelty_threshold: float, half_life: float = 20.0) -> None:
        if long_term_capacity < 0:
            raise ValueError("memory sizes must be >= 0")
        if half_life <= 0:
            raise ValueError(f"memory half-life must be > 0, got {half_life}")
        self.long_term_capacity = long_term_capacity
        self.novelty_threshold = novelty_threshold
        self.decay = 0.5 ** (1.0 / half_life)  # CRF factor per elapsed step
        self.long_term: list[_Entry] = []
        self.clock = 0

    def novelty(self, item: int, feature: np.ndarray) -> tuple[float, int | None]:
        """1 - max cosine to the long-term entries (1 when empty) and the most similar entry's index."""
        if not self.long_term:
            return 1.0, None
        if not feature.any():  # no feature: identity is the only similarity we have
            same = [i for i, entry in enumerate(self.long_term) if entry.item == item]
            return (0.0, same[0]) if same else (1.0, None)
        stored = np.stack([entry.feature for entry in self.long_term])  # (n, D)
        cosine = stored @ feature  # (n,) features are unit vectors or zero
        for i, entry in enumerate(self.long_term):
            if entry.item == item:  # the same item is never novel, even without a stored feature
                cosine[i] = 1.0
        best = int(np.argmax(cosine))
        return 1.0 - float(cosine[best]), best

    def write(self, item: int, feature: np.ndarray, time: int | None = None) -> bool:
        """Offer ``item`` to the long-term tier; return True when it was written."""
        now = self.clock if time is None else time
        self.clock = now + 1
        if self.long_term_capacity == 0:
            return False
        novelty, nearest = self.novelty(item, feature)
        if novelty <= self.novelty_threshold:  # not novel enough (a stored item never is): an access
            self._access(self.long_term[nearest], now)
            return False
        if len(self.long_term) >= self.long_term_capacity:
            self.long_term.pop(self._least_valuable(now))
        self.long_term.append(_Entry(item, feature, written_at=now, last_access=now, crf=1.0))
        return True

    def _access(self, entry: _Entry, now: int) -> None:
        entry.crf = 1.0 + entry.crf * self.decay ** (now - entry.last_access)
        entry.last_access = now

    def _least_valuable(self, now: int) -> int:
        """Index of the entry with the lowest CRF now; ties go to the least recently accessed."""
        values = [(entry.crf * self.decay ** (now - entry.last_access), entry.last_access)
                  for entry in self.long_term]
        return min(range(len(values)), key=values.__getitem__)


@dataclass
class UserMemory:
    """Every user's long-term tier at every train position (L = ``long_term_capacity``).

    Row ``offsets[u] + p`` holds user ``u``'s long-term entries after writing train items
    ``0..p-1``, i.e. the memory a target at train position ``p`` may read; row
    ``offsets[u + 1] - 1`` is the memory after the whole train part (evaluation).
    """

    items: torch.Tensor  # (P, L) item ids of the long-term entries, 0 = empty slot; P = sum(len_u + 1)
    offsets: torch.Tensor  # (n_users + 1,) first row of each user's snapshots

    @property
    def n_users(self) -> int:
        return self.offsets.numel() - 1

    def snapshot(self, user: int, position: int | None = None) -> list[int]:
        """User ``user``'s long-term items as of train position ``position`` (None = after the train part)."""
        start, stop = int(self.offsets[user]), int(self.offsets[user + 1])
        row = stop - 1 if position is None else start + min(position, stop - 1 - start)
        return [item for item in self.items[row].tolist() if item]


def build_memory(train_sequences: list[np.ndarray], item_features: np.ndarray, long_term_capacity: int,
                 novelty_threshold: float, half_life: float = 20.0) -> UserMemory:
    """Write every user's train sequence, in order, into a :class:`LocalMemory`, keeping the
    long-term tier as of every position (see :class:`UserMemory`).

    ``item_features``: (n_items + 1, D) from :func:`combined_item_features`.
    """
    lengths = np.array([len(sequence) for sequence in train_sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths + 1)])
    items = np.zeros((int(offsets[-1]), long_term_capacity), dtype=np.int64)
    for user, sequence in enumerate(train_sequences):
        memory = LocalMemory(long_term_capacity, novelty_threshold, half_life)
        row = offsets[user]
        for position, item in enumerate(sequence):
            memory.write(int(item), item_features[item], position)
            entries = [entry.item for entry in memory.long_term]
            items[row + position + 1, :len(entries)] = entries
    return UserMemory(torch.from_numpy(items), torch.from_numpy(offsets))


def empty_memory(n_users: int) -> UserMemory:
    """No long-term memory at all (``moe.memory: false``): L = 0."""
    return UserMemory(torch.zeros(n_users, 0, dtype=torch.int64), torch.arange(n_users + 1))


def pair_table(table: torch.Tensor, candidate_index: torch.Tensor | None, memory_index: torch.Tensor) -> torch.Tensor:
    """(u_c, u_m) table over distinct candidates x distinct entries -> (N, C, M) at every row's slots.

    ``candidate_index`` (N, C) into the distinct candidates, or None when every row shares them
    (then each row's M columns are copied as contiguous rows of the transposed table);
    ``memory_index`` (N, M) into the distinct entries.
    """
    if candidate_index is None:
        return table.T.contiguous()[memory_index].transpose(1, 2)  # (N, M, C) -> (N, C, M) view
    flat = candidate_index[:, :, None] * table.size(1) + memory_index[:, None, :]  # (N, C, M)
    return table.reshape(-1).take(flat)


@dataclass
class MemoryReads:
    """The K memory entries each (row, candidate) reads, as indices into the batch's distinct tables."""

    candidate_index: torch.Tensor | None  # (N, C) into the distinct candidates; None = shared by all rows
    entries: torch.Tensor  # (N, C, K) into the distinct memory entries (u_m,)
    slots: torch.Tensor  # (N, C, K) position of the entry among the row's M memory slots
    valid: torch.Tensor  # (N, C, K) bool: a visible, retrieved entry
    bias: torch.Tensor  # (N, C, K) the entry's memory-tier logit bias
    novelty: torch.Tensor  # (N, C) 1 - max relevance of the candidate to the visible memory (1 if empty)
    n_entries: int  # u_m

    def gather(self, table: torch.Tensor) -> torch.Tensor:
        """(T, u_c, u_m) tables -> (T, N, C, K): every table's value at each read (candidate, entry).

        Table-major, so that the experts' softmax over the K entries runs along the last,
        contiguous axis and the tables (stacked matrix products) need no transposing copy.
        """
        C = self.entries.size(1)
        candidates = self.candidate_index if self.candidate_index is not None else \
            torch.arange(C, device=self.entries.device)[None]  # (N|1, C)
        flat = candidates[:, :, None] * self.n_entries + self.entries  # (N, C, K) into u_c * u_m
        T = table.size(0)
        return table.reshape(T, -1).gather(1, flat.reshape(1, -1).expand(T, -1)).view(T, *flat.shape)

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """(u_c, ...) per distinct candidate -> (N, C, ...), or (1, C, ...) when candidates are shared."""
        return values[None] if self.candidate_index is None else values[self.candidate_index]

    def select(self, values: torch.Tensor) -> torch.Tensor:
        """(N, u_c) per row and distinct candidate -> (N, C)."""
        return values if self.candidate_index is None else values.gather(1, self.candidate_index)


def read_entries(relevance: torch.Tensor, visible: torch.Tensor, memory_index: torch.Tensor, slot_bias: torch.Tensor,
                 top_k: int, candidate_index: torch.Tensor | None, n_entries: int) -> MemoryReads:
    """Retrieval: for every (row, candidate), the top-K visible entries by relevance.

    relevance (N, C, M), visible (N, M), memory_index (N, M) into the distinct entries,
    slot_bias (N, M); all visible entries when ``top_k`` is 0 or >= M.
    """
    N, C, M = relevance.shape
    masked = relevance.masked_fill(~visible[:, None, :], float("-inf"))  # (N, C, M)
    if 0 < top_k < M:
        values, slots = masked.topk(top_k, dim=-1)  # (N, C, K), largest first
    else:
        values, slots = masked, torch.arange(M, device=relevance.device).expand(N, C, M)
    K = slots.size(-1)
    flat_slots = slots.reshape(N, C * K)
    entries = memory_index.gather(1, flat_slots).view(N, C, K)  # (N, C, K)
    bias = slot_bias.gather(1, flat_slots).view(N, C, K)
    novelty = torch.ones(N, C, device=relevance.device)
    if M:
        novelty = (1.0 - values.float().amax(-1)).clamp(0.0, 1.0)  # no visible entry: 1 - (-inf) -> 1
    return MemoryReads(candidate_index, entries, slots, values > float("-inf"), bias, novelty, n_entries)


class MemoryReader(nn.Module):
    """The ``memory`` parameter group: the long-term snapshots (buffers, not weights), the
    short-term tier read from the model's input, and a learned recency bias.

    What a row reads is the memory *as of its target*: the short-term tier is the last ``W``
    items of the row's input sequence (the items just before the target, newest last), in
    training and evaluation alike; the long-term tier is the snapshot taken just before the
    target's train position (:class:`UserMemory`). Reading the short-term tier from the final
    train-part memory instead would show evaluation rows the user's latest items but hide them
    from almost every training row (written after their target), so the experts could never
    learn to use recency.

    ``recency_bias`` (W + 1) is added to the experts' attention logits: entry ``i`` for the
    item ``i + 1`` steps before the target, entry ``W`` for every long-term entry; zero at
    initialisation.
    """

    def __init__(self, memory: UserMemory, short_term_size: int) -> None:
        super().__init__()
        self.register_buffer("snapshots", memory.items, persistent=False)  # (P, L)
        self.register_buffer("first", memory.offsets[:-1].clone(), persistent=False)  # (n_users,)
        self.register_buffer("final", memory.offsets[1:] - 1, persistent=False)  # (n_users,) after the train part
        self.short_term_size = short_term_size
        self.recency_bias = nn.Parameter(torch.zeros(short_term_size + 1))

    @property
    def size(self) -> int:
        """M = short-term slots + long-term slots."""
        return self.short_term_size + self.snapshots.size(1)

    def read(self, users: torch.Tensor, recent: torch.Tensor, before: torch.Tensor | None = None):
        """(N,) users, (N, >= W) items before each row's target (newest last, 0 = padding),
        optional (N,) train positions of the targets -> items, visible, logit bias, each (N, M).

        Slots ``0..W-1`` are the short-term tier (oldest first), the rest long-term: the
        snapshot as of train position ``before`` (None, or past the train part: after it).
        Each item is visible once: in its newest short-term slot, else its long-term one. (The
        long-term tier usually holds the latest items too, and a second copy would take a second
        of the K slots retrieval reads and double the item's attention.)
        """
        W = self.short_term_size
        short = recent[:, max(recent.size(1) - W, 0):] if W else recent[:, :0]  # (N, <= W)
        if short.size(1) < W:  # a history shorter than W: pad on the left
            short = torch.nn.functional.pad(short, (W - short.size(1), 0))
        rows = self.final[users]
        if before is not None:
            rows = torch.minimum(self.first[users] + before.clamp(min=0), rows)
        long_items = self.snapshots[rows]  # (N, L)
        items = torch.cat([short, long_items], 1)  # (N, M)
        M = items.size(1)
        slot = torch.arange(M, device=items.device)
        preference = torch.where(slot < W, W - 1 - slot, slot)  # lower = kept: newest short-term first
        earlier = preference[None, :] < preference[:, None]  # (M, M) slot k is preferred to slot j
        duplicate = ((items[:, :, None] == items[:, None, :]) & earlier).any(-1)  # (N, M)
        visible = (items > 0) & ~duplicate
        bias = torch.cat([self.recency_bias[:W].flip(0), self.recency_bias[W:].expand(long_items.size(1))])
        return items, visible, bias.expand(len(users), -1)
