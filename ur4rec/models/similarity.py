"""History-similarity score terms: how close a candidate is to the user's last few items.

For a row whose last ``L`` history items are ``R`` (``moe.similarity_window``) and a candidate
``c``, each source ``k`` adds ``w_k * s_k(c)`` to the score, with

    s_k(c) = mean_{j in R} S_k[j, c]

``S_k`` a fixed item-item cosine similarity and ``w_k`` a scalar that starts at 0 (so a model
fresh from Stage 1 scores exactly as SASRec) and is fitted on the validation items
(:func:`ur4rec.training.stages.fit_similarity`). Sources:

* ``text``: cosine of the items' text features (Sentence-BERT): the semantic modality;
* ``image``: cosine of the items' image features (CLIP), where both items have one;
* ``collaborative``: cosine of the items' columns in the train-part user-item matrix (users
  who rated both / sqrt(users of each)), the statistic ItemKNN ranks by. The row's own user is
  left out of the counts (``C[j, c] - 1`` where the user rated both), so a training target is
  never credited for co-occurring with its own history in its own user's row; at evaluation
  this touches only the user's train items, which the ranking excludes. (The norms keep the
  user: a small bias, documented rather than corrected.)

Why a separate term and not another expert: every expert reaches the score as
``g r_k E_k . e_c``, a dot product with the candidate's ID embedding, so no expert can express
"this candidate's feature resembles the features of what was just watched". Measured on
ML-100K (docs/experiments.md), co-occurrence with the last 5 items adds to SASRec when blended
into its scores, and the experts trained on the same features do not pick it up. The weights
are fitted on held-out items, not learned on the train part: there the backbone is far surer
of its targets than on new items, and a side signal looks almost useless (measured).

Matrices are dense (V, V) float32 buffers: 11 MB per source on ML-100K, 55 MB on ML-1M;
more than :data:`MAX_ITEMS` items is refused with the setting to change.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SOURCES = ("text", "image", "collaborative")
MAX_ITEMS = 20_000


def cosine_matrix(features: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """(V, D) features, (V,) mask -> (V, V) cosine, 0 on the diagonal and wherever either item has no feature."""
    x = torch.from_numpy(np.asarray(features, dtype=np.float32) * np.asarray(mask, dtype=bool)[:, None])
    x = F.normalize(x, dim=1)
    similarity = x @ x.T
    similarity.fill_diagonal_(0.0)
    return similarity


def interaction_matrix(train_sequences: list[np.ndarray], n_items: int) -> torch.Tensor:
    """(U, V) bool: user u rated item i in their train part (column 0 = padding, always False)."""
    member = torch.zeros(len(train_sequences), n_items + 1, dtype=torch.bool)
    for user, items in enumerate(train_sequences):
        member[user, torch.as_tensor(np.asarray(items, dtype=np.int64))] = True
    member[:, 0] = False
    return member


def collaborative_matrix(member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) interactions -> (V, V) co-occurrence cosine (0 diagonal) and (V,) 1 / sqrt(users of each item)."""
    x = member.float()
    counts = x.T @ x  # (V, V) users who rated both
    inverse_root = counts.diagonal().clamp_min(1.0).rsqrt()  # (V,)
    similarity = counts * inverse_root[:, None] * inverse_root[None]
    similarity.fill_diagonal_(0.0)
    return similarity, inverse_root


class HistorySimilarity(nn.Module):
    """The ``similarity`` group: one weight per source, over fixed similarity buffers.

    ``forward`` gives ``sum_k w_k s_k`` for every item in one pass: the weighted matrix
    ``sum_k w_k S_k`` is formed first (V x V), then averaged over each row's last items by
    ``F.embedding_bag``, so the (N, V) tensor is built once, not once per source.
    """

    def __init__(self, sources: list[str], window: int, n_items: int, features=None,
                 train_sequences: list[np.ndarray] | None = None) -> None:
        super().__init__()
        unknown = sorted(set(sources) - set(SOURCES))
        if unknown:
            raise ValueError(f"moe.similarity: unknown source {unknown[0]!r}; expected some of {SOURCES}")
        if sources and window < 1:
            raise ValueError(f"moe.similarity_window must be 1 or more items, got {window}")
        if sources and n_items + 1 > MAX_ITEMS:
            raise ValueError(f"moe.similarity: {n_items} items is beyond the dense (V, V) matrices this term keeps "
                             f"(at most {MAX_ITEMS - 1}); set moe.similarity to [] for this dataset")
        self.sources = tuple(name for name in SOURCES if name in sources)
        self.window = window
        self.weight = nn.Parameter(torch.zeros(len(self.sources)))
        matrices = []
        for name in self.sources:
            if name == "text":
                matrices.append(cosine_matrix(features.item_text, features.item_text_mask))
            elif name == "image":
                matrices.append(torch.zeros(n_items + 1, n_items + 1) if features.item_image is None
                                else cosine_matrix(features.item_image, features.item_image_mask))
            else:
                if train_sequences is None:
                    raise ValueError("moe.similarity: 'collaborative' needs the users' train sequences")
                member = interaction_matrix(train_sequences, n_items)
                matrix, inverse_root = collaborative_matrix(member)
                matrices.append(matrix)
                self.register_buffer("member_scaled", member.float() * inverse_root[None],
                                     persistent=False)  # (U, V + 1) 1 / sqrt(users of i) where user u rated i
                self.register_buffer("inverse_root", inverse_root, persistent=False)  # (V + 1,)
        self.register_buffer("matrices", torch.stack(matrices) if matrices else torch.zeros(0, 1, 1),
                             persistent=False)  # (S, V + 1, V + 1)

    def forward(self, users: torch.Tensor, recent: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) users, (N, >= L) items before each row's target (newest last, 0 = padding)
        -> (N, V + 1) ``sum_k w_k s_k`` of every item (``weight`` in place of the fitted w if given)."""
        weight = self.weight if weight is None else weight
        with torch.autocast(recent.device.type, enabled=False):  # fp32: cosine means differ in the 3rd digit
            return self._combined(users, recent, weight.float())

    def _combined(self, users: torch.Tensor, recent: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        recent = recent[:, recent.size(1) - min(self.window, recent.size(1)):]  # (N, L)
        valid = recent > 0
        mean = valid.float() / valid.sum(1, keepdim=True).clamp_min(1)  # (N, L) 1/|R| at each real item
        combined = torch.einsum("k,kij->ij", weight, self.matrices)  # (V + 1, V + 1)
        total = F.embedding_bag(recent, combined, mode="sum", per_sample_weights=mean, padding_idx=0)  # (N, V + 1)
        if "collaborative" in self.sources:  # leave the row's own user out of the co-occurrence counts
            w = weight[self.sources.index("collaborative")]
            rated = self.member_scaled[users[:, None], recent] > 0  # (N, L) history items in the user's train part
            shared = rated.float() * mean
            own = (shared * self.inverse_root[recent]).sum(1, keepdim=True)  # (N, 1)
            total = torch.addcmul(total, self.member_scaled[users], own * w, value=-1.0)
            # pairs (j, c) with j = c are 0 in the matrix: give back what the line above took for them
            total = total.scatter_add(1, recent, shared * self.inverse_root[recent] ** 2 * w)
        return total

    def terms(self, users: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
        """(N, S, V + 1) each source's ``s_k`` of every item, before the weights (for breakdowns and tests)."""
        unit = torch.eye(len(self.sources), device=self.weight.device)
        return torch.stack([self(users, recent, unit[k]) for k in range(len(self.sources))], 1)
