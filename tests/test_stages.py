import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_run import replace_weights, save_stage1

from ur4rec.evaluation import build_eval_inputs, evaluate, sample_negatives
from ur4rec.models.losses import combine_losses
from ur4rec.models.ur4rec_model import PARAMETER_GROUPS
from ur4rec.rundir import prepare_run
from ur4rec.training import stages
from ur4rec.training.stages import (
    STAGES,
    StageLoadError,
    StageOrderError,
    apply_stage,
    build_ur4rec,
    fit_similarity,
    group_of,
    load_stage_model,
    load_stage_weights,
    recent_items,
    sampled_candidates,
    stage_spec,
    train_stage,
    training_losses,
    window_positions,
)
from ur4rec.training.trainer import NonFiniteLossError, training_windows


@pytest.fixture(scope="module")
def three_stages(setup, tmp_path_factory):
    config, dataset, features = setup
    run = tmp_path_factory.mktemp("run")
    prepare_run(run, config, dataset)
    results = {stage: train_stage(config, dataset, features, run, stage) for stage in (1, 2, 3)}
    return run, results


def one_batch(config, dataset):
    windows = stages._checked_windows(dataset, config.data.max_len)
    rows = np.arange(8)
    return [torch.from_numpy(array[rows]) for array in (windows[0], windows[1], windows[3])] + \
        [torch.from_numpy(windows[2][rows])]


def test_sampled_candidates_hard_negatives_are_the_backbones_best_outside_the_window(setup):
    config, dataset, features = setup
    model = build_ur4rec(config, dataset, features).eval()
    V = dataset.n_items
    states = torch.randn(3, config.model.hidden_size)
    targets = torch.tensor([5, 6, 7])
    window = torch.tensor([[1, 2, 5], [6, 6, 6], [0, 7, 3]])
    candidates, left_out = sampled_candidates(model, states, targets, window, hard=4, uniform=50,
                                              generator=torch.Generator().manual_seed(0))
    assert candidates.shape == left_out.shape == (3, 1 + 4 + 50)
    assert (candidates[:, 0] == targets).all() and not left_out[:, 0].any()
    own = states @ model.item_vectors().detach().T  # (3, V + 1)
    for row in range(3):
        allowed = [i for i in range(1, V + 1) if i not in window[row].tolist()]
        best = sorted(allowed, key=lambda i: -own[row, i].item())[:4]
        assert sorted(candidates[row, 1:5].tolist()) == sorted(best)
    # a uniform draw equal to the target, to one of the row's hard negatives or to an earlier draw
    # leaves the softmax: no item counts twice in a row
    for row in range(3):
        kept = []
        for column in range(5, 55):
            item = candidates[row, column].item()
            assert left_out[row, column].item() == (item in candidates[row, :5].tolist() + kept), (row, column)
            kept += [] if left_out[row, column] else [item]
        assert left_out[row, 5:].any() and not left_out[row, 5:].all()
    # more hard negatives than items outside the window: the surplus is left out, never the target
    candidates, left_out = sampled_candidates(model, states, targets, torch.arange(1, V + 1).expand(3, -1),
                                              hard=3, uniform=0)
    assert left_out[:, 1:].all() and not left_out[:, 0].any()


# --------------------------------------------------------------------------- specs and gradients


def test_stage_specs_cover_every_group():
    for stage, spec in STAGES.items():
        assert not set(spec.train) & set(spec.freeze), stage
        assert set(spec.train) | set(spec.freeze) == set(PARAMETER_GROUPS), stage
        assert set(spec.load) <= set(PARAMETER_GROUPS)
    experts = tuple(f"experts.{name}" for name in ("visual", "semantic", "preference", "fusion"))
    assert set(STAGES[1].train) == {"item_embedding", "backbone"} and STAGES[1].load == ()
    assert set(STAGES[2].train) == {*experts, "alignment"}  # the experts and their projections
    assert set(STAGES[2].load) == {"item_embedding", "backbone"} and STAGES[2].previous == 1
    assert set(STAGES[3].train) == {"backbone", *experts, "alignment", "memory", "router", "gate"}
    assert STAGES[3].freeze == ("item_embedding", "similarity")  # similarity: fitted, not trained
    assert set(STAGES[3].load) == set(PARAMETER_GROUPS) and STAGES[3].previous == 2  # everything Stage 2 saved
    assert stage_spec(3, skip_stage2=True).previous == 1
    assert group_of("experts.visual.query.weight", PARAMETER_GROUPS) == "experts.visual"
    assert group_of("backbone.blocks.0.attention.qkv.weight", PARAMETER_GROUPS) == "backbone"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradients_reach_every_trained_group_and_no_frozen_one(setup, stage):
    config, dataset, features = setup
    torch.manual_seed(0)
    model = build_ur4rec(config, dataset, features)
    with torch.no_grad():
        model.item_embedding.weight[1:].normal_(0, 0.3)
    spec = STAGES[stage]
    trainable = apply_stage(model, spec)
    assert set(trainable) == set(spec.train)
    x, y, t, users = one_batch(config, dataset)
    losses = training_losses(model, x, y, t, users, config, torch.Generator().manual_seed(0), "router" in trainable,
                             "backbone" in trainable)
    assert {"recommendation", "alignment"} <= set(losses) and ("backbone" in losses) == (stage != 2)
    combine_losses(losses, {"alignment": 0.1, "load_balance": 0.01})["total"].backward()
    groups = model.parameter_groups()
    for name, module in groups.items():
        grads = [p.grad for p in module.parameters()]
        if name in spec.train:
            dead = [f"{name}.{key}" for key, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not dead, f"no gradient reaches {dead}"
            assert all(torch.isfinite(g).all() for g in grads if g is not None), name
        else:
            assert all(g is None for g in grads), f"frozen {name} got a gradient"


def test_the_collaborative_similarity_is_built_from_the_train_parts_only(setup):
    # other users' held-out items must not reach the co-occurrence counts: replace every user's
    # validation and test item and the model's similarity buffers stay the same
    config, dataset, features = setup
    held_out = dataclasses.replace(dataset, sequences=[np.concatenate([s[:-2], (s[-2:] % dataset.n_items) + 1])
                                                       for s in dataset.sequences], fingerprint="")
    assert all((a[-2:] != b[-2:]).all() for a, b in zip(dataset.sequences, held_out.sequences))
    a, b = (build_ur4rec(config, d, features).similarity for d in (dataset, held_out))
    assert "collaborative" in a.sources
    assert torch.equal(a.matrices, b.matrices) and torch.equal(a.member_scaled, b.member_scaled)


def test_similarity_weights_are_fitted_to_the_validation_cross_entropy(setup):
    # fit_similarity minimises the cross-entropy of the held-out targets over the weights only:
    # at its result the gradient is ~0, the loss is no higher than at 0, and nothing else moved.
    config, dataset, features = setup
    torch.manual_seed(0)
    model = build_ur4rec(config, dataset, features).eval()
    with torch.no_grad():
        model.item_embedding.weight[1:].normal_(0, 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("similarity")}
    inputs = build_eval_inputs(dataset, "valid", config.data.max_len,
                               sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed))

    def validation_loss(weight):
        with torch.no_grad():
            model.similarity.weight.copy_(weight)
            scores = model.score_all(inputs.users, inputs.input_ids).float()
        excluded = torch.zeros_like(scores, dtype=torch.bool)
        excluded[:, 0] = True
        excluded.scatter_(1, inputs.seen, True)
        excluded[torch.arange(len(scores)), inputs.targets] = False
        return F.cross_entropy(scores.masked_fill(excluded, float("-inf")), inputs.targets).item()

    fitted = fit_similarity(model, inputs, config)
    assert set(fitted) == {"text", "collaborative"}
    w = torch.tensor([fitted["text"], fitted["collaborative"]])
    assert torch.equal(model.similarity.weight.detach(), w)
    loss = validation_loss(w)
    assert loss < validation_loss(torch.zeros(2)) - 1e-4
    for k in range(2):  # a stationary point: a step either way along each weight costs loss
        for step in (-0.05, 0.05):
            assert validation_loss(w + step * torch.eye(2)[k]) >= loss - 1e-6
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_similarity_weights_are_only_ever_fitted_on_validation_items(setup, three_stages, tmp_path, monkeypatch):
    config, dataset, features = setup
    run, _ = three_stages
    prepare_run(tmp_path, config, dataset)
    shutil.copytree(run / "stage1", tmp_path / "stage1")
    fitted_on = []
    fit = stages.fit_similarity

    def spy(model, inputs, config, *args, **kwargs):
        fitted_on.append(inputs.targets.clone())
        return fit(model, inputs, config, *args, **kwargs)

    monkeypatch.setattr(stages, "fit_similarity", spy)
    train_stage(config.override(["train.epochs=2"]), dataset, features, tmp_path, 2)
    negatives = sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
    valid = build_eval_inputs(dataset, "valid", config.data.max_len, negatives).targets
    test = build_eval_inputs(dataset, "test", config.data.max_len, negatives).targets
    assert not torch.equal(valid, test)
    assert len(fitted_on) == 3 and all(torch.equal(targets, valid) for targets in fitted_on)  # epoch 0, 1, 2


# --------------------------------------------------------------------------- loading


def test_stage1_groups_load_and_a_missing_group_is_an_error(setup, tmp_path):
    config, dataset, features = setup
    sasrec = save_stage1(setup, tmp_path / "stage1")
    model = build_ur4rec(config, dataset, features)
    report = load_stage_weights(model, tmp_path / "stage1", STAGES[2])
    assert report.loaded["item_embedding"] == 1 and report.loaded["backbone"] == len(sasrec.backbone.state_dict())
    assert not any(report.missing.values()) and not any(report.unexpected.values())
    assert torch.equal(model.item_embedding.weight, sasrec.item_embedding.weight)
    assert torch.equal(model.backbone.final_norm.weight, sasrec.backbone.final_norm.weight)

    weights = tmp_path / "stage1" / "model.safetensors"
    state = load_file(str(weights))
    del state["item_embedding.weight"]
    state["backbone.extra.weight"] = torch.zeros(2)
    replace_weights(tmp_path / "stage1", state)
    fresh = build_ur4rec(config, dataset, features)
    before = fresh.backbone.final_norm.bias.clone()
    with pytest.raises(StageLoadError, match=r"\['item_embedding', 'backbone'\].*missing \['item_embedding.weight'\]"
                                             r".*unexpected \['backbone.extra.weight'\]"):
        load_stage_weights(fresh, tmp_path / "stage1", STAGES[2])
    assert torch.equal(fresh.backbone.final_norm.bias, before)  # nothing half-loaded


def test_the_load_report_lists_the_checkpoint_keys_outside_the_loaded_groups(setup, three_stages):
    config, dataset, features = setup
    run, _ = three_stages
    saved = load_file(str(run / "stage2" / "model.safetensors"))
    model = build_ur4rec(config, dataset, features)
    report = load_stage_weights(model, run / "stage2", stages.stage_spec(3, skip_stage2=True))  # Stage 1's groups only
    assert set(report.loaded) == {"item_embedding", "backbone"}
    outside = sorted(key for key in saved if not key.startswith(("item_embedding.", "backbone.")))
    assert outside and report.not_loaded == outside  # the experts, router, gate ... of the file, left as built
    assert report.as_dict()["not_loaded"] == outside


def test_stages_2_3_train_with_deterministic_kernels_and_put_the_switch_back(setup, tmp_path, monkeypatch):
    # the backward of indexing a trainable table (memory values, candidate tables) adds repeated
    # indices' gradients in thread order unless PyTorch's deterministic kernels are on: two Stage-3
    # runs of one seed on ML-100K gave different weights
    config, dataset, features = setup
    prepare_run(tmp_path, config, dataset)
    save_stage1(setup, tmp_path / "stage1")
    seen = []
    real = stages.train_multimodal_epoch

    def spy(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "train_multimodal_epoch", spy)
    assert not torch.are_deterministic_algorithms_enabled()
    train_stage(config.override(["moe.stage_epochs=2"]), dataset, features, tmp_path, 2)
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()


def test_a_reshaped_key_is_a_load_error_and_nothing_loads(setup, tmp_path):
    config, dataset, features = setup
    save_stage1(setup, tmp_path / "stage1")
    weights = tmp_path / "stage1" / "model.safetensors"
    state = load_file(str(weights))
    state["backbone.final_norm.weight"] = torch.ones(1)  # broadcastable, so a plain copy_ would take it
    replace_weights(tmp_path / "stage1", state)
    model = build_ur4rec(config, dataset, features)
    before = model.item_embedding.weight.clone()
    with pytest.raises(StageLoadError, match=r"shape mismatch \['backbone.final_norm.weight'\]"):
        load_stage_weights(model, tmp_path / "stage1", STAGES[2])
    assert torch.equal(model.item_embedding.weight, before)


def test_a_previous_stage_from_other_data_or_without_weights_is_refused(setup, three_stages, tmp_path):
    config, dataset, features = setup
    run, _ = three_stages
    prepare_run(tmp_path, config, dataset)
    shutil.copytree(run / "stage1", tmp_path / "stage1")
    info_path = tmp_path / "stage1" / "checkpoint.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "data_fingerprint": "0123456789abcdef"}))
    with pytest.raises(StageOrderError, match="trained on data 0123456789abcdef"):
        train_stage(config, dataset, features, tmp_path, 2)
    info_path.write_text(json.dumps(info))
    (tmp_path / "stage1" / "model.safetensors").unlink()
    with pytest.raises(StageOrderError, match="model.safetensors is missing"):
        train_stage(config, dataset, features, tmp_path, 2)
    assert not (tmp_path / "stage2").exists()


def test_a_previous_stage_built_with_other_heads_or_features_is_refused(setup, three_stages, tmp_path):
    """Same shapes, other computation: before, these loaded without a word and Stage 2/3 trained on a
    backbone whose heads split the matrices differently, or on experts fitted to other features."""
    from tiny_run import random_features

    config, dataset, features = setup
    run, _ = three_stages
    prepare_run(tmp_path, config, dataset)
    shutil.copytree(run / "stage1", tmp_path / "stage1")
    shutil.copytree(run / "stage2", tmp_path / "stage2")
    other_heads = config.override([f"model.num_heads={2 * config.model.num_heads}"])
    with pytest.raises(StageOrderError, match=f"model.num_heads {config.model.num_heads}, this config has "
                                              f"{2 * config.model.num_heads}"):
        train_stage(other_heads, dataset, features, tmp_path, 2)
    with pytest.raises(StageOrderError, match="moe.semantic_heads"):
        train_stage(config.override(["moe.semantic_heads=1"]), dataset, features, tmp_path, 3)
    with pytest.raises(StageOrderError, match="trained with other features"):
        train_stage(config, dataset, random_features(dataset, seed=1), tmp_path, 3)
    # Stage 1 uses no features: Stage 2 (or Stage 3 skipping it) may start from it with any
    assert stages.check_previous_stage(tmp_path, stages.stage_spec(3, True), dataset.fingerprint, True, config,
                                       random_features(dataset, seed=1)) == tmp_path / "stage1"
    assert not (tmp_path / "stage3").exists()


def test_reloading_a_stage_with_other_features_says_how_to_get_its_own_back(setup, three_stages):
    from tiny_run import random_features

    from ur4rec.training.checkpoint import CheckpointError

    _, dataset, _ = setup
    run, _ = three_stages
    with pytest.raises(CheckpointError, match=r"stage2 was trained with other features .*manifest.json now names "
                                              r"other feature sets\. Build the ones it used again"):
        stages.load_stage_model(run / "stage2", random_features(dataset, seed=1), dataset)


def test_a_stage_does_not_start_from_an_unfinished_previous_stage(setup, three_stages, tmp_path):
    # a Stage 1 stopped before its final evaluation (no metrics.json) is started over by the next
    # `train --stage 1`, which would then move a Stage 2 built on it over the finished stage2.prev
    config, dataset, features = setup
    run = tmp_path / "run"
    shutil.copytree(three_stages[0], run)
    (run / "stage1" / "metrics.json").unlink()
    before = {f.name: f.read_bytes() for f in (run / "stage2").iterdir() if f.is_file()}
    for stage in (2, 3):
        with pytest.raises(StageOrderError, match=r"it never finished \(no metrics.json"):
            train_stage(config, dataset, features, run, stage, skip_stage2=stage == 3)
    assert {f.name: f.read_bytes() for f in (run / "stage2").iterdir() if f.is_file()} == before
    assert not (run / "stage2.prev").exists()


def test_stage3_needs_stage2_groups_from_a_stage2_checkpoint(setup, tmp_path):
    config, dataset, features = setup
    save_stage1(setup, tmp_path / "stage1")
    model = build_ur4rec(config, dataset, features)
    with pytest.raises(StageLoadError, match="experts.visual"):  # a Stage-1 file has no experts
        load_stage_weights(model, tmp_path / "stage1", STAGES[3])


def test_memory_is_built_from_the_train_part_only(setup):
    config, dataset, features = setup
    memory = stages.build_user_memory(dataset, features, config)
    for user in range(dataset.n_users):
        train = set(dataset.train_sequence(user).tolist())
        rows = memory.items[memory.offsets[user]:memory.offsets[user + 1]]  # every snapshot of the user
        assert len(rows) == len(train_sequence := dataset.train_sequence(user)) + 1
        stored = set(rows[rows > 0].tolist())
        assert stored <= train, user  # so no validation or test item that is not also a train item
        for position in range(len(train_sequence) + 1):  # nothing from the target's position on
            assert set(memory.snapshot(user, position)) <= set(train_sequence[:position].tolist())


def test_training_rows_read_memory_and_history_from_before_their_target(setup, monkeypatch):
    config, dataset, features = setup
    model = build_ur4rec(config, dataset, features)
    calls = {}
    read_memory, score_rows = model.read_memory, model.score_rows

    def read_spy(users, states, recent, before=None):
        rows = read_memory(users, states, recent, before)
        calls["read"] = (users, recent, before, rows.memory_items)
        return rows

    def score_spy(rows, candidates, *args, **kwargs):
        calls["targets"] = candidates[:, 0]  # sampled mode: the target is each row's first candidate
        return score_rows(rows, candidates, *args, **kwargs)

    monkeypatch.setattr(model, "read_memory", read_spy)
    monkeypatch.setattr(model, "score_rows", score_spy)
    x, y, t, users = one_batch(config, dataset)
    training_losses(model, x, y, t, users, config, torch.Generator().manual_seed(0))
    row_users, recent, before, memory_items = calls["read"]
    assert before is not None and len(row_users) == len(calls["targets"]) == int((y > 0).sum(1).clamp(
        max=config.moe.rows_per_window).sum())  # up to rows_per_window targets of each of the 8 windows
    W = model.memory.short_term_size
    for r in range(len(row_users)):
        sequence = dataset.train_sequence(int(row_users[r]))
        position = int(before[r])
        assert sequence[position] == calls["targets"][r], r  # ``before`` is the target's own train position
        history = sequence[:position].tolist()
        real = recent[r][recent[r] > 0].tolist()  # the short-term tier and the similarity terms read these
        assert 0 < len(real) <= position and real == history[len(history) - len(real):], r
        stored = set(memory_items[r][W:][memory_items[r][W:] > 0].tolist())
        assert stored <= set(history), r  # the long-term tier as it stood just before the target


def test_window_positions_match_training_windows(setup):
    config, dataset, _ = setup
    inputs, targets = training_windows(dataset, config.data.max_len)
    users, times = window_positions(dataset, config.data.max_len)
    assert len(users) == len(inputs) and times.shape == targets.shape
    for row in range(len(users)):
        sequence = dataset.train_sequence(users[row])
        real = targets[row] > 0
        assert (sequence[times[row][real]] == targets[row][real]).all()
        assert (sequence[times[row][real] - 1] == inputs[row][real]).all()  # the input just before


# --------------------------------------------------------------------------- training runs


def test_three_stages_write_the_run_directory(setup, three_stages):
    config, dataset, features = setup
    run, results = three_stages
    for stage in (2, 3):
        folder = run / f"stage{stage}"
        for name in ["model.safetensors", "checkpoint.json", "log.jsonl", "metrics.json", "valid_ranks.csv",
                     "test_ranks.csv", "internals/router_weights.csv", "internals/expert_contributions.csv", "internals/gate.json",
                     "internals/attention.npz"]:
            assert (folder / name).exists(), f"stage{stage}/{name}"
        info = json.loads((folder / "checkpoint.json").read_text())
        assert info["stage"] == stage and info["skipped"] == [] and info["loaded_from"]["stage"] == stage - 1
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        assert all({"epoch", "seconds", "gate", "losses", "train_loss", "valid"} <= set(r) for r in log)
        assert all("ndcg@10" in r["valid"]["full"] for r in log)
        for split in ("valid", "test"):
            header = (folder / f"{split}_ranks.csv").read_text().splitlines()[0]
            assert header == "user_id,target_item,rank_full,rank_sampled"
        assert {"recommendation", "alignment"} <= set(log[0]["losses"])
        gates = json.loads((folder / "internals/gate.json").read_text())["gate"]
        assert [g["epoch"] for g in gates] == list(range(len(log) + 1))
        # the best checkpoint is rebuilt from checkpoint.json + features + data and reproduces its metric
        model, _ = load_stage_model(folder, features, dataset)
        negatives = sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
        valid = evaluate(model, build_eval_inputs(dataset, "valid", config.data.max_len, negatives), config.eval)
        assert valid.metrics["full"]["ndcg@10"] == pytest.approx(info["best"]["value"], abs=1e-9)
        assert json.loads((folder / "metrics.json").read_text()) == results[stage].metrics
        header = (folder / "internals/router_weights.csv").read_text().splitlines()[0]
        assert header == "user_id,item_id,role,rank,visual,semantic,preference,fusion"
        rows = (folder / "internals/expert_contributions.csv").read_text().splitlines()
        assert len(rows) == 1 + dataset.n_users * 11
        attention = np.load(folder / "internals/attention.npz")
        assert attention["backbone_layer0"].shape[:2] == (5, 2) and attention["cross_visual"].shape[:2] == (5, 11)
    # stage 3 trains the gate (it moved); stage 2 kept item embedding and backbone frozen; stage 3 the embedding
    gates = json.loads((run / "stage3/internals/gate.json").read_text())["gate"]
    assert gates[-1]["gate"] != gates[0]["gate"]
    states = {stage: load_file(str(run / f"stage{stage}/model.safetensors")) for stage in (1, 2, 3)}
    assert all(torch.equal(states[1][k], states[2][k]) for k in states[1])
    assert torch.equal(states[1]["item_embedding.weight"], states[3]["item_embedding.weight"])


def test_internals_top10_ranks_like_evaluation_when_the_target_was_seen(setup, tmp_path):
    # a re-rated film: every user's test item is also in their train part. Full ranking keeps the
    # target in play, so the internals' top-10 must list it at the rank test_ranks.csv gives it
    config, dataset, features = setup
    rerated = dataclasses.replace(dataset, sequences=[np.concatenate([s[:-1], s[:1]]) for s in dataset.sequences],
                                  fingerprint="")
    torch.manual_seed(0)
    model = build_ur4rec(config, rerated, features).eval()
    with torch.no_grad():
        model.item_embedding.weight[1:].normal_(0, 0.3)
    inputs = build_eval_inputs(rerated, "test", config.data.max_len,
                               sample_negatives(rerated, config.eval.num_sampled_negatives, config.eval.sample_seed))
    result = evaluate(model, inputs, config.eval)
    stages.write_internals(tmp_path, model, rerated, inputs, result.rank_full, config)
    with open(tmp_path / "router_weights.csv") as f:
        rows = list(csv.DictReader(f))
    top = {(r["user_id"], int(r["rank"])): r["item_id"] for r in rows if r["role"] == "top"}
    targets = [r for r in rows if r["role"] == "target" and int(r["rank"]) <= 10]
    assert targets  # some targets rank in the top 10
    assert all(top[r["user_id"], int(r["rank"])] == r["item_id"] for r in targets)


def test_stage3_refuses_without_stage2_and_records_a_skip(setup, three_stages, tmp_path):
    config, dataset, features = setup
    run, _ = three_stages
    prepare_run(tmp_path, config, dataset)
    shutil.copytree(run / "stage1", tmp_path / "stage1")
    with pytest.raises(StageOrderError, match="stage3 needs a valid stage-2 checkpoint.*skip_stage2=True"):
        train_stage(config, dataset, features, tmp_path, 3)
    assert not (tmp_path / "stage3").exists()
    result = train_stage(config.override(["train.epochs=1"]), dataset, features, tmp_path, 3, skip_stage2=True)
    info = json.loads((tmp_path / "stage3/checkpoint.json").read_text())
    assert info["skipped"] == ["stage2"] and info["loaded_from"] == {"stage": 1, "groups": ["item_embedding", "backbone"]}
    assert result.epochs_run == 1 and (tmp_path / "stage3/metrics.json").exists()
    # a stage-1 checkpoint in the stage-2 folder is not a valid stage-2 checkpoint
    shutil.copytree(run / "stage1", tmp_path / "stage2")
    with pytest.raises(StageOrderError, match="says stage 1"):
        train_stage(config, dataset, features, tmp_path, 3)


def test_non_finite_loss_stops_and_names_the_term(setup, three_stages, tmp_path, monkeypatch):
    config, dataset, features = setup
    run, _ = three_stages
    prepare_run(tmp_path, config, dataset)
    shutil.copytree(run / "stage1", tmp_path / "stage1")
    monkeypatch.setattr(stages, "alignment_loss", lambda *args, **kwargs: torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"loss term 'alignment' is nan at epoch 1, step 0"):
        train_stage(config, dataset, features, tmp_path, 2)


def test_weights_left_non_finite_stop_stages_2_3_with_the_epoch_and_the_kept_checkpoint(setup, three_stages,
                                                                                        tmp_path, monkeypatch):
    config, dataset, features = setup
    run, _ = three_stages
    prepare_run(tmp_path, config, dataset)
    shutil.copytree(run / "stage1", tmp_path / "stage1")

    def nan_weights(model, *args, **kwargs):  # finite losses, NaN weights
        with torch.no_grad():
            next(iter(model.experts.parameters())).fill_(float("nan"))
        return {"total": 0.0}

    monkeypatch.setattr(stages, "train_multimodal_epoch", nan_weights)
    with pytest.raises(FloatingPointError, match="after epoch 1: its last steps left non-finite weights .*keeps the "
                                                 "checkpoint of epoch 0"):
        train_stage(config, dataset, features, tmp_path, 2)
    assert json.loads((tmp_path / "stage2" / "checkpoint.json").read_text())["epoch"] == 0


def test_a_rerun_that_fails_loses_no_finished_stage(setup, three_stages, tmp_path, monkeypatch):
    # retraining Stage 2 in a finished run, stopped by a non-finite loss: the finished Stage 2 and
    # the Stage 3 built on it are kept whole as stageN.prev; the new stage2/ has its last good checkpoint
    config, dataset, features = setup
    run = tmp_path / "run"
    shutil.copytree(three_stages[0], run)
    before = {n: {f.name: f.read_bytes() for f in (run / f"stage{n}").iterdir() if f.is_file()} for n in (1, 2, 3)}
    monkeypatch.setattr(stages, "alignment_loss", lambda *args, **kwargs: torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError):
        train_stage(config, dataset, features, run, 2)
    for n, folder in ((1, "stage1"), (2, "stage2.prev"), (3, "stage3.prev")):
        assert {f.name: f.read_bytes() for f in (run / folder).iterdir() if f.is_file()} == before[n], folder
    assert not (run / "stage3").exists()  # built from the Stage 2 that is now .prev: not left beside the new one
    assert {"model.safetensors", "checkpoint.json"} <= {f.name for f in (run / "stage2").iterdir()}
    assert not (run / "stage2" / "metrics.json").exists()  # no figures of a model that is not there
    # a second failed rerun starts the unfinished stage2 over and still keeps the finished one
    with pytest.raises(NonFiniteLossError):
        train_stage(config, dataset, features, run, 2)
    assert {f.name: f.read_bytes() for f in (run / "stage2.prev").iterdir() if f.is_file()} == before[2]


def test_a_stage_never_keeps_a_model_worse_than_the_one_it_loaded(setup, three_stages, tmp_path, monkeypatch):
    config, dataset, features = setup
    run, _ = three_stages
    prepare_run(tmp_path, config, dataset)
    shutil.copytree(run / "stage1", tmp_path / "stage1")
    shutil.copytree(run / "stage2", tmp_path / "stage2")

    def harmful_epoch(model, *args, **kwargs):
        with torch.no_grad():
            model.gate.value.fill_(1e4)  # the (untrained-for-this) residual swamps the backbone
            for parameter in model.experts.parameters():
                parameter.normal_()
        return {"total": 0.0}

    monkeypatch.setattr(stages, "train_multimodal_epoch", harmful_epoch)
    train_stage(config, dataset, features, tmp_path, 3)
    info = json.loads((tmp_path / "stage3/checkpoint.json").read_text())
    stage2 = json.loads((run / "stage2/checkpoint.json").read_text())
    assert info["epoch"] == 0 and info["best"]["value"] == pytest.approx(stage2["best"]["value"], abs=1e-9)
    kept = load_file(str(tmp_path / "stage3/model.safetensors"))
    assert kept["gate.value"].item() == pytest.approx(config.moe.gate_init)  # Stage 2 leaves the gate alone


@pytest.mark.parametrize("mode", ["in_batch", "full"])
def test_other_training_candidate_modes_and_uncertainty_weighting_train(setup, mode):
    config, dataset, features = setup
    config = config.override([f"moe.train_candidates={mode}", "moe.loss_weighting=uncertainty"])
    model = build_ur4rec(config, dataset, features)
    trainable = apply_stage(model, STAGES[3])
    x, y, t, users = one_batch(config, dataset)
    losses = training_losses(model, x, y, t, users, config)
    assert all(torch.isfinite(v) for v in losses.values()) and "load_balance" in losses
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in trainable["gate"])


@pytest.mark.parametrize("alpha, mode", [(0.0, "sampled"), (2.0, "sampled"), (2.0, "in_batch"), (2.0, "full")])
def test_alignment_is_weighted_by_the_targets_surprise(setup, monkeypatch, alpha, mode):
    config, dataset, features = setup
    config = config.override([f"moe.surprise_alpha={alpha}", f"moe.train_candidates={mode}"])
    model = build_ur4rec(config, dataset, features)
    seen = {}
    score_rows, alignment = model.score_rows, stages.alignment_loss

    def score_spy(rows, candidates, *args, **kwargs):
        seen["out"] = score_rows(rows, candidates, *args, **kwargs)
        return seen["out"]

    def alignment_spy(projections, embeddings, items, temperature, weights):
        seen["weights"] = weights
        return alignment(projections, embeddings, items, temperature, weights)

    monkeypatch.setattr(model, "score_rows", score_spy)
    monkeypatch.setattr(stages, "alignment_loss", alignment_spy)
    x, y, t, users = one_batch(config, dataset)
    training_losses(model, x, y, t, users, config, torch.Generator().manual_seed(0))
    targets = y[y > 0] if mode == "sampled" else y[:, -1]  # every target (8 per window here), or the newest
    rows = torch.arange(len(targets))
    column = {"sampled": torch.zeros_like(rows), "in_batch": rows, "full": targets - 1}[mode]  # the target's column
    has_content = model.item_content_mask[targets]
    novelty = seen["out"].novelty[rows, column][has_content]  # the target's novelty w.r.t. the row's memory
    assert 0 < has_content.sum() and (novelty > 0).any() and (novelty < 1).any()
    assert torch.allclose(seen["weights"], 1 + alpha * novelty)


def test_in_batch_and_full_training_losses_against_a_direct_computation(setup):
    config, dataset, features = setup
    x, y, t, users = one_batch(config, dataset)
    x, y, t, users = (torch.cat([a, a[:2]]) for a in (x, y, t, users))  # two windows twice: duplicate targets
    for mode in ("in_batch", "full"):
        mode_config = config.override([f"moe.train_candidates={mode}"])
        torch.manual_seed(0)
        model = build_ur4rec(mode_config, dataset, features).eval()  # no dropout: both sides see the same model
        loss = training_losses(model, x, y, t, users, mode_config)["recommendation"]
        states, _ = model.encode(x)
        width = max(model.memory.short_term_size, mode_config.moe.similarity_window)
        rows = model.read_memory(users, states[:, -1], recent_items(x, width)[:, -1], before=t[:, -1])
        targets = y[:, -1]  # the newest target of every window
        N = len(targets)
        seen = torch.zeros(N, dataset.n_items + 1, dtype=torch.bool)  # each row's user's train items
        for row, user in enumerate(users.tolist()):
            seen[row, torch.as_tensor(dataset.train_sequence(user))] = True
        if mode == "in_batch":
            logits = model.score_rows(rows, targets[None].expand(N, N)).scores.float()
            other = ~torch.eye(N, dtype=torch.bool)
            duplicate = (targets[None] == targets[:, None]) & other
            rated = seen[:, targets] & other & ~duplicate  # another row's target this row's user rated
            assert duplicate.any() and rated.any()
            masked = logits.masked_fill(duplicate | rated, torch.finfo(logits.dtype).min)
            expected = F.cross_entropy(masked, torch.arange(N))
        else:
            logits = model.score_rows(rows, torch.arange(1, dataset.n_items + 1)).scores.float()
            rated = seen[:, 1:].clone()
            rated[torch.arange(N), targets - 1] = False
            assert rated.sum(1).min() > 0
            expected = F.cross_entropy(logits.masked_fill(rated, torch.finfo(logits.dtype).min), targets - 1)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5), mode


# --------------------------------------------------------------------------- training rows (audit of 2026-11-25)


def test_no_train_item_of_the_rows_user_is_a_negative(setup, monkeypatch):
    # a window holds at most max_len of the user's train items: the others (earlier ones, and the
    # ones the user rates later) are no negatives full ranking asks the model to beat, whether
    # they come as hard negatives or as uniform draws
    config, dataset, features = setup
    model = build_ur4rec(config, dataset, features).eval()
    seen = {}
    real = stages.sampled_candidates

    def spy(*args, **kwargs):
        seen["out"] = real(*args, **kwargs)
        return seen["out"]

    monkeypatch.setattr(stages, "sampled_candidates", spy)
    x, y, t, users = one_batch(config, dataset)
    training_losses(model, x, y, t, users, config, torch.Generator().manual_seed(0))
    candidates, left_out = seen["out"]
    hard = min(config.moe.hard_negatives, model.n_items)
    row_batch = torch.arange(len(y))[:, None].expand_as(y)[y > 0]
    assert torch.equal(candidates[:, 0], y[y > 0])  # the target first
    outside = drawn_own = 0
    for row, window in enumerate(row_batch.tolist()):
        negatives = set(candidates[row, 1:1 + hard][~left_out[row, 1:1 + hard]].tolist())
        train = set(dataset.train_sequence(int(users[window])).tolist())
        assert negatives and not negatives & train, row
        outside += len(train - set(torch.cat([x[window], y[window]]).tolist()))
        uniform = candidates[row, 1 + hard:]
        assert len(uniform) == config.moe.num_negatives
        assert not set(uniform[~left_out[row, 1 + hard:]].tolist()) & train, row
        drawn_own += sum(item in train for item in uniform.tolist())
    assert outside > 0  # the case that matters: train items outside the row's window
    assert drawn_own > 0  # and uniform draws that hit the user's own items


@pytest.mark.parametrize("seed", [0, 1])
def test_rows_per_window_draws_that_many_real_targets_at_random(setup, monkeypatch, seed):
    config, dataset, features = setup
    config = config.override(["moe.rows_per_window=3"])
    model = build_ur4rec(config, dataset, features).eval()
    seen = {}
    real = model.read_memory

    def spy(users, states, recent, before=None):
        seen["before"] = before
        return real(users, states, recent, before)

    monkeypatch.setattr(model, "read_memory", spy)
    x, y, t, users = one_batch(config, dataset)
    draws = set()
    for s in range(6):
        training_losses(model, x, y, t, users, config, torch.Generator().manual_seed(100 * seed + s))
        assert len(seen["before"]) == int((y > 0).sum(1).clamp(max=3).sum())
        assert set(seen["before"].tolist()) <= set(t[y > 0].tolist())  # real targets only
        draws.add(tuple(seen["before"].tolist()))
    newest = tuple(t[:, -3:][y[:, -3:] > 0].tolist())
    assert len(draws) > 1 and draws != {newest}  # drawn at random, not the newest three


def test_training_rows_get_the_similarity_terms_evaluation_gives_the_same_history(setup, monkeypatch):
    config, dataset, features = setup
    config = config.override(["moe.similarity_window=5", "moe.short_term_size=3"])  # the window is the wider
    model = build_ur4rec(config, dataset, features).eval()
    with torch.no_grad():
        model.similarity.weight.fill_(1.0)
    seen = {}
    real = model.read_memory

    def spy(users, states, recent, before=None):
        rows = real(users, states, recent, before)
        seen["users"], seen["similarity"] = users, rows.similarity
        return rows

    monkeypatch.setattr(model, "read_memory", spy)
    x, y, t, users = one_batch(config, dataset)
    training_losses(model, x, y, t, users, config, torch.Generator().manual_seed(0))
    row_batch = torch.arange(len(y))[:, None].expand_as(y)[y > 0]
    positions = torch.arange(y.size(1))[None].expand_as(y)[y > 0]
    for row in range(len(row_batch)):
        history = x[row_batch[row], : positions[row] + 1][None]  # what evaluation would take as the input
        expected = model.similarity(seen["users"][row:row + 1], history)
        assert torch.allclose(seen["similarity"][row:row + 1], expected, atol=1e-6), row


def test_stage2_trains_with_the_frozen_backbone_in_eval_mode(setup, monkeypatch):
    config, dataset, features = setup
    model = build_ur4rec(config, dataset, features)
    trainable = apply_stage(model, STAGES[2])
    modes = []
    real = model.encode

    def spy(ids, need_weights=False):
        modes.append(model.backbone.training)
        return real(ids, need_weights)

    monkeypatch.setattr(model, "encode", spy)
    optimizer = torch.optim.AdamW([{"params": p, "lr_scale": 1.0} for p in trainable.values()], lr=1e-3)
    windows = tuple(array[:16] for array in stages._checked_windows(dataset, config.data.max_len))
    stages.train_multimodal_epoch(model, optimizer, trainable, windows, config, np.random.default_rng(0),
                                  torch.Generator().manual_seed(0), 1)
    assert modes and not any(modes)  # no dropout in a backbone that does not train


def test_build_user_memory_uses_the_configured_half_life(setup):
    import types

    from ur4rec.models.memory import build_memory, combined_item_features

    config, dataset, features = setup
    V = dataset.n_items + 1
    clusters = np.eye(384, dtype=np.float32)[np.random.default_rng(0).integers(0, 6, V)]  # re-accesses happen
    clustered = types.SimpleNamespace(item_text=clusters, item_text_mask=np.r_[False, np.ones(V - 1, bool)],
                                      item_image=None, item_image_mask=None, user_text=features.user_text,
                                      user_text_mask=features.user_text_mask)
    sequences = [dataset.train_sequence(user) for user in range(dataset.n_users)]
    built = {}
    for half_life in (0.5, 50.0):
        variant = config.override(["moe.long_term_capacity=3", f"moe.memory_half_life={half_life}"])
        built[half_life] = stages.build_user_memory(dataset, clustered, variant).items
        reference = build_memory(sequences, combined_item_features(clustered), 3, variant.moe.novelty_threshold,
                                 half_life)
        assert torch.equal(built[half_life], reference.items)
    assert not torch.equal(built[0.5], built[50.0])  # the half-life decides evictions here


def test_the_short_term_tier_keeps_an_input_narrower_than_it():
    from tiny_model import make_model

    model = make_model(None, "moe.short_term_size=12").eval()  # inputs are 8 wide here
    ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18]])
    items, _, _ = model.memory.read(torch.tensor([0]), ids)
    assert items[0, :12].tolist() == [0, 0, 0, 0, 11, 12, 13, 14, 15, 16, 17, 18]
