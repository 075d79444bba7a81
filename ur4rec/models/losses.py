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


class _FullSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of ``states @ items.T`` against ``targets``, chunked over rows.

    Equal to ``F.cross_entropy(states @ items.T, targets)`` but computed ``chunk`` rows at a
    time, with the gradients formed in the same pass (softmax minus one-hot, then two matrix
    products), so the (N, V) logits never exist whole. On ML-100K a batch's logits are about
    30 MB; in chunks of a few hundred rows they stay in cache, and the separate log-softmax,
    its backward and the zero fills of ``F.cross_entropy`` (a quarter of a CPU training epoch
    in fp32, profile in docs/experiments.md) become one pass. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, states, items, targets, chunk, smoothing):
        V = items.size(0)
        total = torch.zeros((), dtype=torch.float32, device=states.device)
        grad_states = torch.empty_like(states)
        grad_items = torch.zeros_like(items, dtype=torch.float32)
        # Label smoothing adds -(s/V) sum_v log p_v per row: its loss is s * mean_v logits_v =
        # s * rows . mean(items) and its gradient is the constant -(s/V) on every logit, i.e.
        # -(s/V) sum(items) per row and -(s/V) sum(rows) per item: no extra pass over (c, V).
        item_sum = items.float().sum(0)  # (d,)
        for start in range(0, states.size(0), chunk):
            rows, labels = states[start : start + chunk], targets[start : start + chunk]
            logits = score(rows, items).float()  # (c, V)
            picked = torch.arange(len(labels), device=labels.device)
            label_logits = logits[picked, labels]  # (c,)
            # softmax and its normaliser with one exp pass (logsumexp would take a second one)
            peak = logits.amax(dim=1, keepdim=True)  # (c, 1)
            probabilities = logits.sub_(peak).exp_()  # (c, V), in place
            normaliser = probabilities.sum(dim=1, keepdim=True)  # (c, 1)
            probabilities.div_(normaliser)
            log_norm = (peak + normaliser.log()).squeeze(1)  # (c,) logsumexp of the logits
            # -log p_label, mixed with the mean -log p over all V items when smoothing
            total += (log_norm - (1 - smoothing) * label_logits).sum()
            probabilities[picked, labels] -= 1.0 - smoothing  # d loss_n / d logits_n, but for -s/V
            if smoothing:
                total -= smoothing * (rows.float() @ item_sum).sum() / V
            probabilities = probabilities.to(items.dtype)
            grad_states[start : start + chunk] = probabilities @ items
            if grad_items.dtype == items.dtype:
                grad_items.addmm_(probabilities.T, rows)
            else:  # bf16 products, summed over chunks in fp32
                grad_items += probabilities.T @ rows
        if smoothing:  # the -s/V on every logit
            grad_states -= (smoothing / V) * item_sum.to(grad_states.dtype)
            grad_items -= (smoothing / V) * states.float().sum(0)
        count = max(states.size(0), 1)
        ctx.save_for_backward(grad_states, grad_items.to(items.dtype))
        ctx.count = count
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_states, grad_items = ctx.saved_tensors
        scale = grad_output / ctx.count
        return grad_states * scale.to(grad_states.dtype), grad_items * scale.to(grad_items.dtype), None, None, None


def full_softmax_cross_entropy(states: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                               chunk: int = 512, smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of the softmax over all V items: states (N, d), items (V, d), targets
    (N,) in 0..V-1, with label smoothing ``smoothing`` as in ``F.cross_entropy`` (the target
    distribution puts ``smoothing / V`` on every item and the rest on the label). Under
    autocast the matrix products run in the autocast dtype (bf16), the softmax in fp32."""
    device = states.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        states, items = states.to(dtype), items.to(dtype)
    with torch.autocast(device_type=device, enabled=False):
        return _FullSoftmaxCrossEntropy.apply(states, items, targets, chunk, smoothing)


def recommendation_loss(name: str, states: torch.Tensor, targets: torch.Tensor, item_table: torch.Tensor,
                        negatives: torch.Tensor | None = None, smoothing: float = 0.0) -> torch.Tensor:
    """Mean loss over the N targets; ``smoothing`` is the label smoothing of ``ce`` (bpr and bce
    have no label distribution to smooth and ignore it)."""
    if name == "ce":
        return full_softmax_cross_entropy(states, item_table[1:], targets - 1, smoothing=smoothing)
    if negatives is None:
        raise ValueError(f"loss {name!r} needs sampled negatives")
    # F.embedding, not item_table[targets]: its backward adds a repeated item's gradients in a fixed
    # order, where the indexing's (an accumulating index_put_) adds them as threads reach them
    positive = (states * F.embedding(targets, item_table)).sum(-1)  # (N,)
    negative = score(states, F.embedding(negatives, item_table))  # (N, k)
    if name == "bpr":
        return F.softplus(negative - positive[:, None]).mean()
    if name == "bce":
        return (F.softplus(-positive) + F.softplus(negative).mean(-1)).mean()
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


# --------------------------------------------------------------------------- multimodal stages (2-3)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted InfoNCE (van den Oord et al. 2018) on cosine similarities at a fixed temperature.

    queries (N, d), keys (K, d), labels (N,) index of each query's positive key, weights (N,).
    ``sum_n w_n * CE(cos(q_n, keys) / T, label_n) / sum_n w_n``. The temperature is fixed: the
    prototype's surprise-adaptive temperature made hard samples count *less* (DESIGN section 3);
    hard samples get more weight through ``weights`` instead (:func:`surprise_weights`).
    """
    logits = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T / temperature  # (N, K)
    per_query = F.cross_entropy(logits, labels, reduction="none")  # (N,)
    if weights is None:
        return per_query.mean()
    return (weights * per_query).sum() / weights.sum().clamp_min(1e-12)


def surprise_weights(surprise: torch.Tensor, alpha: float) -> torch.Tensor:
    """Instance weights ``1 + alpha * surprise`` (surprise in [0, 1]: novelty w.r.t. the user's memory)."""
    return 1.0 + alpha * surprise


def alignment_loss(projections: torch.Tensor, embeddings: torch.Tensor, items: torch.Tensor, temperature: float = 0.07,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between items' multimodal projections and their ID embeddings.

    projections, embeddings (N, d) for the (N,) instance items; an item that occurs twice
    is one key, so it is never its own negative.
    """
    unique, index = torch.unique(items, return_inverse=True)  # (U,), (N,)
    first = torch.full((len(unique),), len(items), device=items.device).scatter_reduce(
        0, index, torch.arange(len(items), device=items.device), reduce="amin")  # (U,) one row per item
    to_embedding = info_nce(projections, embeddings[first], index, temperature, weights)
    to_projection = info_nce(embeddings, projections[first], index, temperature, weights)
    return 0.5 * (to_embedding + to_projection)


def load_balancing_loss(router_weights: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer auxiliary loss: ``E * sum_k f_k * P_k``.

    Fedus, Zoph & Shazeer, "Switch Transformers: Scaling to Trillion Parameter Models with
    Simple and Efficient Sparsity", JMLR 2022, eq. (4)-(6). router_weights (T, E) over T
    tokens (here: (user, target item) pairs); ``f_k`` = fraction of tokens whose largest
    weight is expert k (not differentiable), ``P_k`` = mean weight of expert k. Equal to 1
    when routing is uniform. Tokens with no available expert (``available`` (T, E) all False)
    do not count.
    """
    weights = router_weights.reshape(-1, router_weights.size(-1))  # (T, E)
    if available is not None:
        weights = weights[available.reshape(weights.shape).any(-1)]
    if weights.size(0) == 0 or weights.size(1) == 0:
        return router_weights.sum() * 0.0
    E = weights.size(1)
    fraction = F.one_hot(weights.argmax(-1), E).float().mean(0)  # (E,) f_k
    probability = weights.float().mean(0)  # (E,) P_k
    return E * (fraction * probability).sum()


class UncertaintyWeighting(torch.nn.Module):
    """Learned loss weights (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to
    Weigh Losses", CVPR 2018), keyed by loss name: ``sum_i exp(-s_i) L_i + s_i``, s_i = log sigma_i^2.

    The common simplified form of their eq. (7) (the 1/2 factors dropped), with s_i = 0 at init
    (every weight 1).
    """

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.log_variances = torch.nn.ParameterDict({name: torch.nn.Parameter(torch.zeros(())) for name in names})

    def forward(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = {name: torch.exp(-self.log_variances[name]) * value + self.log_variances[name]
                 for name, value in losses.items()}
        return {**terms, "total": sum(terms.values())}


def combine_losses(losses: dict[str, torch.Tensor], weights: dict[str, float] | None = None,
                   uncertainty: UncertaintyWeighting | None = None) -> dict[str, torch.Tensor]:
    """Named loss terms in; named weighted terms plus their sum ``total`` out.

    Fixed weights (a missing name weighs 1) or, with ``uncertainty``, learned weights.
    """
    if "total" in losses:
        raise ValueError("'total' is reserved for the combined loss")
    if uncertainty is not None:
        return uncertainty(losses)
    weights = weights or {}
    terms = {name: weights.get(name, 1.0) * value for name, value in losses.items()}
    return {**terms, "total": sum(terms.values())}
