
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_model import (
    N_ITEMS,
    N_USERS,
    T,
    batch,
    make_config,
    make_features,
    make_model,
    make_sequences,
    no_modality,
    unit,
)

from ur4rec.models.experts import Gate, masked_softmax, pca_init_
from ur4rec.models.losses import (
    UncertaintyWeighting,
    alignment_loss,
    combine_losses,
    info_nce,
    load_balancing_loss,
    surprise_weights,
)
from ur4rec.models.memory import LocalMemory, build_memory, combined_item_features, read_entries
from ur4rec.models.sasrec import SASRec
from ur4rec.models.scoring import score
from ur4rec.models.ur4rec_model import PARAMETER_GROUPS, UR4Rec
from ur4rec.training.stages import recent_items

# --------------------------------------------------------------------------- shapes and scoring


def test_output_shapes_in_training_candidate_and_full_ranking_modes():
    model = make_model().eval()
    users, ids = batch()
    B = len(users)
    states, _ = model.encode(ids)
    rows = model.read_memory(users, states[:, -1], ids)
    targets = torch.randint(1, N_ITEMS + 1, (B,))
    negatives = torch.randint(1, N_ITEMS + 1, (7,))
    sampled = model.score_rows(rows, torch.cat([targets[:, None], negatives[None].expand(B, -1)], 1))
    assert sampled.scores.shape == (B, 8) and sampled.router_weights.shape == (B, 8, 4)
    in_batch = model.score_rows(rows, targets[None].expand(B, B))
    assert in_batch.scores.shape == (B, B)
    full_softmax = model.score_rows(rows, torch.arange(1, N_ITEMS + 1))
    assert full_softmax.scores.shape == (B, N_ITEMS)
    candidates = torch.randint(1, N_ITEMS + 1, (B, 6))
    assert model.score_candidates(users, ids, candidates).shape == (B, 6)
    full = model.score_all(users, ids)
    assert full.shape == (B, N_ITEMS + 1)
    # chunked == unchunked == every item as a per-row candidate list == the in-batch diagonal
    assert torch.allclose(model.score_all(users, ids, chunk_size=7), full, atol=1e-5)
    per_row = model.score_candidates(users, ids, torch.arange(N_ITEMS + 1).expand(B, -1))
    assert torch.allclose(per_row, full, atol=1e-5)
    assert torch.allclose(in_batch.scores.diagonal(), full.gather(1, targets[:, None]).squeeze(1), atol=1e-5)
    assert torch.allclose(full_softmax.scores, full[:, 1:], atol=1e-5)
    # distinct candidate lists per row (sampled training, candidate mode) score as full ranking does
    assert torch.allclose(model.score_candidates(users, ids, candidates), full.gather(1, candidates), atol=1e-5)
    sampled_lists = torch.cat([targets[:, None], negatives[None].expand(B, -1)], 1)
    assert torch.allclose(sampled.scores, full.gather(1, sampled_lists), atol=1e-5)


def test_retrieval_ties_do_not_depend_on_the_chunk_or_the_candidate_list():
    # pins: memory entries equally relevant to a candidate (items with the same content features, as duplicate
    # titles have) tie exactly, so a score does not depend on moe.eval_chunk_size or on which other candidates
    # it is scored with (their cosines came out of one matrix product a last bit apart, which bit depending on
    # the chunk's shape, and retrieval read one entry or the other: 0.09 apart here)
    features = make_features(text=1.0, image=0.0, users=1.0)
    for item in range(1, N_ITEMS + 1):
        features.item_text[item] = features.item_text[1 + item % 3]  # three distinct texts
    model = make_model(features, "moe.retrieval_top_k=2").eval()
    with torch.no_grad():
        model.memory.recency_bias.normal_(0, 1.0)  # tied entries in other slots read with other biases
    users, ids = batch(0, B=12)
    items = torch.arange(N_ITEMS + 1)
    with torch.no_grad():
        full = model.score_all(users, ids, chunk_size=1000)
        assert torch.allclose(model.score_all(users, ids, chunk_size=7), full, atol=1e-5)
        assert torch.allclose(model.score_candidates(users, ids, items.expand(len(users), -1)), full, atol=1e-5)
        order = torch.randperm(N_ITEMS + 1, generator=torch.Generator().manual_seed(0))
        shuffled = model.score_candidates(users, ids, order.expand(len(users), -1))
        assert torch.allclose(shuffled[:, order.argsort()], full, atol=1e-5)


def test_scores_are_the_dot_product_of_z_with_the_candidate():
    model = make_model().eval()
    users, ids = batch(1)
    candidates = torch.randint(1, N_ITEMS + 1, (len(users), 5))
    out = model(users, ids, candidates, details=True)
    e = model.item_embedding(candidates)  # (B, C, d)
    residual = sum(out.router_weights[..., k, None] * out.expert_outputs[name]
                   for k, name in enumerate(out.expert_names))
    z = out.user_states[:, None] + out.gate * residual  # (B, C, d)
    similarity = sum(out.similarity_scores.values())  # (B, C) the history-similarity terms, outside z
    assert torch.allclose(out.scores, (z * e).sum(-1) + similarity, atol=1e-4)
    for k, name in enumerate(out.expert_names):  # each expert's table-computed score is E_k . e_c
        expected = out.gate * out.router_weights[..., k] * (out.expert_outputs[name] * e).sum(-1)
        assert torch.allclose(out.expert_scores[name], expected, atol=1e-4), name
    assert torch.allclose(out.base_scores, out.backbone_scores + similarity, atol=1e-5)
    assert torch.allclose(out.scores, out.base_scores + sum(out.expert_scores.values()), atol=1e-5)
    assert (out.router_weights > 0).any(-1).all()  # experts did contribute
    assert set(out.similarity_scores) == {"text", "collaborative"} and (similarity != 0).any()


def test_every_modality_missing_reduces_exactly_to_sasrec():
    model = make_model(no_modality(), "moe.similarity=[text]").eval()  # no text: the text term is 0
    sasrec = SASRec(model.config.model, N_ITEMS, T).eval()
    state = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("item_embedding", "backbone")}
    sasrec.load_state_dict(state, strict=True)  # the same parameter names
    users, ids = batch(2)
    assert torch.allclose(model.score_all(users, ids), sasrec.score_all(users, ids), rtol=1e-6, atol=1e-6)
    out = model(users, ids, torch.randint(1, N_ITEMS + 1, (len(users), 9)))
    assert not out.available.any() and (out.router_weights == 0).all()


@pytest.mark.parametrize("overrides", [["moe.experts=[]"], ["moe.gate=none"]])
def test_experts_off_or_gate_off_is_sasrec(overrides):
    model = make_model(make_features(), "moe.similarity=[]", *overrides).eval()
    users, ids = batch(3)
    states, _ = model.encode(ids)
    expected = score(states[:, -1], model.item_vectors())
    assert torch.allclose(model.score_all(users, ids), expected, atol=1e-5)


def test_a_freshly_built_model_has_zero_similarity_weights():
    config = make_config("moe.gate=none")
    features, sequences = make_features(), make_sequences()
    memory = build_memory(sequences, combined_item_features(features), config.moe.long_term_capacity,
                          config.moe.novelty_threshold)
    model = UR4Rec(config, N_ITEMS, N_USERS, features, memory, sequences).eval()
    assert model.similarity.sources == ("text", "collaborative") and (model.similarity.weight == 0).all()
    users, ids = batch(3)
    states, _ = model.encode(ids)
    assert torch.allclose(model.score_all(users, ids), score(states[:, -1], model.item_vectors()), atol=1e-5)


def test_fresh_similarity_weights_score_exactly_as_sasrec_and_learned_ones_add_their_terms():
    model = make_model(make_features(), "moe.gate=none").eval()
    users, ids = batch(3)
    states, _ = model.encode(ids)
    sasrec = score(states[:, -1], model.item_vectors())
    with torch.no_grad():
        model.similarity.weight.zero_()  # as Stage 2 starts
    assert torch.allclose(model.score_all(users, ids), sasrec, atol=1e-5)
    with torch.no_grad():
        model.similarity.weight.copy_(torch.tensor([0.5, 2.0]))
    profiles = model.similarity.terms(users, ids)  # (B, 2, V + 1)
    expected = sasrec + 0.5 * profiles[:, 0] + 2.0 * profiles[:, 1]
    assert torch.allclose(model.score_all(users, ids, chunk_size=7), expected, atol=1e-5)
    assert not torch.allclose(expected, sasrec, atol=1e-3)


def test_experts_and_memory_switch_off_by_config():
    model = make_model(make_features(), "moe.experts=[semantic, fusion]")
    assert model.expert_names == ("semantic", "fusion")
    assert set(model.parameter_groups()) == set(PARAMETER_GROUPS) - {"experts.visual", "experts.preference"}
    no_memory = make_model(make_features(), "moe.memory=false").eval()
    out = no_memory(*batch(4), torch.randint(1, N_ITEMS + 1, (6, 4)))
    names = list(out.expert_names)
    assert no_memory.memory.size == 0
    assert not out.available[..., names.index("visual")].any() and not out.available[..., names.index("semantic")].any()
    assert out.available[..., names.index("fusion")].all()
    with pytest.raises(ValueError, match="moe.experts 'audio' is not one of"):  # refused with the config
        make_model(make_features(), "moe.experts=[audio]")


@pytest.mark.parametrize("features", [no_modality, lambda: make_features(text=0.5, image=0.3, users=0.5),
                                      lambda: make_features(image=0.0)])
def test_values_and_gradients_finite_with_missing_modalities_and_padding_rows(features):
    model = make_model(features()).train()
    users, ids = batch(5, B=5)
    ids[1] = 0  # an all-padding row
    before = torch.tensor([0, 0, 3, 100, 1])  # rows 0-1 see no memory at all
    states, attentions = model.encode(ids, need_weights=True)
    rows = model.read_memory(users, states[:, -1], ids, before)
    out = model.score_rows(rows, torch.randint(1, N_ITEMS + 1, (5, 6)), details=True, need_weights=True)
    tensors = [out.scores, out.router_weights, out.novelty, *out.expert_outputs.values(),
               *out.cross_attentions.values(), *attentions]
    assert all(torch.isfinite(t).all() for t in tensors)
    F.cross_entropy(out.scores, torch.zeros(5, dtype=torch.long)).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


def test_without_any_image_skipping_the_visual_expert_changes_nothing():
    """No item has an image: the model skips the visual expert's tables. Computing them anyway
    (``has_images`` forced on) must give the same scores, routing and gradients elsewhere."""
    model = make_model(make_features(image=0.0)).train()
    assert not model.has_images
    users, ids = batch(6)
    candidates = torch.randint(1, N_ITEMS + 1, (len(users), 7))
    results = []
    for has_images in (False, True):
        model.has_images = has_images
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        out = model(users, ids, candidates, details=True)
        F.cross_entropy(out.scores, torch.zeros(len(users), dtype=torch.long)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()
                 if p.grad is not None and not n.startswith("experts.visual")}
        results.append((out, grads))
    (skipped, skipped_grads), (computed, computed_grads) = results
    assert torch.allclose(skipped.scores, computed.scores, atol=1e-6)
    assert torch.equal(skipped.router_weights, computed.router_weights)
    assert (skipped.router_weights[..., list(skipped.expert_names).index("visual")] == 0).all()
    assert skipped_grads.keys() == computed_grads.keys()
    assert all(torch.allclose(skipped_grads[n], computed_grads[n], atol=1e-6) for n in skipped_grads)


def test_router_gives_exactly_zero_weight_to_a_missing_modality():
    features = make_features(text=1.0, image=0.5, users=0.5)
    model = make_model(features).eval()
    users = torch.arange(N_USERS)
    ids = torch.randint(1, N_ITEMS + 1, (N_USERS, T))
    candidates = torch.arange(1, N_ITEMS + 1).expand(N_USERS, -1)
    out = model(users, ids, candidates)
    names = list(out.expert_names)
    no_image = torch.from_numpy(~features.item_image_mask[1:])
    visual = out.router_weights[..., names.index("visual")]
    assert (visual[:, no_image] == 0).all() and (visual[:, ~no_image] > 0).any()
    preference = out.router_weights[..., names.index("preference")]
    no_text = torch.from_numpy(~features.user_text_mask)
    assert (preference[no_text] == 0).all() and (preference[~no_text] > 0).all()
    assert torch.allclose(out.router_weights.sum(-1), torch.ones(N_USERS, N_ITEMS))  # all rows have some expert


def test_memory_experts_attend_only_to_entries_that_have_their_modality():
    features = make_features(text=0.5, image=0.5)
    model = make_model(features).eval()
    users = torch.arange(N_USERS)
    ids = torch.randint(1, N_ITEMS + 1, (N_USERS, T), generator=torch.Generator().manual_seed(0))
    out = model(users, ids, torch.arange(1, N_ITEMS + 1).expand(N_USERS, -1), need_weights=True)
    entries = out.memory_items.gather(1, out.memory_slots.flatten(1)).view_as(out.memory_slots)  # (N, C, K) items
    no_image = torch.from_numpy(~features.item_image_mask)[entries]
    no_text = torch.from_numpy(~features.item_text_mask)[entries]
    assert no_image.any() and (~no_image).any() and no_text.any() and (~no_text).any()
    assert (out.cross_attentions["visual"][no_image] == 0).all()
    assert (out.cross_attentions["semantic"][no_text] == 0).all()
    assert (out.cross_attentions["visual"][~no_image & (entries > 0)] > 0).any()
    assert (out.cross_attentions["semantic"][~no_text & (entries > 0)] > 0).any()


def test_masked_softmax_exact_zeros_and_empty_rows():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    weights = masked_softmax(logits, mask)
    assert weights[0, 1] == 0 and torch.allclose(weights[0].sum(), torch.tensor(1.0))
    assert (weights[1] == 0).all()
    weights.sum().backward()
    assert torch.isfinite(logits.grad).all()



@pytest.mark.parametrize("dim", [-1, 1])
def test_masked_softmax_matches_softmax_over_the_allowed_entries(dim):
    """The written-out softmax agrees with torch.softmax on the allowed entries, values and gradients."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 6, 5, generator=generator) * 5).requires_grad_()
    mask = torch.rand(4, 6, 5, generator=generator) > 0.3
    mask.select(dim, 0).fill_(True)  # every row along dim keeps an allowed entry
    upstream = torch.randn(4, 6, 5, generator=generator)
    reference = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=dim)
    (expected_grad,) = torch.autograd.grad((reference * upstream).sum(), logits)
    weights = masked_softmax(logits, mask, dim=dim)
    (grad,) = torch.autograd.grad((weights * upstream).sum(), logits)
    assert torch.allclose(weights, reference, atol=1e-6)
    assert torch.allclose(grad, expected_grad, atol=1e-5)
    half = masked_softmax(logits.detach().bfloat16(), mask, dim=dim)  # bf16 in, float32 out
    assert half.dtype == torch.float32 and torch.allclose(half, reference.detach(), atol=0.05)


# --------------------------------------------------------------------------- parameters, buffers, init


def test_parameter_groups_and_sasrec_names():
    model = make_model()
    sasrec = SASRec(model.config.model, N_ITEMS, T)
    backbone_keys = {k for k in model.state_dict() if k.split(".")[0] in ("item_embedding", "backbone")}
    assert backbone_keys == set(sasrec.state_dict())
    groups = model.parameter_groups()
    assert set(groups) == set(PARAMETER_GROUPS)
    owned = [k for k, _ in model.named_parameters() if any(k.startswith(g + ".") for g in groups)]
    assert len(owned) == len(list(model.parameters()))  # every parameter is in a named group
    # features and memory are data, not weights
    assert not any(k.startswith(("item_text", "item_image", "user_text", "item_content", "memory.items"))
                   for k in model.state_dict())
    assert "item_text" in dict(model.named_buffers()) and "memory.snapshots" in dict(model.named_buffers())


def test_width_changing_adapters_preserve_feature_geometry():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(384, 10)))[0]  # features in a 10-d subspace of R^384
    features = torch.from_numpy(rng.normal(size=(50, 10)) @ basis.T).float()
    layer = pca_init_(torch.nn.Linear(384, 16), features)
    with torch.no_grad():
        projected = layer(features)
    # 16 >= the data's rank: an isometry on the data, pairwise distances kept
    exact = "donot_use_mm_for_euclid_dist"
    assert torch.allclose(torch.cdist(projected, projected, compute_mode=exact),
                          torch.cdist(features, features, compute_mode=exact), atol=1e-4)
    assert torch.allclose(projected.mean(0), torch.zeros(16), atol=1e-5)  # centred
    model = make_model()
    texts = model.item_text[model.item_text_mask]
    with torch.no_grad():
        kept = model.alignment.text(texts).var(0).sum() / texts.var(0).sum()
    assert kept > 16 / 384  # top principal directions keep more variance than a random 16-d projection would


# --------------------------------------------------------------------------- gate


def test_gate_straight_through_keeps_expert_gradients_alive_at_a_small_gate():
    g = 1e-3
    grads = {}
    for mode in ("straight_through", "plain"):
        model = make_model(make_features(), f"moe.gate_init={g}", f"moe.gate_gradient={mode}").train()
        users, ids = batch(6)
        out = model(users, ids, torch.randint(1, N_ITEMS + 1, (6, 8)))
        F.cross_entropy(out.scores, torch.zeros(6, dtype=torch.long)).backward()
        grads[mode] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        scores = out.scores.detach()
        grads[mode]["scores"] = scores
    st, plain = grads["straight_through"], grads["plain"]
    assert torch.equal(st["scores"], plain["scores"])  # same forward pass
    assert st["gate.value"].abs() > 0 and torch.allclose(st["gate.value"], plain["gate.value"])  # exact gate gradient
    for name in ("experts.visual.query.weight", "experts.semantic.key.weight", "experts.fusion.out.weight",
                 "experts.preference.out.weight", "router.out.weight", "memory.recency_bias"):
        ratio = st[name].norm() / plain[name].norm()
        assert ratio == pytest.approx(1 / g, rel=1e-3), name  # the naive form shrinks them by g
    assert st["experts.visual.query.weight"].norm() > 1e-4 > plain["experts.visual.query.weight"].norm()
    assert (st["memory.recency_bias"] != 0).all()  # every slot's bias, the long-term tier's (last) included
    # parameters that also act outside the gate keep their exact gradient
    for name in ("alignment.text.weight", "backbone.final_norm.weight", "item_embedding.weight"):
        assert torch.allclose(st[name], plain[name]), name


def test_gate_none_is_zero_and_not_a_parameter():
    gate = Gate("none", init=0.3)
    assert list(gate.parameters()) == [] and torch.equal(gate(torch.ones(3)), torch.zeros(3))
    with pytest.raises(ValueError):
        Gate("vector", init=0.1)


@pytest.mark.parametrize("expert, projection", [("semantic", "text"), ("visual", "visual")])
def test_a_memory_experts_values_train_the_alignment_projection(expert, projection):
    """The memory experts' values are ``alignment.<modality>`` of the entries: the recommendation
    loss alone (no alignment loss, no other expert) must reach that projection."""
    model = make_model(make_features(), f"moe.experts=[{expert}]", "moe.similarity=[]").train()
    users, ids = batch(7)
    out = model(users, ids, torch.randint(1, N_ITEMS + 1, (len(users), 8)), details=False)
    F.cross_entropy(out.scores, torch.zeros(len(users), dtype=torch.long)).backward()
    grad = getattr(model.alignment, projection).weight.grad
    assert grad is not None and grad.abs().sum() > 0


# --------------------------------------------------------------------------- memory


def test_memory_writes_novel_items_only():
    memory = LocalMemory(long_term_capacity=4, novelty_threshold=0.3)
    a, b, near_a = np.array([1.0, 0.0]), np.array([0.0, 1.0]), unit(np.array([[1.0, 0.1]]))[0]
    assert memory.write(1, a) is True  # empty store: novel
    assert memory.write(1, a) is False  # a duplicate
    assert memory.write(2, near_a) is False  # cosine 0.995: novelty 0.005 < 0.3
    assert memory.write(3, b) is True  # orthogonal: novelty 1
    assert [e.item for e in memory.long_term] == [1, 3]
    assert memory.long_term[0].crf > 2.0  # item 1 was accessed again twice
    # no feature: identity decides
    assert memory.write(7, np.zeros(2)) is True and memory.write(7, np.zeros(2)) is False


def test_memory_capacity_and_eviction_by_recency_and_frequency():
    memory = LocalMemory(long_term_capacity=2, novelty_threshold=0.5, half_life=10.0)
    a, b, c, d = np.eye(4)
    memory.write(1, a, time=0)
    memory.write(2, b, time=1)
    memory.write(1, a, time=2)  # item 1: accessed twice, and more recently than item 2
    assert memory.write(3, c, time=3) is True  # full: evicts item 2, the lowest recency-frequency value
    assert sorted(e.item for e in memory.long_term) == [1, 3]
    assert len(memory.long_term) == 2
    # much later, the stale frequent entry loses to the fresh one
    memory.write(3, c, time=60)
    memory.write(4, d, time=61)
    assert sorted(e.item for e in memory.long_term) == [3, 4]


def test_memory_novelty_threshold_is_inclusive_and_crf_decays_by_the_half_life():
    memory = LocalMemory(4, novelty_threshold=0.5)
    assert memory.write(1, np.array([1.0, 0.0])) is True
    assert memory.write(2, np.array([0.5, np.sqrt(0.75)])) is False  # cosine 0.5: novelty exactly the threshold
    assert memory.write(3, np.array([0.0, 1.0])) is True  # cosine 0: novelty 1
    lrfu = LocalMemory(4, 0.3, half_life=10.0)
    lrfu.write(1, np.array([1.0, 0.0]), time=0)
    lrfu.write(1, np.array([1.0, 0.0]), time=10)  # one half-life later: 1 + 1 * 0.5
    assert lrfu.long_term[0].crf == pytest.approx(1.5) and lrfu.long_term[0].last_access == 10
    lrfu.write(1, np.array([1.0, 0.0]), time=30)  # two more half-lives: 1 + 1.5 * 0.25
    assert lrfu.long_term[0].crf == pytest.approx(1.375)


def test_memory_eviction_ties_go_to_the_least_recently_accessed():
    from ur4rec.models.memory import _Entry

    memory = LocalMemory(2, 0.3, half_life=1.0)  # decay exactly 0.5 per step
    f = np.zeros(2)
    memory.long_term = [_Entry(1, f, 0, last_access=5, crf=0.25), _Entry(2, f, 0, last_access=3, crf=1.0)]
    assert memory._least_valuable(5) == 1  # both worth 0.25 at t = 5: item 2 was accessed longer ago
    memory.long_term.reverse()
    assert memory._least_valuable(5) == 0


def test_build_memory_keeps_the_long_term_tier_as_of_every_position():
    features = make_features()
    sequences = [np.array([1, 2, 3, 1, 4, 5]), np.array([7])]
    memory = build_memory(sequences, combined_item_features(features), 4, 0.5)
    assert memory.items.shape == (6 + 1 + 1 + 1, 4) and memory.offsets.tolist() == [0, 7, 9]
    assert [memory.snapshot(0, p) for p in range(7)] == [[], [1], [1, 2], [1, 2, 3], [1, 2, 3], [1, 2, 3, 4],
                                                        [1, 3, 4, 5]]  # full at 5: 2 (one old access) evicted
    assert memory.snapshot(0) == [1, 3, 4, 5] and memory.snapshot(0, 100) == [1, 3, 4, 5]
    assert memory.snapshot(1, 0) == [] and memory.snapshot(1) == [7]


def test_a_snapshot_depends_only_on_the_items_before_its_position():
    """The memory a training target reads must not depend on the target or anything after it:
    the end-of-train memory filtered by write time fails this (later accesses decide which
    early entries survive eviction)."""
    features = make_features()
    content = combined_item_features(features)
    rng = np.random.default_rng(0)
    sequence = rng.integers(1, N_ITEMS + 1, 60)
    full = build_memory([sequence], content, 3, 0.2, half_life=5.0)
    differs = 0
    for position in range(len(sequence) + 1):
        prefix = build_memory([sequence[:position]], content, 3, 0.2, half_life=5.0)
        assert full.snapshot(0, position) == prefix.snapshot(0), position
        end_filtered = [item for item, written in _final_entries(sequence, content) if written < position]
        differs += end_filtered != full.snapshot(0, position)
    assert differs > 0  # the case this test guards: filtering the final memory is not a snapshot


def _final_entries(sequence, content):
    memory = LocalMemory(3, 0.2, half_life=5.0)
    for position, item in enumerate(sequence):
        memory.write(int(item), content[item], position)
    return [(entry.item, entry.written_at) for entry in memory.long_term]


def test_memory_is_read_as_of_each_rows_target():
    model = make_model()  # short-term W = 4, long-term capacity 6
    W, reader = model.memory.short_term_size, model.memory
    assert W == 4 and reader.size == W + 6
    sequence = make_sequences()[0]
    snapshot = build_memory([sequence], combined_item_features(make_features()), 6,
                            model.config.moe.novelty_threshold).snapshot
    users = torch.tensor([0, 0, 0, 0])
    recent = torch.tensor([[0, 0, 0, 0, 0, 9], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    before = torch.tensor([0, 2, len(sequence) - 1, 1000])
    items, visible, bias = reader.read(users, recent, before)
    # short-term tier = the last W items before the target, from the row's own input
    assert items[:, :W].tolist() == [[0, 0, 0, 9], [3, 4, 5, 6], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert visible[:, :W].tolist() == [[False, False, False, True], [True] * 4, [False] * 4, [False] * 4]
    # long-term tier = the snapshot just before the target's train position
    # (visible there unless the row's short-term tier holds the item already)
    for row, position in enumerate([0, 2, len(sequence) - 1, None]):
        assert items[row, W:][items[row, W:] > 0].tolist() == snapshot(0, position), row
        short = set(items[row, :W].tolist())
        assert items[row, W:][visible[row, W:]].tolist() == [i for i in snapshot(0, position) if i not in short], row
    evaluation, visible_eval, _ = reader.read(users[:1], recent[:1])
    assert evaluation[0, W:][visible_eval[0, W:]].tolist() == [i for i in snapshot(0) if i != 9]
    with torch.no_grad():
        reader.recency_bias.copy_(torch.arange(W + 1.0))
    _, _, bias = reader.read(users, recent)
    assert bias[0].tolist() == [3, 2, 1, 0] + [W] * 6  # 0 = the newest item


def test_each_item_is_visible_once_in_a_memory_read():
    model = make_model()  # W = 4, long-term capacity 6
    reader = model.memory
    assert reader.short_term_size == 4
    reader.snapshots = torch.tensor([[5, 7, 2, 0, 0, 0]])  # one user, one snapshot: items 5, 7, 2
    reader.first, reader.final = torch.tensor([0]), torch.tensor([0])
    items, visible, _ = reader.read(torch.tensor([0]), torch.tensor([[3, 7, 3, 5]]))  # 3 twice, 7 and 5 in both tiers
    assert items[0].tolist() == [3, 7, 3, 5, 5, 7, 2, 0, 0, 0]
    # kept: the newest short-term copy of 3, the short-term 7 and 5, the long-term 2 alone
    assert visible[0].tolist() == [False, True, True, True, False, False, True, False, False, False]


def test_training_rows_read_only_inputs_before_their_target():
    x = torch.tensor([[0, 0, 7, 8, 9]])  # left-padded window; target y[:, p] follows x[:, p]
    recent = recent_items(x, 3)
    assert recent[0].tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 7], [0, 7, 8], [7, 8, 9]]
    assert recent_items(x, 0).shape == (1, 5, 0)


def test_retrieval_reads_the_top_k_visible_entries():
    relevance = torch.tensor([[[0.1, 0.9, 0.5, 0.7]]])  # (N=1, C=1, M=4)
    visible = torch.tensor([[True, False, True, True]])
    memory_index = torch.tensor([[10, 11, 12, 13]])
    reads = read_entries(relevance, visible, memory_index, torch.zeros(1, 4), 2, None, 20)
    assert reads.entries.tolist() == [[[13, 12]]] and reads.valid.all()
    assert reads.novelty.item() == pytest.approx(0.3)
    reads = read_entries(relevance, visible, memory_index, torch.zeros(1, 4), 0, None, 20)
    assert reads.valid.tolist() == [[[True, False, True, True]]]


# --------------------------------------------------------------------------- losses


def test_load_balancing_loss_against_hand_computation():
    weights = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.0, 0.0, 0.0]])
    available = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    # the last token has no expert and does not count: f = (2/3, 1/3, 0), P = (0.5, 0.5, 0)
    expected = 3 * (2 / 3 * 0.5 + 1 / 3 * 0.5)
    assert load_balancing_loss(weights, available).item() == pytest.approx(expected)
    uniform = torch.full((4, 4), 0.25)
    uniform[:, 0] += 1e-3  # argmax ties broken toward expert 0: f = (1, 0, 0, 0)
    assert load_balancing_loss(uniform).item() == pytest.approx(4 * 0.25 + 4 * 1e-3, rel=1e-3)


def test_uncertainty_weighting_and_fixed_weights_by_name():
    losses = {"recommendation": torch.tensor(2.0), "alignment": torch.tensor(0.5)}
    fixed = combine_losses(losses, {"alignment": 0.1})
    assert fixed["recommendation"].item() == 2.0 and fixed["alignment"].item() == pytest.approx(0.05)
    assert fixed["total"].item() == pytest.approx(2.05)
    weighting = UncertaintyWeighting(["recommendation", "alignment"])
    with torch.no_grad():
        weighting.log_variances["recommendation"].fill_(0.5)
        weighting.log_variances["alignment"].fill_(-1.0)
    terms = combine_losses(losses, uncertainty=weighting)
    assert terms["recommendation"].item() == pytest.approx(np.exp(-0.5) * 2.0 + 0.5)
    assert terms["alignment"].item() == pytest.approx(np.exp(1.0) * 0.5 - 1.0)
    assert terms["total"].item() == pytest.approx(np.exp(-0.5) * 2.0 + 0.5 + np.exp(1.0) * 0.5 - 1.0)
    terms["total"].backward()
    assert weighting.log_variances["alignment"].grad.item() == pytest.approx(1 - np.exp(1.0) * 0.5)
    with pytest.raises(ValueError, match="reserved"):
        combine_losses({"total": torch.tensor(1.0)})


def test_info_nce_instance_weights_against_hand_computation():
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    keys = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])  # the second query's positive is the orthogonal key
    t = 0.07
    first = -np.log(np.exp(1 / t) / (np.exp(1 / t) + np.exp(0)))
    second = -np.log(np.exp(0) / (np.exp(0) + np.exp(1 / t)))
    weights = surprise_weights(torch.tensor([0.0, 0.5]), alpha=2.0)  # 1 and 2
    assert weights.tolist() == [1.0, 2.0]
    assert info_nce(queries, keys, labels, t, weights).item() == pytest.approx((first + 2 * second) / 3, rel=1e-4)
    assert info_nce(queries, keys, labels, t).item() == pytest.approx((first + second) / 2, rel=1e-4)


def test_alignment_loss_is_the_mean_of_both_weighted_directions():
    generator = torch.Generator().manual_seed(0)
    projections, embeddings = torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    items = torch.tensor([3, 8, 3, 9])  # item 3 twice: one key, the first row's
    weights = torch.tensor([1.0, 3.0, 0.5, 2.0])
    index, first = torch.tensor([0, 1, 0, 2]), torch.tensor([0, 1, 3])
    expected = 0.5 * (info_nce(projections, embeddings[first], index, 0.1, weights)
                      + info_nce(embeddings, projections[first], index, 0.1, weights))
    assert alignment_loss(projections, embeddings, items, 0.1, weights).item() == pytest.approx(expected.item())
    assert alignment_loss(projections, embeddings, items, 0.1).item() != pytest.approx(expected.item(), rel=1e-3)


def test_alignment_loss_never_uses_an_item_as_its_own_negative():
    embeddings = torch.eye(3)[[0, 1, 0]]  # item 5 twice
    items = torch.tensor([5, 6, 5])
    aligned = alignment_loss(embeddings, embeddings, items, temperature=0.07)
    assert aligned.item() < 1e-3  # perfectly aligned: near zero although item 5 appears twice
    assert alignment_loss(embeddings[[1, 0, 1]], embeddings, items, temperature=0.07).item() > 1.0
