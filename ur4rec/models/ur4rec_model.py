"""UR4Rec: SASRec plus a gated, item-centric mixture of multimodal experts (DESIGN section 3).

For a user row with backbone state ``h`` and a candidate item ``c``::

    E_k    = expert k's d-vector for (user, c)              k in visual, semantic, preference, fusion
    r      = router(e_c, LN(h)), softmax over the experts available for (user, c), 0 for the others
    z      = LN(h) + g * sum_k r_k E_k                       (g: :class:`~ur4rec.models.experts.Gate`)
    base   = LN(h) . e_c + sum_s w_s s_s(c)                  (history similarity, see below)
    score  = base + g * sum_k r_k (E_k . e_c)                 (= z . e_c + the similarity terms)

``LN(h)`` is the backbone's own final LayerNorm output, i.e. exactly SASRec's user state: with
every modality missing (or every expert off, or the gate off) no expert is available, ``z`` is
SASRec's state. ``s_s(c)`` is the mean similarity of the candidate to the row's last few items
by source s (text, image, train-part co-occurrence; :mod:`ur4rec.models.similarity`), with a
weight ``w_s`` that starts at 0 (a model fresh from Stage 1 scores exactly as SASRec) and is fitted
on the validation items (:func:`ur4rec.training.stages.fit_similarity`).

Because the experts are item-centric, ``z`` depends on the candidate, so scoring always names
its candidates: (N, C) per row, or (C,) shared by every row (full ranking uses chunks of all
items; see :meth:`UR4Rec.score_all`). ``z`` itself is never built for every pair: by
linearity ``z . e_c = LN(h) . e_c + g sum_k r_k (E_k . e_c)``, and every expert computes
``E_k . e_c`` from tables over the batch's distinct (candidate, memory item) pairs (see
:mod:`ur4rec.models.experts`); ``details=True`` also returns the d-vectors E_k, and a test
checks that the two agree.

Cost of full ranking (B users, V items, M memory slots, K read entries, d): per chunk of c
items, tables of c x u_m (u_m <= V distinct memory items) at widths 896 (retrieval), Dv and d;
a top-K over M per (user, item); a gather of B x c x K x (2 + 2 nh) table values; the router's
B x c x hidden MLP. On ML-100K (943 x 1683, M = 40, K = 10, d = 64) that is about 2.5 s on 2
CPU threads.

Parameter groups (named modules; Stage-1 weights load by group): ``item_embedding`` and
``backbone`` (the same names as :class:`~ur4rec.models.sasrec.SASRec`), ``memory``,
``alignment``, ``experts.visual``, ``experts.semantic``, ``experts.preference``,
``experts.fusion``, ``router``, ``gate``, ``similarity``. Features, memory and similarity
matrices are non-persistent buffers: data, not weights. The model does no I/O; the device
comes from its inputs' buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ur4rec.config import Config
from ur4rec.models.experts import (
    AlignmentHeads,
    CrossModalFusion,
    Gate,
    PreferenceExpert,
    Router,
    SemanticExpert,
    VisualExpert,
)
from ur4rec.models.memory import (
    MemoryReader,
    UserMemory,
    combined_item_features,
    empty_memory,
    pair_table,
    read_entries,
)
from ur4rec.models.sasrec import SASRecEncoder, _init_weights
from ur4rec.models.scoring import score
from ur4rec.models.similarity import HistorySimilarity, interaction_matrix

EXPERTS = ("visual", "semantic", "preference", "fusion")
PARAMETER_GROUPS = ("item_embedding", "backbone", "memory", "alignment", "experts.visual", "experts.semantic",
                    "experts.preference", "experts.fusion", "router", "gate", "similarity")


@dataclass
class UR4RecOutput:
    scores: torch.Tensor  # (N, C) z . e_c
    user_states: torch.Tensor  # (N, d) LayerNorm(h), the backbone's state
    expert_names: tuple[str, ...]  # order of the last axis of router_weights / available
    router_weights: torch.Tensor  # (N, C, E) exactly 0 where an expert is unavailable
    available: torch.Tensor  # (N, C, E) bool
    gate: torch.Tensor  # (1,) the gate value g
    novelty: torch.Tensor  # (N, C) 1 - max cosine of the candidate to the visible memory (1 if empty)
    base_scores: torch.Tensor  # (N, C) LayerNorm(h) . e_c + the history-similarity terms
    expert_outputs: dict[str, torch.Tensor] | None = None  # name -> (N, C, d) E_k
    backbone_scores: torch.Tensor | None = None  # (N, C) LayerNorm(h) . e_c
    expert_scores: dict[str, torch.Tensor] | None = None  # name -> (N, C) g r_k E_k . e_c
    similarity_scores: dict[str, torch.Tensor] | None = None  # source -> (N, C) w_s s_s(c); with the two above
    # and backbone_scores: sums to scores
    attentions: list[torch.Tensor] | None = None  # backbone, per block (B, nh, T, T)
    cross_attentions: dict[str, torch.Tensor] | None = None  # visual (N,C,K), semantic (N,C,K,nh), fusion (N,C,2)
    memory_slots: torch.Tensor | None = None  # (N, C, K) which of the row's M memory slots each K column is
    memory_items: torch.Tensor | None = None  # (N, M) the row's memory items


@dataclass
class _Rows:
    """What one batch of user rows needs, computed once and reused for every candidate chunk."""

    users: torch.Tensor  # (N,)
    states: torch.Tensor  # (N, d) LayerNorm(h)
    memory_items: torch.Tensor  # (N, M)
    visible: torch.Tensor  # (N, M) bool
    memory_index: torch.Tensor  # (N, M) into the distinct memory items
    memory_unique: torch.Tensor  # (u_m,) the batch's distinct memory items
    slot_bias: torch.Tensor  # (N, M) recency bias of each memory slot
    visual_keys: torch.Tensor | None = None  # (u_m, Dv)
    visual_values: torch.Tensor | None = None  # (u_m, d)
    semantic_keys: torch.Tensor | None = None  # (u_m, d)
    semantic_values: torch.Tensor | None = None  # (u_m, d)
    preference: torch.Tensor | None = None  # (N, d)
    recent: torch.Tensor | None = None  # (N, >= W) the items before each row's target, newest last
    similarity: torch.Tensor | None = None  # (N, n_items + 1) sum_s w_s s_s of every item


class UR4Rec(nn.Module):
    """SASRec backbone + memory + experts + router + gate. Built from one config, the counts,
    a FeatureSet-like object (any object with its attributes), the users' memory and their
    train sequences (for the collaborative similarity)."""

    def __init__(self, config: Config, n_items: int, n_users: int, features, memory: UserMemory | None = None,
                 train_sequences=None) -> None:
        super().__init__()
        moe = config.moe
        unknown = sorted(set(moe.experts) - set(EXPERTS))
        if unknown:
            raise ValueError(f"moe.experts: unknown expert {unknown[0]!r}; expected some of {EXPERTS}")
        self.config = config
        self.n_items, self.n_users = n_items, n_users
        self.expert_names = tuple(name for name in EXPERTS if name in moe.experts)
        d = config.model.hidden_size

        self.item_embedding = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.backbone = SASRecEncoder(config.model, config.data.max_len)
        self.item_embedding.apply(_init_weights)
        self.backbone.apply(_init_weights)

        self._register_features(features, moe.image_dim)
        # No item has an image (e.g. offline, no posters): the visual expert is unavailable for every
        # (user, item), so its router weight is exactly 0; skip computing what it would weigh.
        self.has_images = bool(self.item_image_mask.any())
        if memory is None or not moe.memory:
            memory = empty_memory(n_users)
        if memory.n_users != n_users:
            raise ValueError(f"memory has {memory.n_users} users, the model {n_users}")
        self.memory = MemoryReader(memory, moe.short_term_size if moe.memory else 0)

        images = self.item_image[self.item_image_mask]  # (rows with an image, Dv): PCA init data
        texts = self.item_text[self.item_text_mask]
        Dv, Dt = self.item_image.size(1), self.item_text.size(1)
        self.alignment = AlignmentHeads(Dv, Dt, d, images, texts)
        experts = {
            "visual": lambda: VisualExpert(Dv, d),
            "semantic": lambda: SemanticExpert(Dt, d, moe.semantic_heads, texts),
            "preference": lambda: PreferenceExpert(d),
            "fusion": lambda: CrossModalFusion(Dv, Dt, d, images, texts),
        }
        self.experts = nn.ModuleDict({name: experts[name]() for name in self.expert_names})
        if self.expert_names:
            self.router = Router(d, moe.router_hidden, len(self.expert_names))
        self.gate = Gate(moe.gate, moe.gate_init, moe.gate_gradient)
        self.gate.register_gated([self.experts, self.memory] + ([self.router] if self.expert_names else []))
        if moe.similarity:
            self.similarity = HistorySimilarity(moe.similarity, moe.similarity_window, n_items, features,
                                                train_sequences)
        # (U, V + 1) bool: each user's train items, never a hard negative in training (see
        # stages.sampled_candidates); None when the model is built without the train part
        self.register_buffer("train_items", None if train_sequences is None
                             else interaction_matrix(train_sequences, n_items), persistent=False)

    def _register_features(self, features, image_dim: int) -> None:
        V, U = self.n_items + 1, self.n_users
        text_mask = np.asarray(features.item_text_mask, dtype=bool)
        _check_shape("item_text", features.item_text, V)
        _check_shape("item_text_mask", text_mask, V)
        _check_shape("user_text", features.user_text, U)
        _check_shape("user_text_mask", features.user_text_mask, U)
        if features.item_image is None:
            image = np.zeros((V, image_dim), dtype=np.float32)
            image_mask = np.zeros(V, dtype=bool)
        else:
            image, image_mask = features.item_image, np.asarray(features.item_image_mask, dtype=bool)
            _check_shape("item_image", image, V)
            _check_shape("item_image_mask", image_mask, V)
        buffers = {
            "item_text": _unit_rows(features.item_text, text_mask),
            "item_text_mask": text_mask,
            "item_image": _unit_rows(image, image_mask),
            "item_image_mask": image_mask,
            "user_text": _unit_rows(features.user_text, features.user_text_mask),
            "user_text_mask": np.asarray(features.user_text_mask, dtype=bool),
            "item_content": combined_item_features(features),  # retrieval relevance: cosine on text ++ image
            "item_content_mask": text_mask | image_mask,
        }
        # (V,) the first item with the same content feature row: equal features get one column of the retrieval
        # relevance, so their cosines are equal to the bit whatever the chunk (a product computes equal columns a last
        # bit apart, depending on its shape) and retrieval reads the same of them in every chunk
        _, first, same = np.unique(buffers["item_content"], axis=0, return_index=True, return_inverse=True)
        buffers["item_content_key"] = first[same.reshape(-1)].astype(np.int64)
        for name, array in buffers.items():
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(array)), persistent=False)

    # ------------------------------------------------------------------ backbone and memory

    def encode(self, input_ids: torch.Tensor, need_weights: bool = False):
        """(B, T) left-padded ids -> states (B, T, d) (= SASRec's), backbone attention maps or None."""
        return self.backbone(self.item_embedding(input_ids), input_ids > 0, need_weights)

    def item_vectors(self) -> torch.Tensor:
        """(n_items + 1, d) the item representations every score is taken against."""
        return self.item_embedding.weight

    def read_memory(self, users: torch.Tensor, states: torch.Tensor, recent: torch.Tensor,
                    before: torch.Tensor | None = None) -> _Rows:
        """Project every memory-side key/value once for (N,) users with (N, d) states.

        ``recent`` (N, >= W): the items just before each row's target, newest last (the
        short-term tier). ``before`` (N,): train position of each row's target; the long-term
        tier is read as it stood just before it (training); None = after the train part (evaluation).
        """
        items, visible, slot_bias = self.memory.read(users, recent, before)  # (N, M) each
        unique, index = torch.unique(items, return_inverse=True)  # (u_m,), (N, M)
        rows = _Rows(users, states, items, visible, index, unique, slot_bias)
        if "visual" in self.experts and self.has_images:
            images = self.item_image[unique]  # (u_m, Dv)
            rows.visual_keys = self.experts["visual"].key(images)  # (u_m, Dv)
            rows.visual_values = self.alignment.visual(images)  # (u_m, d)
        if "semantic" in self.experts:
            texts = self.item_text[unique]  # (u_m, Dt)
            rows.semantic_keys = self.experts["semantic"].key(texts)  # (u_m, d)
            rows.semantic_values = self.alignment.text(texts)  # (u_m, d)
        if "preference" in self.experts:
            rows.preference = self.experts["preference"](self.alignment.text(self.user_text[users]))  # (N, d)
        if hasattr(self, "similarity"):
            rows.recent = recent
            rows.similarity = self.similarity(users, recent)  # (N, V + 1)
        return rows

    @torch.no_grad()
    def _relevance(self, candidates: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """(u_c,), (u_m,) items -> (u_c, u_m) cosine on content features, on ID embeddings for
        pairs where either item has no content feature."""
        distinct, column = torch.unique(self.item_content_key[memory], return_inverse=True)  # equal features: one column
        content = (self.item_content[candidates] @ self.item_content[distinct].T)[:, column]  # (u_c, u_m)
        both = self.item_content_mask[candidates][:, None] & self.item_content_mask[memory][None]
        if bool(both.all()):
            return content
        unit = F.normalize(self.item_embedding.weight, dim=-1)
        return torch.where(both, content, unit[candidates] @ unit[memory].T)

    # ------------------------------------------------------------------ scoring

    def score_rows(self, rows: _Rows, candidates: torch.Tensor, details: bool = False,
                   need_weights: bool = False) -> UR4RecOutput:
        """Score (N, C) candidates per row, or (C,) candidates shared by every row.

        ``score(z, e_c) = score(LN(h), e_c) + gate(sum_k r_k score(E_k, e_c))``: the dot product
        of z = LN(h) + g sum_k r_k E_k with the candidate, split along z's terms because E_k is
        per candidate; each expert evaluates score(E_k, e_c) through its linear read-out.
        """
        N, d = rows.states.shape
        if candidates.dim() == 1:
            unique, candidate_index = candidates, None  # shared: the "distinct" table is the list itself
        else:
            unique, candidate_index = torch.unique(candidates, return_inverse=True)  # (u_c,), (N, C)
        e = self.item_embedding(unique)  # (u_c, d)
        relevance = pair_table(self._relevance(unique, rows.memory_unique), candidate_index, rows.memory_index)
        reads = read_entries(relevance, rows.visible, rows.memory_index, rows.slot_bias,
                             self.config.moe.retrieval_top_k, candidate_index, rows.memory_unique.size(0))
        C = reads.entries.size(1)
        has_image = reads.rows(self.item_image_mask[unique])  # (N|1, C)
        has_text = reads.rows(self.item_text_mask[unique])
        # what each read entry holds: 1 = image, 2 = text
        entry_modality = (self.item_image_mask.long() + 2 * self.item_text_mask.long())[rows.memory_unique][reads.entries]

        expert_scores, available, maps, extra = {}, [], {}, {}
        tables = []  # every memory expert's (t, u_c, u_m) tables, gathered in one pass below
        visual = "visual" in self.experts and self.has_images
        if visual:
            tables.append(self.experts["visual"].tables(self.item_image[unique], e, rows.visual_keys,
                                                        rows.visual_values))
        if "semantic" in self.experts:
            tables.append(self.experts["semantic"].tables(e, rows.semantic_keys, rows.semantic_values))
        columns = reads.gather(torch.cat(tables)) if tables else None  # (T, N, C, K)
        if visual:
            mask = reads.valid & (entry_modality % 2 == 1)  # (N, C, K) entries with an image
            expert_scores["visual"], maps["visual"] = self.experts["visual"](
                columns[:2], reads.bias, mask, e, reads)
            available.append(has_image & mask.any(-1))
            columns = columns[2:]
        elif "visual" in self.experts:  # no images at all: unavailable everywhere, weight exactly 0
            expert_scores["visual"] = e.new_zeros(N, C)
            maps["visual"] = e.new_zeros(reads.entries.shape)
            available.append(torch.zeros(1, C, dtype=torch.bool, device=e.device))
        if "semantic" in self.experts:
            mask = reads.valid & (entry_modality >= 2)  # (N, C, K) entries with a text
            expert_scores["semantic"], maps["semantic"] = self.experts["semantic"](
                columns, reads.bias, mask, e, reads)
            available.append(mask.any(-1))
        if "preference" in self.experts:
            expert_scores["preference"] = reads.select(score(rows.preference, e))  # (N, u_c) -> (N, C)
            available.append(self.user_text_mask[rows.users][:, None])
        if "fusion" in self.experts:
            images, texts = self.item_image[unique], self.item_text[unique]  # (u_c, Dv), (u_c, Dt)
            extra["fusion_values"] = torch.stack([self.alignment.visual(images), self.alignment.text(texts)])
            tokens = torch.stack([has_image, has_text], -1)  # (N|1, C, 2)
            expert_scores["fusion"], maps["fusion"] = self.experts["fusion"](
                rows.states, images, texts, extra["fusion_values"], e, reads, tokens)
            available.append(tokens.any(-1))

        backbone_scores = reads.select(score(rows.states, e))  # (N, u_c) -> (N, C) exactly SASRec's score
        base_scores = backbone_scores
        if rows.similarity is not None:
            base_scores = backbone_scores + _at(rows.similarity, candidates)
        if self.expert_names:
            available = torch.stack([a.expand(N, C) for a in available], -1)  # (N, C, E)
            weights, _ = self.router(e, rows.states, reads, available)  # (N, C, E)
            residual = sum(weights[..., k] * expert_scores[name] for k, name in enumerate(self.expert_names))
            scores = base_scores + self.gate(residual)  # (N, C)
        else:
            available = torch.zeros(N, C, 0, dtype=torch.bool, device=e.device)
            weights = available.float()
            scores = base_scores

        out = UR4RecOutput(scores, rows.states, self.expert_names, weights, available, self.gate.value, reads.novelty,
                           base_scores)
        if details:
            g = self.gate.value.detach()
            out.backbone_scores = backbone_scores
            out.expert_scores = {name: g * weights[..., k] * expert_scores[name]
                                 for k, name in enumerate(self.expert_names)}
            out.similarity_scores = {}
            if rows.similarity is not None:
                terms = self.similarity.terms(rows.users, rows.recent)  # (N, S, V + 1)
                out.similarity_scores = {name: self.similarity.weight[k].detach() * _at(terms[:, k], candidates)
                                         for k, name in enumerate(self.similarity.sources)}
            out.expert_outputs = self._expert_outputs(rows, reads, e, maps, extra)
        if need_weights:
            out.cross_attentions = maps
            out.memory_slots = reads.slots
            out.memory_items = rows.memory_items
        return out

    def _expert_outputs(self, rows: _Rows, reads, e, maps, extra) -> dict[str, torch.Tensor]:
        """Each expert's d-vector E_k (N, C, d): what the scores above are the dot products of."""
        N, d = rows.states.shape
        C = reads.entries.size(1)
        outputs = {}
        if "visual" in self.experts:
            outputs["visual"] = self.experts["visual"].outputs(maps["visual"], rows.visual_values, reads) \
                if self.has_images else e.new_zeros(1, 1, d)
        if "semantic" in self.experts:
            outputs["semantic"] = self.experts["semantic"].outputs(maps["semantic"], reads.rows(e),
                                                                   rows.semantic_values, reads)
        if "preference" in self.experts:
            outputs["preference"] = rows.preference[:, None].expand(N, C, d)
        if "fusion" in self.experts:
            outputs["fusion"] = self.experts["fusion"].outputs(maps["fusion"], extra["fusion_values"], reads)
        return {name: value.expand(N, C, d) for name, value in outputs.items()}

    def forward(self, users: torch.Tensor, input_ids: torch.Tensor, candidates: torch.Tensor,
                before: torch.Tensor | None = None, need_weights: bool = False, details: bool = True) -> UR4RecOutput:
        """(B,) users, (B, T) left-padded histories, (B, C) or (C,) candidates -> output for the
        next item after each history (the last position). ``before`` (B,): see :meth:`read_memory`."""
        states, attentions = self.encode(input_ids, need_weights)
        rows = self.read_memory(users, states[:, -1], input_ids, before)
        out = self.score_rows(rows, candidates, details, need_weights)
        out.attentions = attentions
        return out

    def score_candidates(self, users: torch.Tensor, input_ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B,) users, (B, T) histories, (B, C) candidates -> (B, C) scores."""
        return self(users, input_ids, candidates, details=False).scores

    def score_all(self, users: torch.Tensor, input_ids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """(B,) users, (B, T) histories -> (B, n_items + 1) scores, computed ``chunk_size`` items at a time.

        The backbone and the memory-side projections run once; each chunk adds candidate-side
        projections of its items, the (chunk, u_m) tables and (B, chunk, K) attention, so memory
        stays bounded by the chunk size.
        """
        chunk_size = chunk_size or self.config.moe.eval_chunk_size
        states, _ = self.encode(input_ids)
        rows = self.read_memory(users, states[:, -1], input_ids)
        items = torch.arange(self.n_items + 1, device=input_ids.device)
        return torch.cat([self.score_rows(rows, items[start : start + chunk_size]).scores
                          for start in range(0, len(items), chunk_size)], dim=1)

    def parameter_groups(self) -> dict[str, nn.Module]:
        """Group name -> module, for the groups this model has (a disabled expert has none)."""
        modules = dict(self.named_modules())
        return {name: modules[name] for name in PARAMETER_GROUPS if name in modules}


def _at(table: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(N, V + 1) per-item values at (C,) shared or (N, C) per-row candidates -> (N, C)."""
    return table[:, candidates] if candidates.dim() == 1 else table.gather(1, candidates)


def _check_shape(name: str, array, rows: int) -> None:
    if array is None or len(array) != rows:
        raise ValueError(f"features.{name}: expected {rows} rows, got {None if array is None else len(array)}")


def _unit_rows(array, mask) -> np.ndarray:
    """Rows L2-normalised, zero where the mask is False."""
    array = np.asarray(array, dtype=np.float32) * np.asarray(mask, dtype=bool)[:, None]
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
