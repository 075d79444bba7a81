"""The Stage-2/3 objectives and their optimisation, each against a direct computation: which
tokens and targets every loss term covers, where its gradient goes (and does not go), the
configured weights and learning-rate scales, per-group gradient clipping, the learned loss
weights, and what a partially saved group does on loading (audit of the stage trainer)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_run import replace_weights, save_stage1

from ur4rec.models.losses import load_balancing_loss
from ur4rec.rundir import prepare_run
from ur4rec.training import stages
from ur4rec.training.stages import (
    STAGES,
    StageLoadError,
    apply_stage,
    build_ur4rec,
    load_stage_weights,
    train_stage,
    training_losses,
)


def batch_of(config, dataset, n=8):
    """(x, y, t, users) of the first ``n`` Stage-1 windows."""
    inputs, targets, users, times = stages._checked_windows(dataset, config.data.max_len)
    return tuple(torch.from_numpy(array[:n]) for array in (inputs, targets, times, users))


def stage3_model(config, dataset, features, seed=0):
    """A Stage-3 model in eval mode (no dropout: a direct computation sees the same scores)."""
    torch.manual_seed(seed)
    model = build_ur4rec(config, dataset, features).eval()
    with torch.no_grad():  # trained-looking embeddings: a non-trivial backbone and router
        model.item_embedding.weight[1:].normal_(0, 0.3)
    return model, apply_stage(model, STAGES[3])


def spy_score_rows(model, monkeypatch):
    """Keep the output of the (single) score_rows call of training_losses in the returned dict."""
    seen = {}
    real = model.score_rows

    def spy(rows, candidates, *args, **kwargs):
        seen["out"] = real(rows, candidates, *args, **kwargs)
        return seen["out"]

    monkeypatch.setattr(model, "score_rows", spy)
    return seen


# --------------------------------------------------------------------------- loss terms against a direct computation


def test_stage3_backbone_loss_is_the_smoothed_full_softmax_over_every_real_target(setup):
    # pins: the backbone term covers every real target (not the rows_per_window drawn) with train.label_smoothing
    config, dataset, features = setup
    config = config.override(["moe.rows_per_window=3", "train.label_smoothing=0.3", "train.loss=ce"])
    model, _ = stage3_model(config, dataset, features)
    x, y, t, users = batch_of(config, dataset)
    assert (y > 0).sum(1).clamp(max=3).sum() < (y > 0).sum()  # the draw of 3 rows per window leaves targets out
    loss = training_losses(model, x, y, t, users, config, torch.Generator().manual_seed(0),
                           train_backbone=True)["backbone"]
    states, _ = model.encode(x)
    logits = states[y > 0] @ model.item_embedding.weight[1:].T  # (N, V): every real target, all items
    expected = F.cross_entropy(logits, y[y > 0] - 1, label_smoothing=0.3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    unsmoothed = F.cross_entropy(logits, y[y > 0] - 1)
    assert abs(unsmoothed.item() - expected.item()) > 1e-3  # the smoothing matters here


def test_load_balance_is_over_the_user_target_tokens_only(setup, monkeypatch):
    # pins: the Switch load-balancing loss is E * sum_k f_k P_k over the targets' (row, target) tokens,
    # not over every (row, candidate) token
    config, dataset, features = setup
    model, _ = stage3_model(config, dataset, features)
    seen = spy_score_rows(model, monkeypatch)
    x, y, t, users = batch_of(config, dataset)
    loss = training_losses(model, x, y, t, users, config, torch.Generator().manual_seed(0))["load_balance"]
    out = seen["out"]
    weights, available = out.router_weights[:, 0].detach(), out.available[:, 0]  # sampled: the target is column 0
    weights = weights[available.any(-1)]
    E = weights.size(1)
    fraction = F.one_hot(weights.argmax(-1), E).float().mean(0)
    expected = E * (fraction * weights.mean(0)).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    over_all = load_balancing_loss(out.router_weights.detach(), out.available)
    assert abs(over_all.item() - expected.item()) > 1e-4  # the negatives' tokens would give another value
    # a stage that keeps the router frozen (Stage 2) has no load-balancing term: nothing it could train
    frozen = training_losses(model, x, y, t, users, config, torch.Generator().manual_seed(0), train_router=False)
    assert "load_balance" not in frozen and "recommendation" in frozen


def test_gate_off_leaves_the_router_out_of_training(setup):
    # pins: with moe.gate=none (the gate_off ablation) the experts and the router add nothing to the scores, so
    # no loss term reaches them or the backbone through them: no load-balancing term trains the router or,
    # through its input, the backbone (it did: the gate_off variant's backbone was not the full model's minus the MoE)
    config, dataset, features = setup
    config = config.override(["moe.gate=none"])
    model, trainable = stage3_model(config, dataset, features)
    x, y, t, users = batch_of(config, dataset)
    losses = training_losses(model, x, y, t, users, config, torch.Generator().manual_seed(0), train_router=True,
                             train_backbone=True)
    assert "load_balance" not in losses
    total = sum(value for name, value in losses.items() if name != "backbone")
    total.backward()
    for name in ("router", "backbone", *[g for g in trainable if g.startswith("experts.")]):
        assert all(p.grad is None or p.grad.abs().max().item() == 0.0 for p in trainable[name]), name


def test_load_balancing_loss_gradient_is_E_f_k_over_T():
    # pins: the load-balancing loss is differentiable in the router weights: d/dw_tk = E * f_k / T
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.5, 0.0], [0.0, 0.0, 0.2]])
    weights = logits.softmax(-1).requires_grad_(True)
    load_balancing_loss(weights).backward()
    fraction = torch.tensor([2, 1, 1]) / 4.0  # argmax per token: 0, 1, 0, 2
    assert weights.grad is not None
    assert torch.allclose(weights.grad, (3 * fraction / 4).expand(4, 3))


def test_load_balance_weight_is_the_configured_one(setup, monkeypatch):
    # pins: one training step weighs the raw load_balance term by moe.load_balance_weight
    config, dataset, features = setup
    config = config.override(["moe.load_balance_weight=0.37", "moe.alignment_weight=0.25"])
    model, trainable = stage3_model(config, dataset, features)
    raw = {}
    real = stages.training_losses

    def spy(*args, **kwargs):
        losses = real(*args, **kwargs)
        raw.update({name: value.item() for name, value in losses.items()})
        return losses

    monkeypatch.setattr(stages, "training_losses", spy)
    optimizer = torch.optim.AdamW([{"params": p, "lr_scale": 1.0} for p in trainable.values()], lr=1e-3)
    windows = tuple(array[:16] for array in stages._checked_windows(dataset, config.data.max_len))  # one batch
    terms = stages.train_multimodal_epoch(model, optimizer, trainable, windows, config, np.random.default_rng(0),
                                          torch.Generator().manual_seed(0), 1)
    assert raw["load_balance"] > 0
    assert terms["load_balance"] == pytest.approx(0.37 * raw["load_balance"], rel=1e-6)
    assert terms["alignment"] == pytest.approx(0.25 * raw["alignment"], rel=1e-6)
    assert terms["recommendation"] == pytest.approx(raw["recommendation"], rel=1e-6)


# --------------------------------------------------------------------------- where the gradient goes


def test_sampled_recommendation_loss_sends_no_gradient_to_the_base_scores(setup, monkeypatch):
    # pins: in Stage 3 the sampled recommendation term trains only the residual (d loss / d base scores = 0)
    config, dataset, features = setup
    model, trainable = stage3_model(config, dataset, features)
    seen = {}
    real = model.score_rows

    def spy(rows, candidates, *args, **kwargs):
        out = real(rows, candidates, *args, **kwargs)
        out.base_scores.retain_grad()
        seen["out"] = out
        return out

    monkeypatch.setattr(model, "score_rows", spy)
    x, y, t, users = batch_of(config, dataset)
    losses = training_losses(model, x, y, t, users, config, torch.Generator().manual_seed(0), train_backbone=True)
    losses["recommendation"].backward()
    base = seen["out"].base_scores
    assert base.grad is None or base.grad.abs().max().item() == 0.0
    assert trainable["gate"][0].grad.abs().item() > 0  # the residual does learn from it


def test_stage3_backbone_state_reaches_the_router_with_its_gradient(setup, monkeypatch):
    # pins: the router reads the backbone state undetached, so the recommendation loss trains the backbone through it
    config, dataset, features = setup
    model, _ = stage3_model(config, dataset, features)
    seen = {}

    def probe(module, args):
        vectors, states, *rest = args
        seen["requires_grad"] = states.requires_grad
        if states.requires_grad:
            states = states * 1.0  # this use only
            states.retain_grad()
            seen["states"] = states
        return (vectors, states, *rest)

    model.router.register_forward_pre_hook(probe)
    x, y, t, users = batch_of(config, dataset)
    losses = training_losses(model, x, y, t, users, config, torch.Generator().manual_seed(0), train_backbone=True)
    losses["recommendation"].backward()
    assert seen["requires_grad"], "the router gets a detached backbone state"
    assert seen["states"].grad is not None and seen["states"].grad.abs().sum().item() > 0


# --------------------------------------------------------------------------- the optimisation step


def test_gradients_are_clipped_per_parameter_group(setup, monkeypatch):
    # pins: train.grad_clip bounds each trainable group's gradient norm separately, not their joint norm
    config, dataset, features = setup
    clip = 1e-4  # below every group's gradient norm
    config = config.override([f"train.grad_clip={clip}"])
    model, trainable = stage3_model(config, dataset, features)
    optimizer = torch.optim.AdamW([{"params": p, "lr_scale": 1.0} for p in trainable.values()], lr=1e-3)
    norms = {}

    def record(*args, **kwargs):  # instead of the step: the gradient norms it would apply
        for name, params in trainable.items():
            norms[name] = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)).item()

    monkeypatch.setattr(optimizer, "step", record)
    windows = tuple(array[:16] for array in stages._checked_windows(dataset, config.data.max_len))  # one batch
    stages.train_multimodal_epoch(model, optimizer, trainable, windows, config, np.random.default_rng(0),
                                  torch.Generator().manual_seed(0), 1)
    assert {"backbone", "router", "gate"} <= set(norms)
    for name, norm in norms.items():
        assert norm == pytest.approx(clip, rel=1e-3), name  # each group clipped to the bound itself


@pytest.fixture
def stage1_run(setup, tmp_path):
    config, dataset, _ = setup
    prepare_run(tmp_path, config, dataset)
    save_stage1(setup, tmp_path / "stage1")
    return tmp_path


class _Stop(Exception):
    pass


def test_stage3_optimizer_scales_the_backbone_lr_and_learns_the_loss_weights(setup, stage1_run, monkeypatch):
    # pins: backbone lr = learning_rate * moe.backbone_lr_scale; with uncertainty weighting the log-variances
    # are in the optimizer and move in an epoch
    config, dataset, features = setup
    config = config.override(["moe.backbone_lr_scale=0.25", "moe.loss_weighting=uncertainty", "train.epochs=1",
                              "train.lr_schedule=constant", "train.warmup_epochs=0"])
    seen = {}
    real_epoch = stages.train_multimodal_epoch

    def one_epoch_then_stop(model, optimizer, trainable, windows, config, rng, generator, epoch, uncertainty=None):
        seen["before"] = {k: v.item() for k, v in uncertainty.log_variances.items()}
        real_epoch(model, optimizer, trainable, tuple(a[:16] for a in windows), config, rng, generator, epoch,
                   uncertainty)
        seen.update(model=model, optimizer=optimizer, uncertainty=uncertainty)
        raise _Stop

    monkeypatch.setattr(stages, "train_multimodal_epoch", one_epoch_then_stop)
    monkeypatch.setattr(stages, "fit_similarity", lambda *args, **kwargs: {})  # not what this test is about
    with pytest.raises(_Stop):
        train_stage(config, dataset, features, stage1_run, 3, skip_stage2=True)
    model, optimizer, uncertainty = seen["model"], seen["optimizer"], seen["uncertainty"]
    lr = config.train.learning_rate
    backbone = {id(p) for p in model.backbone.parameters()}
    backbone_lrs, other_lrs = [], []
    for group in optimizer.param_groups:
        owners = {id(p) in backbone for p in group["params"]}
        assert len(owners) == 1  # a group is all backbone or none of it
        (backbone_lrs if owners.pop() else other_lrs).append(group["lr"])
    assert backbone_lrs == [pytest.approx(0.25 * lr)]
    assert other_lrs and all(value == pytest.approx(lr) for value in other_lrs)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in uncertainty.parameters())
    after = {k: v.item() for k, v in uncertainty.log_variances.items()}
    assert set(after) == {"recommendation", "alignment", "load_balance", "backbone"}
    moved = [k for k in after if after[k] != seen["before"][k]]
    assert {"recommendation", "backbone"} <= set(moved), after


# --------------------------------------------------------------------------- loading


def test_a_required_group_missing_some_of_its_keys_is_a_load_error(setup, tmp_path):
    # pins: a group saved incompletely (one key of many missing) raises StageLoadError naming group and key
    config, dataset, features = setup
    save_stage1(setup, tmp_path / "stage1")
    state = load_file(str(tmp_path / "stage1" / "model.safetensors"))
    assert sum(key.startswith("backbone.") for key in state) > 1
    del state["backbone.final_norm.bias"]
    replace_weights(tmp_path / "stage1", state)
    model = build_ur4rec(config, dataset, features)
    before = model.item_embedding.weight.clone()
    with pytest.raises(StageLoadError, match=r"\['backbone'\].*missing \['backbone.final_norm.bias'\]"):
        load_stage_weights(model, tmp_path / "stage1", STAGES[2])
    assert torch.equal(model.item_embedding.weight, before)  # nothing half-loaded
