"""Recommendation losses over (N, d) user states at target positions.

All take the item table (V + 1, d) whose row 0 is padding and (N,) target ids in 1..V.

* ``ce``: softmax cross-entropy over all V items (SASRec with full softmax, as RecBole's CE).
* ``bpr``: mean softplus(s_neg - s_pos) over sampled negatives (Rendle et al. 2009).
* ``bce``: softplus(-s_pos) + mean softplus(s_neg), the SASRec paper's binary loss.

Negatives are drawn uniformly from 1..V and never equal the target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ur4rec.models.scoring import score

LOSSES = ("ce", "bpr", "bce")


def sample_negatives(targets: torch.Tensor, n_items: int, k: int, generator: torch.Generator | None = None):
    """(N,) targets -> (N, k) uniform negatives in 1..n_items, none equal to its target."""
    offsets = torch.randint(1, n_items, (targets.size(0), k), generator=generator, device=targets.device)
    # Shift by a non-zero offset on the cycle 1..n_items: uniform over the other n_items-1 ids.
    return (targets[:, None] - 1 + offsets) % n_items + 1


def recommendation_loss(name: str, states: torch.Tensor, targets: torch.Tensor, item_table: torch.Tensor,
                        negatives: torch.Tensor | None = None, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss over the N targets. ``excluded``: optional (N, V) bool of items (ids 1..V as
    columns 0..V-1) that leave the softmax, e.g. items the user has already seen."""
    if name == "ce":
        logits = score(states, item_table[1:])  # (N, V)
        if excluded is not None:
            logits = logits.masked_fill(excluded, float("-inf"))
        # Under bf16 autocast, cross_entropy would upcast the (N, V) logits to fp32 and take
        # 35% of a CPU training step; log_softmax accumulates in fp32 internally either way.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return F.cross_entropy(logits, targets - 1)
    if negatives is None:
        raise ValueError(f"loss {name!r} needs sampled negatives")
    positive = (states * item_table[targets]).sum(-1)  # (N,)
    negative = score(states, item_table[negatives])  # (N, k)
    if name == "bpr":
        return F.softplus(negative - positive[:, None]).mean()
    if name == "bce":
        return (F.softplus(-positive) + F.softplus(negative).mean(-1)).mean()
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")
