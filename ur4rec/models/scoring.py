"""One scoring function for every stage and mode: the dot product of user and item vectors.

The prototype scored differently in Stage 1 and Stage 2 (DESIGN section 7); here every
caller goes through :func:`score`.
"""

from __future__ import annotations

import torch


def score(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Dot-product scores.

    * full ranking / softmax:  users (B, d), items (V, d)    -> (B, V)
    * in-batch negatives:      users (B, d), items (B, d)    -> (B, B)
    * candidate lists:         users (B, d), items (B, C, d) -> (B, C)
    """
    if items.dim() == 3:
        return torch.einsum("bd,bcd->bc", users, items)  # (B, C)
    return users @ items.transpose(0, 1)  # (B, V)


def score_in_chunks(users: torch.Tensor, items: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Full-ranking scores (B, V) computed ``chunk_size`` items at a time (bounded memory)."""
    return torch.cat([score(users, items[start : start + chunk_size])
                      for start in range(0, items.size(0), chunk_size)], dim=1)
