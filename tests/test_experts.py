"""Expert internals against hand computations on tiny inputs (DESIGN section 3).

Each expert, the router, the gate and the alignment heads are run on 2-3 memory entries or
tokens with random (non-initial) parameters, and compared with the same formula written out
in numpy; a few model-level properties pin retrieval relevance and modality availability.
"""

import math

import numpy as np
import pytest
import torch
from tiny_model import N_ITEMS, N_USERS, T, make_features, make_model

from ur4rec.data.synthetic import SYNTHETIC_GENRES, make_synthetic
from ur4rec.models.experts import (
    AlignmentHeads,
    CrossModalFusion,
    Gate,
    Router,
    SemanticExpert,
    VisualExpert,
    identity_init_,
    pca_init_,
)
from ur4rec.models.memory import (
    MemoryReader,
    MemoryReads,
    UserMemory,
    combined_item_features,
    pair_table,
    read_entries,
)
from ur4rec.models.scoring import score, score_in_chunks


def randomise(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.7)
    return module


def np_(tensor):
    return tensor.detach().double().numpy()


def softmax_allowed(logits, allowed):
    """Softmax over the allowed entries of a 1-d array, exactly 0 elsewhere (all 0 if none)."""
    out = np.zeros_like(logits)
    if allowed.any():
        shifted = np.exp(logits[allowed] - logits[allowed].max())
        out[allowed] = shifted / shifted.sum()
    return out


def shared_reads(entries, bias):
    """MemoryReads for one row, candidates shared (candidate_index None): entries/bias (C, K)."""
    entries = torch.as_tensor(entries)[None]
    return MemoryReads(None, entries, entries.clone(), torch.ones_like(entries, dtype=torch.bool),
                       torch.as_tensor(bias, dtype=torch.float32)[None], torch.ones(entries.shape[:2]),
                       int(entries.max()) + 1)


def layer_norm(x, weight, bias, eps=1e-5):
    return (x - x.mean()) / np.sqrt(x.var() + eps) * weight + bias


# --------------------------------------------------------------------------- memory experts


def test_visual_expert_matches_a_hand_computed_attention_read_out():
    """score = sum_m a_m (W_out v_m) . e_c + b_out . e_c with a = softmax over the allowed
    entries of exp(log_scale) (W_q x_c) . (W_k x_m) + tier bias; E . e_c agrees with outputs()."""
    expert = randomise(VisualExpert(3, 2), 0)
    with torch.no_grad():
        expert.log_scale.fill_(math.log(2.0))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, generator=generator)  # 3 memory entries
    values = torch.randn(3, 2, generator=generator)
    candidate_images = torch.randn(2, 3, generator=generator)
    e = torch.randn(2, 2, generator=generator)
    entries = [[0, 1, 2], [2, 0, 1]]
    bias = [[0.3, -0.2, 0.5], [0.1, 0.0, -0.4]]
    mask = torch.tensor([[[True, True, True], [True, False, True]]])
    reads = shared_reads(entries, bias)
    keys = expert.key(images)
    columns = reads.gather(expert.tables(candidate_images, e, keys, values))
    got, weights = expert(columns, reads.bias, mask, e, reads)

    Wq, Wk, Wo, bo = (np_(p) for p in (expert.query.weight, expert.key.weight, expert.out.weight, expert.out.bias))
    for c in range(2):
        logits = np.array([2.0 * (Wq @ np_(candidate_images[c])) @ (Wk @ np_(images[m])) + bias[c][k]
                           for k, m in enumerate(entries[c])])
        a = softmax_allowed(logits, mask[0, c].numpy())
        E = sum(a[k] * (Wo @ np_(values[m])) for k, m in enumerate(entries[c])) + bo
        assert np.allclose(np_(weights[0, c]), a, atol=1e-5)
        assert got[0, c].item() == pytest.approx(E @ np_(e[c]), abs=1e-4)
        assert np.allclose(np_(expert.outputs(weights, values, reads)[0, c]), E, atol=1e-5)
    assert weights[0, 1, 1] == 0


def test_semantic_expert_matches_a_hand_computed_pre_norm_multi_head_attention():
    """E = e_c + W_out concat_h(sum_m a_hm v_hm) + b_out, a_h = softmax(q_h . k_hm / sqrt(hs) + tier bias),
    q = W_q LN(e_c) + b_q: two heads of width 2, every parameter random."""
    expert = randomise(SemanticExpert(3, 4, num_heads=2), 2)
    generator = torch.Generator().manual_seed(3)
    texts = torch.randn(3, 3, generator=generator)
    values = torch.randn(3, 4, generator=generator)
    e = torch.randn(2, 4, generator=generator) * 2
    entries = [[1, 0, 2], [0, 2, 1]]
    bias = [[0.5, -0.3, 0.2], [-0.6, 0.4, 0.0]]
    mask = torch.tensor([[[True, False, True], [True, True, True]]])
    reads = shared_reads(entries, bias)
    keys = expert.key(texts)
    columns = reads.gather(expert.tables(e, keys, values))
    got, weights = expert(columns, reads.bias, mask, e, reads)

    Wq, bq, Wo, bo = (np_(p) for p in (expert.query.weight, expert.query.bias, expert.out.weight, expert.out.bias))
    K = np_(keys)
    for c in range(2):
        ec = np_(e[c])
        q = Wq @ layer_norm(ec, np_(expert.norm.weight), np_(expert.norm.bias)) + bq
        y = np.zeros(4)
        for h in range(2):
            s = slice(2 * h, 2 * h + 2)
            logits = np.array([q[s] @ K[m, s] / math.sqrt(2) + bias[c][k] for k, m in enumerate(entries[c])])
            a = softmax_allowed(logits, mask[0, c].numpy())
            assert np.allclose(np_(weights[0, c, :, h]), a, atol=1e-5)
            y[s] = sum(a[k] * np_(values[m, s]) for k, m in enumerate(entries[c]))
        E = ec + Wo @ y + bo
        assert got[0, c].item() == pytest.approx(E @ ec, abs=1e-4)
        assert np.allclose(np_(expert.outputs(weights, e[None], values, reads)[0, c]), E, atol=1e-5)


def test_cross_modal_fusion_matches_a_hand_computation_and_attends_only_to_the_candidates_tokens():
    """a = softmax over the candidate's own tokens of (W_q s + b_q) . key_tok(x_c) / sqrt(d);
    score = sum_tok a_tok (W_out v_tok) . e_c + b_out . e_c; a missing token gets exactly 0."""
    d = 4
    fusion = randomise(CrossModalFusion(3, 5, d), 4)
    generator = torch.Generator().manual_seed(5)
    states = torch.randn(2, d, generator=generator)
    images, texts = torch.randn(3, 3, generator=generator), torch.randn(3, 5, generator=generator)
    values = torch.randn(2, 3, d, generator=generator)  # (visual, text) per candidate
    e = torch.randn(3, d, generator=generator)
    tokens = torch.tensor([[[True, True], [True, False], [False, True]]])  # both, image only, text only
    reads = shared_reads([[0], [0], [0]], [[0.0], [0.0], [0.0]])
    got, weights = fusion(states, images, texts, values, e, reads, tokens)

    Wq, bq, Wo, bo = (np_(p) for p in (fusion.query.weight, fusion.query.bias, fusion.out.weight, fusion.out.bias))
    for n in range(2):
        q = Wq @ np_(states[n]) + bq
        for c in range(3):
            keys = [np_(fusion.key_visual(images[c])), np_(fusion.key_text(texts[c]))]
            logits = np.array([q @ key / math.sqrt(d) for key in keys])
            a = softmax_allowed(logits, tokens[0, c].numpy())
            E = sum(a[t] * (Wo @ np_(values[t, c])) for t in range(2)) + bo
            assert np.allclose(np_(weights[n, c]), a, atol=1e-5)
            assert got[n, c].item() == pytest.approx(E @ np_(e[c]), abs=1e-4)
            assert np.allclose(np_(fusion.outputs(weights, values, reads)[n, c]), E, atol=1e-5)
    assert (weights[:, 1] == torch.tensor([1.0, 0.0])).all() and (weights[:, 2] == torch.tensor([0.0, 1.0])).all()


# --------------------------------------------------------------------------- router, gate, alignment


def test_router_matches_a_hand_computed_mlp_and_masks_unavailable_experts():
    router = randomise(Router(3, 5, 4), 6)
    generator = torch.Generator().manual_seed(7)
    e, states = torch.randn(2, 3, generator=generator), torch.randn(2, 3, generator=generator)
    available = torch.tensor([[[True, True, True, True], [True, False, True, False]],
                              [[False, True, False, False], [False, False, False, False]]])
    reads = shared_reads([[0], [0]], [[0.0], [0.0]])
    weights, logits = router(e, states, reads, available)

    Wi, Wu, bu, Wo, bo = (np_(p) for p in (router.item.weight, router.user.weight, router.user.bias,
                                           router.out.weight, router.out.bias))
    gelu = np.vectorize(lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2))))
    for n in range(2):
        for c in range(2):
            expected_logits = Wo @ gelu(Wi @ np_(e[c]) + Wu @ np_(states[n]) + bu) + bo
            assert np.allclose(np_(logits[n, c]), expected_logits, atol=1e-5)
            assert np.allclose(np_(weights[n, c]), softmax_allowed(expected_logits, available[n, c].numpy()),
                               atol=1e-5)
    assert (weights[~available] == 0).all()
    assert torch.allclose(weights.sum(-1), torch.tensor([[1.0, 1.0], [1.0, 0.0]]))  # 0 where nothing is available
    assert weights[1, 0, 1] == 1


@pytest.mark.parametrize("g", [0.25, -0.25])
def test_straight_through_gate_forward_is_g_times_residual_and_gradient_as_if_g_were_one(g):
    """Forward g * R exactly; a gated parameter's gradient is the true one divided by |g| (for a
    negative g too: the same direction as the true gradient, a descent direction), g's is exact."""
    torch.manual_seed(0)
    expert = torch.nn.Linear(3, 2)
    x, upstream = torch.randn(4, 3), torch.randn(4, 2)
    residual = expert(x)
    (true_grad,) = torch.autograd.grad((g * residual * upstream).sum(), expert.weight)
    gate = Gate("scalar", init=g)
    gate.register_gated([expert])
    out = gate(expert(x))
    assert torch.allclose(out, g * residual, atol=1e-7)
    (out * upstream).sum().backward()
    assert torch.allclose(expert.weight.grad, true_grad / abs(g), atol=1e-6)
    assert (expert.weight.grad * true_grad).sum() > 0  # never reverses the descent direction
    assert gate.value.grad.item() == pytest.approx((residual.detach() * upstream).sum().item(), rel=1e-5)


def test_alignment_heads_average_the_available_modalities():
    heads = randomise(AlignmentHeads(3, 5, 4), 8)
    generator = torch.Generator().manual_seed(9)
    images, texts = torch.randn(4, 3, generator=generator), torch.randn(4, 5, generator=generator)
    image_mask = torch.tensor([True, True, False, False])
    text_mask = torch.tensor([True, False, True, False])
    with torch.no_grad():
        out = heads(images, texts, image_mask, text_mask)
        visual, text = heads.visual(images), heads.text(texts)
    assert torch.allclose(out[0], (visual[0] + text[0]) / 2, atol=1e-6)
    assert torch.allclose(out[1], visual[1], atol=1e-6) and torch.allclose(out[2], text[2], atol=1e-6)
    assert (out[3] == 0).all()


def test_identity_and_pca_init():
    layer = identity_init_(torch.nn.Linear(3, 3))
    x = torch.randn(5, 3)
    assert torch.equal(layer(x), x)
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(20, 3)) * [3.0, 1.0, 0.1]).float()
    wide = pca_init_(torch.nn.Linear(3, 5), features)  # d_out > d_in: an isometric embedding, extra rows 0
    assert (wide.weight[3:] == 0).all()
    assert torch.allclose(wide.weight[:3] @ wide.weight[:3].T, torch.eye(3), atol=1e-5)
    assert abs(wide.weight[0, 0]) > 0.99  # the first row is the largest-variance direction
    assert torch.allclose(wide(features).mean(0), torch.zeros(5), atol=1e-5)


# --------------------------------------------------------------------------- retrieval


def test_read_entries_carry_the_read_slots_bias_and_novelty_from_the_visible_entries():
    relevance = torch.tensor([[[0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.3, 0.0]],
                              [[0.4, 0.6, 0.2, 0.1], [0.0, 0.1, 0.2, 0.3]]])  # (N=2, C=2, M=4)
    visible = torch.tensor([[True, False, True, True], [False, False, False, False]])
    memory_index = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    slot_bias = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]])
    reads = read_entries(relevance, visible, memory_index, slot_bias, 2, None, 30)
    assert reads.slots[0].tolist() == [[3, 2], [0, 2]]
    assert reads.entries[0].tolist() == [[13, 12], [10, 12]]
    assert reads.bias[0].tolist() == [[3.0, 2.0], [0.0, 2.0]]
    assert reads.valid[0].all() and not reads.valid[1].any()  # row 1 sees nothing
    assert torch.allclose(reads.novelty, torch.tensor([[0.3, 0.2], [1.0, 1.0]]))


def test_pair_table_and_gather_index_the_distinct_tables():
    table = torch.arange(12.0).view(3, 4)  # (u_c = 3, u_m = 4): value 4 c + m
    memory_index = torch.tensor([[3, 0], [1, 2]])
    per_row = pair_table(table, torch.tensor([[2, 0], [1, 1]]), memory_index)
    assert per_row.tolist() == [[[11, 8], [3, 0]], [[5, 6], [5, 6]]]
    shared = pair_table(table, None, memory_index)
    assert shared.tolist() == [[[3, 0], [7, 4], [11, 8]], [[1, 2], [5, 6], [9, 10]]]
    reads = MemoryReads(torch.tensor([[2, 0]]), torch.tensor([[[1, 3], [0, 2]]]), None, None, None, None, 4)
    assert reads.gather(torch.stack([table, -table])).tolist() == [[[[9, 11], [0, 2]]], [[[-9, -11], [0, -2]]]]


def test_the_long_term_tier_shares_one_bias_and_short_term_slots_count_back_from_the_target():
    memory = UserMemory(torch.tensor([[0, 0], [5, 6]]), torch.tensor([0, 2]))
    reader = MemoryReader(memory, short_term_size=2)
    with torch.no_grad():
        reader.recency_bias.copy_(torch.tensor([10.0, 20.0, 30.0]))
    items, visible, bias = reader.read(torch.tensor([0]), torch.tensor([[7, 8, 9]]))
    assert items.tolist() == [[8, 9, 5, 6]] and visible.all()
    assert bias.tolist() == [[20.0, 10.0, 30.0, 30.0]]


# --------------------------------------------------------------------------- the model's relevance and availability


def test_relevance_is_content_cosine_and_id_cosine_where_either_item_lacks_content():
    features = make_features(text=0.5, image=0.3, seed=1)
    model = make_model(features).eval()
    has = model.item_content_mask
    assert (~has[1:]).any() and has.any()
    items = torch.arange(N_ITEMS + 1)
    got = model._relevance(items, items)
    unit = torch.nn.functional.normalize(model.item_embedding.weight.detach(), dim=-1)
    content = model.item_content
    for a in range(N_ITEMS + 1):
        for b in range(N_ITEMS + 1):
            expected = content[a] @ content[b] if has[a] and has[b] else unit[a] @ unit[b]
            assert got[a, b].item() == pytest.approx(expected.item(), abs=1e-5), (a, b)


def test_modality_availability_per_expert_and_fusion_attends_only_to_the_candidates_tokens():
    features = make_features(text=0.5, image=0.5, seed=2)
    model = make_model(features).eval()
    users = torch.arange(N_USERS)
    ids = torch.randint(1, N_ITEMS + 1, (N_USERS, T), generator=torch.Generator().manual_seed(1))
    candidates = torch.arange(1, N_ITEMS + 1)
    out = model(users, ids, candidates, need_weights=True)
    names = list(out.expert_names)
    has_image = torch.from_numpy(features.item_image_mask[1:])
    has_text = torch.from_numpy(features.item_text_mask[1:])
    fusion = out.cross_attentions["fusion"].expand(N_USERS, -1, -1)
    only_image, only_text = has_image & ~has_text, has_text & ~has_image
    assert only_image.any() and only_text.any() and (has_image & has_text).any() and (~has_image & ~has_text).any()
    assert (fusion[:, only_image] == torch.tensor([1.0, 0.0])).all()
    assert (fusion[:, only_text] == torch.tensor([0.0, 1.0])).all()
    assert (fusion[:, has_image & has_text] > 0).all()
    assert torch.equal(out.available[..., names.index("fusion")], (has_image | has_text).expand(N_USERS, -1))
    with torch.no_grad():  # the fusion tokens' values: alignment.visual of the image, alignment.text of the text
        fusion_out = model.experts["fusion"].out
        image_only = fusion_out(model.alignment.visual(model.item_image[1:]))[only_image]
        text_only = fusion_out(model.alignment.text(model.item_text[1:]))[only_text]
    assert torch.allclose(out.expert_outputs["fusion"][0, only_image], image_only, atol=1e-5)
    assert torch.allclose(out.expert_outputs["fusion"][0, only_text], text_only, atol=1e-5)
    # the semantic expert's query is the ID embedding: it needs texts in memory, not on the candidate
    entries = out.memory_items.gather(1, out.memory_slots.flatten(1)).view_as(out.memory_slots)
    memory_text = torch.from_numpy(features.item_text_mask)[entries].any(-1)  # (N, C)
    assert torch.equal(out.available[..., names.index("semantic")], memory_text)
    assert (memory_text[:, ~has_text]).any()


# --------------------------------------------------------------------------- scoring and synthetic data


def test_score_in_chunks_equals_one_product():
    generator = torch.Generator().manual_seed(0)
    users, items = torch.randn(3, 4, generator=generator), torch.randn(11, 4, generator=generator)
    assert torch.allclose(score_in_chunks(users, items, chunk_size=4), score(users, items), atol=1e-6)
    assert torch.allclose(score(users, items[None].expand(3, -1, -1)), users @ items.T, atol=1e-6)


def test_synthetic_users_mostly_step_to_the_successor_on_one_hidden_cycle():
    raw = make_synthetic(n_users=80, n_items=30, mean_length=20, noise=0.1, seed=0)
    sequences = {}
    for user, item, stamp in zip(raw.users, raw.items, raw.timestamps):
        sequences.setdefault(user, []).append((int(stamp), int(item)))
    pairs = []
    for events in sequences.values():
        stamps = [s for s, _ in events]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)  # strictly increasing times
        pairs += list(zip([i for _, i in events][:-1], [i for _, i in events][1:]))
    counts = np.zeros((31, 31))
    for a, b in pairs:
        counts[a, b] += 1
    successor = counts.argmax(1)
    share = sum(counts[a, successor[a]] for a in range(1, 31)) / len(pairs)
    assert 0.85 < share < 0.95  # 1 - noise, plus the noise steps that land on the successor
    cycle, item = [], 1  # the successors form one cycle through every item
    for _ in range(30):
        cycle.append(item)
        item = int(successor[item])
    assert item == 1 and sorted(cycle) == list(range(1, 31))
    genres = [raw.item_meta[str(i)].genres[0] for i in cycle]
    changes = sum(a != b for a, b in zip(genres, genres[1:] + genres[:1]))
    assert changes <= len(SYNTHETIC_GENRES)  # genres are contiguous arcs of the cycle


def test_combined_item_features_are_unit_rows_of_equally_weighted_modalities():
    features = make_features(text=0.6, image=0.6, seed=3)
    combined = combined_item_features(features)
    has_text, has_image = features.item_text_mask, features.item_image_mask
    norms = np.linalg.norm(combined, axis=1)
    assert np.allclose(norms[has_text | has_image], 1.0, atol=1e-5) and (norms[~(has_text | has_image)] == 0).all()
    both = np.flatnonzero(has_text & has_image)[:2]
    a, b = both
    expected = (features.item_text[a] @ features.item_text[b] + features.item_image[a] @ features.item_image[b]) / 2
    assert combined[a] @ combined[b] == pytest.approx(expected, abs=1e-5)
