import pytest
import torch
import torch.nn.functional as F

from ur4rec.config import Config, ModelConfig
from ur4rec.models.losses import full_softmax_cross_entropy, recommendation_loss
from ur4rec.models.losses import sample_negatives as training_negatives
from ur4rec.models.sasrec import SASRec, attention_mask


def make_model(dropout=0.0, layers=2, heads=2):
    torch.manual_seed(0)
    return SASRec(ModelConfig(hidden_size=16, num_layers=layers, num_heads=heads, dropout=dropout), n_items=30, max_len=8)


def test_attention_mask_never_has_an_empty_row():
    valid = torch.tensor([[False] * 5, [False, False, True, True, True], [True] * 5])
    mask = attention_mask(valid)  # (B, 1, T, T)
    assert mask.any(dim=-1).all()
    # a real query sees only real keys at or before it
    assert mask[1, 0, 3].tolist() == [False, False, True, True, False]
    # a padded query sees only itself
    assert mask[1, 0, 0].tolist() == [True, False, False, False, False]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 64, 4096])
def test_values_and_gradients_finite_with_padding_rows(batch_size):
    model = make_model(dropout=0.3)
    model.train()
    ids = torch.randint(1, 31, (batch_size, 8))
    ids[0] = 0  # an all-padding row
    if batch_size > 1:
        ids[1, :-1] = 0  # a length-1 history
    out = model(ids, need_weights=True)
    assert torch.isfinite(out.states).all()
    assert all(torch.isfinite(w).all() for w in out.attentions)
    targets = torch.randint(1, 31, (batch_size,))
    loss = recommendation_loss("ce", out.states[:, -1], targets, model.item_vectors())
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_padded_positions_are_zero_and_do_not_influence_real_ones():
    model = make_model()
    model.eval()
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9]])
    states = model(ids).states
    assert (states[0, :3] == 0).all()
    # the same history without the padding columns gives the same last state
    shorter = model(torch.tensor([[5, 6, 7, 8, 9]])).states
    assert torch.allclose(states[0, -1], shorter[0, -1], atol=1e-6)


def test_every_block_reads_and_writes_zeros_at_padded_positions():
    model = make_model().eval()
    with torch.no_grad():  # non-zero LayerNorm biases: LN(0) is no longer 0
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.normal_()
    seen = []
    for block in model.backbone.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(("in", args[0].detach().clone())))
        block.register_forward_hook(lambda module, args, out: seen.append(("out", out[0].detach().clone())))
    model(torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9]]))
    assert [kind for kind, _ in seen] == ["in", "out"] * len(model.backbone.blocks)
    for kind, x in seen:
        assert (x[0, :3] == 0).all() and (x[0, 3:] != 0).any(), kind


def test_causality_future_items_do_not_change_past_states():
    model = make_model()
    model.eval()
    a = model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])).states
    b = model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 20]])).states
    assert torch.allclose(a[0, :-1], b[0, :-1], atol=1e-6)
    assert not torch.allclose(a[0, -1], b[0, -1])


def test_attention_weights_are_distributions_over_allowed_keys():
    model = make_model()
    model.eval()
    ids = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]])
    weights = model(ids, need_weights=True).attentions[0]  # (B, nh, T, T)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 2, 8))
    assert (weights[0, :, 4, :2] == 0).all()  # padding keys get nothing
    assert (weights[0, :, 4, 5:] == 0).all()  # future keys get nothing


def test_dropout_config_reaches_the_model():
    model = make_model(dropout=0.4)
    rates = {m.p for m in model.modules() if m.__class__.__name__ == "Dropout"}
    assert rates == {0.4}


def test_dropout_keeps_the_expected_fraction():
    from ur4rec.models.sasrec import Dropout

    torch.manual_seed(0)
    layer = Dropout(0.25).train()
    out = layer(torch.ones(200_000))
    assert (out == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    # every byte of the random words is uniform: no position within a 64-bit word is biased
    by_byte = (out == 0).float().view(-1, 8).mean(0)
    assert torch.allclose(by_byte, torch.full((8,), 0.25), atol=0.015)
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.equal(layer.eval()(torch.ones(5)), torch.ones(5))
    # exactly p = threshold/256 dropped and the rest scaled by 256/(256 - threshold): the mean is kept
    # (a byte > threshold instead of >= drops one 256th more, which the tolerances above let through)
    layer = Dropout(0.5).train()
    out = layer(torch.ones(2_000_000))
    assert (out == 0).float().mean().item() == pytest.approx(0.5, abs=0.0015)
    assert out.mean().item() == pytest.approx(1.0, abs=0.003)


def test_a_dropout_that_rounds_to_everything_is_refused_before_training():
    from ur4rec.config import ConfigError
    from ur4rec.models.sasrec import Dropout

    # before: accepted, and the first training step divided by 256 - 256 (ZeroDivisionError)
    with pytest.raises(ConfigError, match="model.dropout must be in"):
        Config().override(["model.dropout=0.999"])
    with pytest.raises(ValueError, match="dropout must be in"):
        Dropout(0.999)
    layer = Dropout(0.998).train()  # rounds to 255/256, the most there is
    assert layer(torch.ones(1000)).isfinite().all()
    assert Config().override(["model.dropout=0.998"]).model.dropout == 0.998


@pytest.mark.parametrize("rows, chunk, smoothing", [(1, 512, 0.0), (7, 3, 0.0), (64, 64, 0.0), (300, 128, 0.0),
                                                    (7, 3, 0.1), (300, 128, 0.3)])
def test_chunked_cross_entropy_matches_the_unchunked_one(rows, chunk, smoothing):
    torch.manual_seed(rows)
    states = (3 * torch.randn(rows, 16)).requires_grad_()  # large logits: the softmax must be stable
    items = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (rows,))
    fused = full_softmax_cross_entropy(states, items, targets, chunk, smoothing)
    (2.5 * fused).backward()  # a non-unit upstream gradient must be applied
    grads = states.grad.clone(), items.grad.clone()
    states.grad = items.grad = None
    reference = F.cross_entropy(states @ items.T, targets, label_smoothing=smoothing)
    (2.5 * reference).backward()
    assert torch.allclose(fused, reference, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grads[0], states.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grads[1], items.grad, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_under_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    states = torch.randn(50, 16, requires_grad=True)
    items = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (50,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = full_softmax_cross_entropy(states, items, targets, 16)
    fused.backward()
    assert fused.dtype == torch.float32 and states.grad.dtype == items.grad.dtype == torch.float32
    s, v = states.detach().clone().requires_grad_(), items.detach().clone().requires_grad_()
    reference = F.cross_entropy(s @ v.T, targets)
    reference.backward()
    assert abs(fused.item() - reference.item()) < 0.01 * reference.item()
    for bf16, fp32 in ((states.grad, s.grad), (items.grad, v.grad)):  # bf16 rounding, not a wrong gradient
        assert F.cosine_similarity(bf16.flatten(), fp32.flatten(), dim=0) > 0.999


def test_padded_states_stay_zero_when_layernorm_biases_are_not():
    model = make_model().eval()  # LN(0) = bias: zero only while the biases are
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.normal_()
    states = model(torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9]])).states
    assert (states[0, :3] == 0).all() and (states[0, 3:] != 0).any()


def test_recommendation_losses_match_their_formulas():
    torch.manual_seed(0)
    states, table = torch.randn(6, 4), torch.randn(9, 4)  # 8 items + the padding row 0
    targets = torch.tensor([1, 8, 3, 3, 5, 2])
    negatives = torch.tensor([[2, 4], [1, 7], [5, 6], [8, 1], [3, 4], [6, 7]])
    ce = recommendation_loss("ce", states, targets, table, smoothing=0.1)
    assert torch.allclose(ce, F.cross_entropy(states @ table[1:].T, targets - 1, label_smoothing=0.1), atol=1e-6)
    positive = (states * table[targets]).sum(-1)
    negative = torch.einsum("nd,nkd->nk", states, table[negatives])
    assert torch.allclose(recommendation_loss("bpr", states, targets, table, negatives),
                          F.softplus(negative - positive[:, None]).mean(), atol=1e-6)
    assert torch.allclose(recommendation_loss("bce", states, targets, table, negatives),
                          (F.softplus(-positive) + F.softplus(negative).mean(-1)).mean(), atol=1e-6)


@pytest.mark.parametrize("name", ["bpr", "bce"])
def test_sampled_losses_give_the_same_gradient_every_time_on_two_threads(name):
    # a popular item's gradient is a sum over every row that holds it: gathered by indexing, two
    # threads added those terms in whatever order they reached them (8 different gradients in 8
    # backward passes of this size); F.embedding adds them in a fixed order
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator = torch.Generator().manual_seed(0)
        table = torch.randn(50, 64, generator=generator, requires_grad=True)
        states = torch.randn(100_000, 64, generator=generator)
        targets = torch.randint(1, 50, (100_000,), generator=generator)
        negatives = torch.randint(1, 50, (100_000, 2), generator=generator)
        gradients = set()
        for _ in range(4):
            table.grad = None
            recommendation_loss(name, states, targets, table, negatives).backward()
            gradients.add(table.grad.numpy().tobytes())
        assert len(gradients) == 1
    finally:
        torch.set_num_threads(threads)


def test_training_negatives_are_real_items_other_than_the_target():
    targets = torch.arange(1, 6).repeat(2000)
    negatives = training_negatives(targets, 5, 8, torch.Generator().manual_seed(0))
    assert (negatives != targets[:, None]).all() and negatives.min() >= 1 and negatives.max() <= 5
    assert set(negatives[targets == 3].unique().tolist()) == {1, 2, 4, 5}
