"""Item-centric multimodal experts, the router and the gate of UR4Rec (DESIGN section 3).

Every expert ``k`` defines a d-vector ``E_k`` per (user row, candidate item ``c``); what the
model needs from it is its score ``E_k . e_c`` (``e_c`` = the candidate's ID embedding), and
for full ranking that is (N rows x every item). The experts compute that score without
building (N, C, d) tensors, because every expert ends in a linear read-out:

* attention logits depend only on (candidate item, memory entry), so they are one table over
  the batch's *distinct* candidates x *distinct* memory entries, ``(u_c, D) @ (D, u_m)``: queries
  and keys are each projected once;
* ``out(sum_m a_m v_m) . e_c = sum_m a_m (W_out v_m . e_c) + b_out . e_c``: the read-out is a
  second (u_c, u_m) table of dot products (:func:`~ur4rec.models.scoring.score` between the
  candidates' embeddings and the projected values);
* both tables are gathered at the K entries each (row, candidate) reads
  (:class:`~ur4rec.models.memory.MemoryReads`), so the largest tensors are (T, N, C, K), T
  tables (logits and read-outs) stacked first.

``outputs(...)`` builds the d-vectors themselves when asked (the app, tests); a test checks
that ``score(E_k, e_c)`` equals the expert's score. Nothing loops over items or users.

Width-changing adapters are initialised to preserve the pretrained features' geometry: the
top principal directions of the actual feature matrix (:func:`pca_init_`); square maps start
as the identity. The prototype's random projections turned CLIP/SBERT features into noise
whenever Stage 2 was skipped (DESIGN section 7).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ur4rec.models.memory import MemoryReads
from ur4rec.models.scoring import score


def identity_init_(linear: nn.Linear) -> nn.Linear:
    nn.init.eye_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


@torch.no_grad()
def pca_init_(linear: nn.Linear, features: torch.Tensor | None) -> nn.Linear:
    """Initialise ``linear`` (D_in -> d_out) as the centred projection on the top principal directions.

    ``W`` = the first d_out eigenvectors of the feature covariance (a full orthonormal basis
    of R^D_in, so directions beyond the data's rank are still orthonormal); when d_out > D_in
    the extra output rows are zero, an exact isometric embedding. ``bias = -W mean`` centres
    the features. Without feature rows (a modality nobody has) the map is semi-orthogonal.
    """
    d_out, d_in = linear.weight.shape
    if features is None or features.size(0) < 2:
        nn.init.orthogonal_(linear.weight)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
        return linear
    features = features.double()
    mean = features.mean(0)
    centred = features - mean
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues, (D_in, D_in)
    basis = vectors.flip(1).T  # (D_in, D_in) rows = principal directions, largest first
    weight = torch.zeros(d_out, d_in, dtype=torch.float64)
    k = min(d_out, d_in)
    weight[:k] = basis[:k]
    linear.weight.copy_(weight)
    if linear.bias is not None:
        linear.bias.copy_(-(weight @ mean))
    return linear


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the allowed entries; masked entries get exactly 0, a row with none allowed is all 0.

    Masked logits are set to the float32 minimum, not -inf, so an empty row is exp(0) times
    0 over a clamped sum: finite values and finite gradients (no NaN to patch afterwards).
    Written out in float32 rather than ``torch.softmax``: the softmaxes here run over a few
    entries (K memory reads, E experts, 2 tokens) at millions of positions, where the fused
    kernel is 2-5x slower than these element-wise ops on CPU (measured, docs/experiments.md).
    The maximum is detached: the softmax does not depend on the shift.
    """
    logits = logits.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    if logits.size(dim) == 0:  # nothing to attend to (no memory slots)
        return logits
    exp = (logits - logits.detach().amax(dim, keepdim=True)).exp() * mask
    return exp * exp.sum(dim, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny).reciprocal()


class AlignmentHeads(nn.Module):
    """The ``alignment`` group: map an item's content into item-embedding space (D -> d).

    Trained by the InfoNCE alignment loss to land next to the item's ID embedding; the
    experts use these projections as their values, so alignment is what makes the
    multimodal features speak the backbone's language.
    """

    def __init__(self, image_dim: int, text_dim: int, d: int, images=None, texts=None) -> None:
        super().__init__()
        self.visual = pca_init_(nn.Linear(image_dim, d), images)
        self.text = pca_init_(nn.Linear(text_dim, d), texts)

    def forward(self, images, texts, image_mask, text_mask) -> torch.Tensor:
        """(N, Dv), (N, Dt), (N,) masks -> (N, d) mean of the available modalities (0 when none)."""
        total = self.visual(images) * image_mask[:, None] + self.text(texts) * text_mask[:, None]  # (N, d)
        count = image_mask.float() + text_mask.float()  # (N,)
        return total / count.clamp_min(1.0)[:, None]


class VisualExpert(nn.Module):
    """Query = the candidate's image feature, keys/values = memory image features.

    ``E = out(sum_m a_m v_m)``, ``a = softmax_m(scale * query(x_c) . key(x_m) + tier bias)``:
    light single-head attention kept at the image width (query and key D x D, identity at
    init, so the initial logits are CLIP cosines / temperature 0.1); values ``v_m`` are
    ``alignment.visual(x_m)`` (projected to d); ``out`` is d x d, identity at init.
    """

    def __init__(self, image_dim: int, d: int) -> None:
        super().__init__()
        self.query = identity_init_(nn.Linear(image_dim, image_dim, bias=False))
        self.key = identity_init_(nn.Linear(image_dim, image_dim, bias=False))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.out = identity_init_(nn.Linear(d, d))

    def tables(self, candidate_images, candidate_vectors, memory_keys, memory_values) -> torch.Tensor:
        """candidate_images (u_c, Dv), candidate_vectors (u_c, d) = e_c, memory_keys (u_m, Dv) = key(x_m),
        memory_values (u_m, d) = v_m -> (2, u_c, u_m): attention logit, read-out W_out v_m . e_c."""
        logits = (self.query(candidate_images) @ memory_keys.T) * self.log_scale.exp()  # (u_c, u_m)
        readout = score(candidate_vectors, F.linear(memory_values, self.out.weight))  # (u_c, u_m)
        return torch.stack([logits, readout])

    def forward(self, columns, bias, mask, candidate_vectors, reads: MemoryReads):
        """columns (2, N, C, K) = ``tables`` at the read entries, bias and mask (N, C, K)
        -> E . e_c (N, C), attention (N, C, K)."""
        weights = masked_softmax(columns[0] + bias, mask)  # (N, C, K)
        offset = reads.rows(candidate_vectors @ self.out.bias)  # (N|1, C) b_out . e_c
        return (weights * columns[1]).sum(-1) + offset, weights

    def outputs(self, weights, memory_values, reads: MemoryReads) -> torch.Tensor:
        """(N, C, K) attention, (u_m, d) values -> E (N, C, d)."""
        return self.out((weights[..., None] * memory_values[reads.entries]).sum(-2))


class SemanticExpert(nn.Module):
    """Query = the candidate's ID embedding, keys/values = memory text features, multi-head
    cross-attention with a residual and a LayerNorm: ``E = e_c + out(MHA(LN(e_c), text memory))``.

    Pre-LayerNorm, like the backbone's blocks (see :mod:`ur4rec.models.sasrec`): the norm sits
    on the query, so E stays linear in the attention read-out and is scored from tables.
    Keys: text (Dt) -> d, PCA-initialised; values: ``alignment.text``; query and out: identity.
    """

    def __init__(self, text_dim: int, d: int, num_heads: int, texts=None) -> None:
        super().__init__()
        if d % num_heads:
            raise ValueError(f"hidden_size {d} is not divisible by moe.semantic_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(d)
        self.query = identity_init_(nn.Linear(d, d))
        self.key = pca_init_(nn.Linear(text_dim, d), texts)
        self.out = identity_init_(nn.Linear(d, d))

    def tables(self, candidate_vectors, memory_keys, memory_values) -> torch.Tensor:
        """candidate_vectors (u_c, d) = e_c, memory_keys (u_m, d) = key(t_m), memory_values (u_m, d)
        -> (2 nh, u_c, u_m): each head's attention logit, then each head's read-out."""
        u_c, d = candidate_vectors.shape
        nh, hs = self.num_heads, d // self.num_heads
        q = self.query(self.norm(candidate_vectors)).view(u_c, nh, hs).transpose(0, 1)  # (nh, u_c, hs)
        k = memory_keys.view(-1, nh, hs).transpose(0, 1)  # (nh, u_m, hs)
        logits = (q @ k.transpose(1, 2)) * (1.0 / math.sqrt(hs))  # (nh, u_c, u_m)
        # out(concat_h y_h) = sum_h W_out[:, h] y_h: each head's values through its slice of W_out
        v = memory_values.view(-1, nh, hs).transpose(0, 1)  # (nh, u_m, hs)
        w = self.out.weight.view(d, nh, hs).transpose(0, 1)  # (nh, d, hs)
        projected = v @ w.transpose(1, 2)  # (nh, u_m, d) W_out[:, h] v_hm
        readout = torch.stack([score(candidate_vectors, head) for head in projected])  # (nh, u_c, u_m)
        return torch.cat([logits, readout])  # (2 nh, u_c, u_m)

    def forward(self, columns, bias, mask, candidate_vectors, reads: MemoryReads):
        """columns (2 nh, N, C, K) = ``tables`` at the read entries, bias and mask (N, C, K)
        -> E . e_c (N, C), attention (N, C, K, nh)."""
        nh = self.num_heads
        weights = masked_softmax(columns[:nh] + bias, mask)  # (nh, N, C, K): softmax along the contiguous K
        offset = (candidate_vectors * candidate_vectors).sum(-1) + candidate_vectors @ self.out.bias  # (u_c,)
        return (weights * columns[nh:]).sum((0, 3)) + reads.rows(offset), weights.permute(1, 2, 3, 0)

    def outputs(self, weights, candidate_rows, memory_values, reads: MemoryReads) -> torch.Tensor:
        """(N, C, K, nh) attention, (N|1, C, d) e_c, (u_m, d) values -> E (N, C, d)."""
        N, C, K, nh = weights.shape
        v = memory_values[reads.entries].view(N, C, K, nh, memory_values.size(1) // nh)  # (N, C, K, nh, hs)
        y = torch.einsum("nckh,nckhs->nchs", weights, v).reshape(N, C, -1)  # (N, C, d)
        return candidate_rows + self.out(y)


class PreferenceExpert(nn.Module):
    """The user's preference paragraph (a sentence embedding in the item texts' space) in
    item-embedding space: ``E = out(alignment.text(user_text))``, one vector per user."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.out = identity_init_(nn.Linear(d, d))

    def forward(self, projected_user_text: torch.Tensor) -> torch.Tensor:
        """(N, d) alignment.text(user_text) -> E (N, d); its score is score(E, e_c)."""
        return self.out(projected_user_text)


class CrossModalFusion(nn.Module):
    """Query = the backbone's user state (d); keys/values = the candidate's visual (Dv) and
    semantic (Dt) tokens, each keyed at its own width (PCA-initialised Dv -> d and Dt -> d);
    values ``alignment.visual`` / ``alignment.text``; ``E = out(a_vis v_vis + a_txt v_txt)``.

    Departure from the prototype: the tokens are the candidate item's own features, not the
    other experts' 512-wide outputs, so scoring every item needs no per-pair wide tensors.
    """

    def __init__(self, image_dim: int, text_dim: int, d: int, images=None, texts=None) -> None:
        super().__init__()
        self.query = identity_init_(nn.Linear(d, d))
        self.key_visual = pca_init_(nn.Linear(image_dim, d), images)
        self.key_text = pca_init_(nn.Linear(text_dim, d), texts)
        self.out = identity_init_(nn.Linear(d, d))

    def forward(self, user_states, candidate_images, candidate_texts, candidate_values, candidate_vectors,
                reads: MemoryReads, token_mask):
        """user_states (N, d), candidate features (u_c, Dv) / (u_c, Dt), candidate_values (2, u_c, d)
        (visual, text), candidate_vectors (u_c, d), token_mask (N|1, C, 2) -> E . e_c (N, C), attention (N, C, 2)."""
        d = user_states.size(1)
        keys = torch.stack([self.key_visual(candidate_images), self.key_text(candidate_texts)])  # (2, u_c, d)
        logits = (self.query(user_states) @ keys.transpose(1, 2)) * (1.0 / math.sqrt(d))  # (2, N, u_c)
        logits = torch.stack([reads.select(logits[0]), reads.select(logits[1])], -1)  # (N, C, 2)
        weights = masked_softmax(logits, token_mask)  # (N, C, 2)
        projected = F.linear(candidate_values, self.out.weight).transpose(0, 1)  # (u_c, 2, d) W v
        readout = reads.rows(score(candidate_vectors, projected))  # (u_c, 2) -> (N|1, C, 2) W v . e_c
        return (weights * readout).sum(-1) + reads.rows(candidate_vectors @ self.out.bias), weights

    def outputs(self, weights, candidate_values, reads: MemoryReads) -> torch.Tensor:
        """(N, C, 2) attention, (2, u_c, d) values -> E (N, C, d)."""
        values = torch.stack([reads.rows(candidate_values[0]), reads.rows(candidate_values[1])], -2)  # (N|1, C, 2, d)
        return self.out((weights[..., None] * values).sum(-2))


class Router(nn.Module):
    """Item-centric router: MLP over (candidate ID embedding, user state) -> softmax over experts.

    As in Mixtral's sparse MoE block, but per (user, candidate) and with availability:
    experts whose modality is missing get exactly zero weight (:func:`masked_softmax`). The
    first layer is split into an item part (once per distinct candidate) and a user part
    (once per row), so the (N, C, hidden) tensor is a broadcast sum.
    """

    def __init__(self, d: int, hidden: int, n_experts: int) -> None:
        super().__init__()
        self.item = nn.Linear(d, hidden, bias=False)
        self.user = nn.Linear(d, hidden)
        self.out = nn.Linear(hidden, n_experts)
        for layer in (self.item, self.user, self.out):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(self.user.bias)
        nn.init.zeros_(self.out.bias)

    def forward(self, candidate_vectors, user_states, reads: MemoryReads, available):
        """(u_c, d), (N, d), (N, C, E) bool -> weights (N, C, E), logits (N, C, E)."""
        hidden = reads.rows(self.item(candidate_vectors)) + self.user(user_states)[:, None]  # (N, C, H)
        logits = self.out(F.gelu(hidden))  # (N, C, E)
        return masked_softmax(logits, available), logits


class Gate(nn.Module):
    """The ``gate`` group: the scalar ``g`` in ``z = LayerNorm(h) + g * sum_k r_k E_k``.

    **Straight-through scale** (``gradient="straight_through"``, the default). The forward pass
    is the plain ``g * R``; the parameters that act *only* through the gate (the experts, the
    router and the memory tier bias; :meth:`register_gated`) receive their gradient divided by
    ``|g|``, i.e. as if g were 1::

        experts, router, memory:  dL/dtheta / |g| = sign(g) * (dL/dz . dR/dtheta)
        g:                        dL/dg = dL/dz . R                    (exact)
        backbone, alignment:      exact                                (they also act elsewhere)

    With the naive form every expert gradient is multiplied by g: the prototype's g = 1e-4
    scaled them by 1e-4, far below the backbone's share of the clipped gradient norm and near
    AdamW's epsilon, so the experts never learned, and g, fed by experts that did not move,
    stayed at its initial value. Here an expert's gradient does not depend on |g|; it is the
    true gradient rescaled by the positive factor 1/|g| (the same direction, so still a descent
    direction: a step size for the gated groups), so the experts learn *what* to add while the
    gate, with its exact gradient, learns *how much*.

    Why on the parameters and not on the activation (``g R.detach() + (R - R.detach())``): the
    backbone state feeds the router and the fusion query, and the alignment heads are the
    experts' values *and* trained by the InfoNCE loss; an activation-level straight-through
    would inflate their gradient from the gated path by 1/|g| too and let it swamp their own
    losses (on ML-100K it made Stage 3's backbone fine-tuning diverge). The gradient of the
    router from the load-balancing loss is scaled like the router's gradient from the scores,
    so their ratio stays the configured weight. ``mode="none"`` is g = 0, not trained:
    z = LayerNorm(h) exactly, the experts receive no gradient and the router no load-balancing loss
    (:func:`ur4rec.training.stages.training_losses`).
    """

    def __init__(self, mode: str, init: float, gradient: str = "straight_through") -> None:
        super().__init__()
        if mode not in ("scalar", "none"):
            raise ValueError(f"moe.gate must be scalar or none, got {mode!r}")
        if gradient not in ("straight_through", "plain"):
            raise ValueError(f"moe.gate_gradient must be straight_through or plain, got {gradient!r}")
        self.gradient = gradient
        if mode == "none":
            self.register_buffer("value", torch.zeros(1), persistent=False)
        else:
            self.value = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        """g * residual."""
        return self.value * residual

    def register_gated(self, modules) -> None:
        """Give the parameters of ``modules`` (which act only through this gate) the straight-through gradient."""
        if self.gradient == "plain" or not isinstance(self.value, nn.Parameter):
            return  # plain: the naive gradient; no gate: g = 0 and their true gradient is 0
        for module in modules:
            for parameter in module.parameters():
                parameter.register_hook(self._as_if_gate_were_one)

    def _as_if_gate_were_one(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / self.value.detach().abs().clamp_min(1e-6)[0]  # a 0-d tensor: keeps the shape of grad
