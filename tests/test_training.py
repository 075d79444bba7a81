import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ur4rec.cli import main
from ur4rec.config import Config
from ur4rec.evaluation import Popularity, build_eval_inputs, evaluate, metrics_from_ranks, sample_negatives
from ur4rec.evaluation.compare import read_epoch_ranks, read_ranks
from ur4rec.rundir import prepare_run, write_json
from ur4rec.training import trainer
from ur4rec.training.checkpoint import CheckpointError, load_model
from ur4rec.training.trainer import NonFiniteLossError, train_stage1

ROOT = __import__("pathlib").Path(__file__).parent.parent


def run_stage1(config, dataset, run_dir):
    prepare_run(run_dir, config, dataset)
    return train_stage1(config, dataset, run_dir)


def test_same_seed_same_metrics(smoke_config, synthetic, tmp_path):
    config = smoke_config.override(["train.epochs=3"])
    a = run_stage1(config, synthetic, tmp_path / "a").metrics
    b = run_stage1(config, synthetic, tmp_path / "b").metrics
    assert a == b
    c = run_stage1(config.override(["train.seed=7"]), synthetic, tmp_path / "c").metrics
    assert c != a


@pytest.mark.parametrize("shuffle", [True, False])
def test_stage1_reshuffles_ties_every_epoch_only_when_asked(smoke_config, synthetic, tmp_path, monkeypatch, shuffle):
    calls = []
    real = trainer.training_windows

    def windows(dataset, max_len, rng=None, tie_gap=0):
        calls.append((isinstance(rng, np.random.Generator), tie_gap))
        return real(dataset, max_len, rng, tie_gap)

    monkeypatch.setattr(trainer, "training_windows", windows)
    run_stage1(smoke_config.override(["train.epochs=3", "train.patience=99", f"train.shuffle_ties={shuffle}",
                                      "train.tie_gap=7"]), synthetic, tmp_path)
    # a generator and the configured gap each epoch, or the split's order built once
    assert calls == ([(True, 7)] * 3 if shuffle else [(False, 0)])


def test_negative_tie_gap_is_refused(smoke_config, synthetic, tmp_path):
    with pytest.raises(ValueError, match="train.tie_gap must be 0 or more"):
        run_stage1(smoke_config.override(["train.tie_gap=-1"]), synthetic, tmp_path)


@pytest.mark.parametrize("loss", ["ce", "bpr", "bce"])
def test_stage1_learns_the_planted_structure(smoke_config, synthetic, tmp_path, loss):
    config = smoke_config.override([f"train.loss={loss}", "train.num_negatives=4"])
    result = run_stage1(config, synthetic, tmp_path)
    negatives = sample_negatives(synthetic, 49, config.eval.sample_seed)
    pop = evaluate(Popularity(synthetic), build_eval_inputs(synthetic, "test", 20, negatives), config.eval).metrics
    assert result.metrics["test"]["full"]["ndcg@10"] > 3 * pop["full"]["ndcg@10"]
    assert result.metrics["test"]["full"]["hr@10"] > 0.5


def test_checkpoint_round_trip_and_best_epoch_kept(smoke_config, synthetic, tmp_path):
    result = run_stage1(smoke_config, synthetic, tmp_path)
    stage = tmp_path / "stage1"
    info = json.loads((stage / "checkpoint.json").read_text())
    log = [json.loads(line) for line in (stage / "log.jsonl").read_text().splitlines()]
    best_logged = max(log, key=lambda r: r["valid"]["full"]["ndcg@10"])
    assert info["epoch"] == best_logged["epoch"] == result.best_epoch
    assert {"epoch", "seconds", "train_loss", "valid"} <= set(log[0])
    # the weights are a plain state_dict: safetensors, and torch.load(weights_only=True) of its contents
    state = load_file(str(stage / "model.safetensors"))
    torch.save(state, tmp_path / "plain.pt")
    assert set(torch.load(tmp_path / "plain.pt", weights_only=True)) == set(state)
    model, _ = load_model(stage, fingerprint=synthetic.fingerprint)
    negatives = sample_negatives(synthetic, 49, smoke_config.eval.sample_seed)
    valid = evaluate(model, build_eval_inputs(synthetic, "valid", 20, negatives), smoke_config.eval).metrics
    assert valid["full"]["ndcg@10"] == pytest.approx(info["best"]["value"], abs=1e-9)
    saved = json.loads((stage / "metrics.json").read_text())
    assert valid == saved["valid"] == best_logged["valid"]  # both protocols: the same fixed negatives every epoch
    test = evaluate(model, build_eval_inputs(synthetic, "test", 20, negatives), smoke_config.eval).metrics
    assert test == saved["test"] and test != valid  # the test figures are the test split's own
    # every validated epoch's ranks; the best epoch's column is valid_ranks.csv's rank_full
    keys, epochs, by_epoch = read_epoch_ranks(stage)
    assert epochs == [record["epoch"] for record in log if "valid" in record]
    best_keys, best_ranks = read_ranks(stage, "valid")
    assert keys == best_keys and by_epoch.shape == (len(epochs), synthetic.n_users)
    assert by_epoch[epochs.index(info["epoch"])].tolist() == best_ranks.tolist()
    for record, ranks in zip([r for r in log if "valid" in r], by_epoch):
        assert metrics_from_ranks(ranks, [10])["ndcg@10"] == pytest.approx(record["valid"]["full"]["ndcg@10"])


def test_checkpoint_with_a_missing_or_unexpected_key_is_refused(smoke_config, synthetic, tmp_path):
    run_stage1(smoke_config.override(["train.epochs=1"]), synthetic, tmp_path)
    from tiny_run import replace_weights

    stage = tmp_path / "stage1"
    state = load_file(str(stage / "model.safetensors"))
    replace_weights(stage, {k: v for k, v in state.items() if k != "item_embedding.weight"})
    with pytest.raises(CheckpointError, match="missing keys \\['item_embedding.weight'\\]"):
        load_model(stage)
    replace_weights(stage, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected keys \\['extra.weight'\\]"):
        load_model(stage)
    replace_weights(stage, {**state, "backbone.blocks.0.attention.proj.bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"shapes unlike .* \[.backbone.blocks.0.attention.proj.bias.\]"):
        load_model(stage)
    with pytest.raises(CheckpointError, match="trained on data"):
        load_model(tmp_path / "stage1", fingerprint="another")


def test_weights_that_are_not_the_checkpoints_own_are_refused(smoke_config, synthetic, tmp_path):
    run_stage1(smoke_config.override(["train.epochs=2", "train.patience=99"]), synthetic, tmp_path)
    stage = tmp_path / "stage1"
    weights = stage / "model.safetensors"
    good = weights.read_bytes()
    # another epoch's weights under this epoch's checkpoint.json (a crash between the two renames)
    state = load_file(str(weights))
    state["item_embedding.weight"] = state["item_embedding.weight"] + 1
    from safetensors.torch import save_file

    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_model(stage)
    weights.write_bytes(good[:100])  # truncated
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_model(stage)
    info = json.loads((stage / "checkpoint.json").read_text())
    del info["weights_sha256"]  # a checkpoint from before the hash was kept: the file itself is checked
    (stage / "checkpoint.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(stage)
    for text, problem in (("{", "not valid JSON"), ("[]", "expected a checkpoint description, got a JSON list"), ('{"stage": 1}', "missing field"),
                          ('{"stage": 2, "config": {}, "n_items": 9, "data_fingerprint": "f"}',
                           "missing field.s. n_users, features_fingerprint")):
        (stage / "checkpoint.json").write_text(text)
        with pytest.raises(CheckpointError, match=f"checkpoint.json: {problem}"):
            load_model(stage)


def test_a_checkpoint_json_field_of_the_wrong_type_is_refused_naming_it(tmp_path):
    # n_items "100" or null stopped `ur4rec evaluate` with a TypeError traceback, a config section that is
    # not a mapping stopped `train --stage 2` with an AttributeError one, and stage "1" was refused as
    # "its checkpoint.json says stage 1"
    from ur4rec.training.checkpoint import read_checkpoint_info

    base = {"stage": 1, "config": {"model": {}}, "n_items": 9, "data_fingerprint": "f"}
    for change, problem in ((("n_items", "100"), "field n_items is '100', not a count"),
                            (("n_items", None), "field n_items is None, not a count"),
                            (("n_items", 0), "field n_items is 0, not a count"),
                            (("stage", "1"), "field stage is '1', not 1, 2 or 3"),
                            (("stage", True), "field stage is True, not 1, 2 or 3"),
                            (("config", {"model": 5}), "field config: section model is not a mapping")):
        write_json(tmp_path / "checkpoint.json", {**base, change[0]: change[1]})
        with pytest.raises(CheckpointError, match=rf"checkpoint\.json: {re.escape(problem)}"):
            read_checkpoint_info(tmp_path)
    write_json(tmp_path / "checkpoint.json", {**base, "stage": 2, "n_users": "7", "features_fingerprint": "g"})
    with pytest.raises(CheckpointError, match="field n_users is '7', not a count"):
        read_checkpoint_info(tmp_path)
    write_json(tmp_path / "checkpoint.json", base)
    assert read_checkpoint_info(tmp_path) == base


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(smoke_config, synthetic, tmp_path, monkeypatch):
    config = smoke_config.override(["train.epochs=6", "train.patience=10"])
    real_loss = trainer.recommendation_loss
    calls = {"n": 0}
    steps_per_epoch = len(trainer.length_bucketed_batches(
        (trainer.training_windows(synthetic, 20)[0] > 0).sum(1), config.train.batch_size, np.random.default_rng(0)))

    def poisoned(name, *args, **kwargs):
        calls["n"] += 1
        loss = real_loss(name, *args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 * steps_per_epoch + 1 else loss

    monkeypatch.setattr(trainer, "recommendation_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss term 'ce' is nan at epoch 3, step 1") as stopped:
        run_stage1(config, synthetic, tmp_path)
    info = json.loads((tmp_path / "stage1" / "checkpoint.json").read_text())
    assert info["epoch"] in (1, 2)
    assert f"keeps the checkpoint of epoch {info['epoch']}, the best before it" in str(stopped.value)
    assert len((tmp_path / "stage1" / "log.jsonl").read_text().splitlines()) == 2
    load_model(tmp_path / "stage1")  # still loadable


def test_a_stop_while_the_best_checkpoint_is_written_keeps_the_epochs_log_line(smoke_config, synthetic, tmp_path,
                                                                              monkeypatch):
    # the epoch's line was appended after its checkpoint: a stop during that write (or just after it)
    # left log.jsonl without the epoch, trained and validated, whose checkpoint was being kept
    config = smoke_config.override(["train.epochs=6", "train.patience=10"])
    real_save, saved = trainer.save_checkpoint, []

    def stopped(out, model, info):
        if saved:
            raise KeyboardInterrupt
        saved.append(info["epoch"])
        real_save(out, model, info)

    monkeypatch.setattr(trainer, "save_checkpoint", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_stage1(config, synthetic, tmp_path)
    logged = [json.loads(line)["epoch"] for line in (tmp_path / "stage1" / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, logged[-1] + 1)) and logged[-1] > saved[0]  # the stopped epoch is logged
    _, info = load_model(tmp_path / "stage1")
    assert info["epoch"] == saved[0]  # and the best before it kept, whole


def test_weights_left_non_finite_by_an_epochs_last_step_stop_with_the_epoch_and_the_kept_checkpoint(
        smoke_config, synthetic, tmp_path, monkeypatch):
    # every loss finite, but the last step of epoch 2 leaves NaN weights (one step per epoch here, as
    # with a batch holding every window): the validation after it meets NaN scores. Before, the run
    # stopped with "non-finite scores while evaluating valid", naming no epoch and nothing kept.
    config = smoke_config.override(["train.epochs=4", "train.patience=10"])
    real_epoch = trainer.train_epoch

    def poisoned(model, *args, **kwargs):
        loss = real_epoch(model, *args, **kwargs)
        if args[-1] == 2:  # the epoch
            with torch.no_grad():
                model.item_embedding.weight[1].fill_(float("nan"))
        return loss

    monkeypatch.setattr(trainer, "train_epoch", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite scores while evaluating valid after epoch 2: its last "
                                                 "steps left non-finite weights") as stopped:
        run_stage1(config, synthetic, tmp_path)
    assert "keeps the checkpoint of epoch 1, the best before it" in str(stopped.value)
    assert json.loads((tmp_path / "stage1" / "checkpoint.json").read_text())["epoch"] == 1
    load_model(tmp_path / "stage1")  # still loadable


def test_a_first_epoch_that_fails_says_there_is_no_checkpoint(smoke_config, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    smoke_config.save(config)
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run"),
                 "--set", "train.learning_rate=1e30"]) == 1
    err = capsys.readouterr().err
    assert "error: loss term 'ce' is" in err and "no epoch of stage1 finished, so it has no checkpoint" in err
    assert "Traceback" not in err


def test_cli_train_and_evaluate_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(ROOT / "configs/smoke.yaml"), "--set", "train.progress=false",
                 "--stage", "1", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "SASRec (stage 1)" in out and str(run_dir.resolve()) in out
    for name in ["config.yaml", "data.json", "stage1/model.safetensors", "stage1/checkpoint.json",
                 "stage1/log.jsonl", "stage1/metrics.json", "stage1/valid_ranks.csv", "stage1/test_ranks.csv",
                 "baselines/pop/metrics.json"]:
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "stage1/metrics.json").read_text())
    assert set(metrics) == {"valid", "test"} and set(metrics["test"]) == {"full", "sampled"}
    assert {"hr@10", "ndcg@10", "mrr"} <= set(metrics["test"]["full"])
    targets = {}
    for split in ("valid", "test"):  # every split's metrics recompute from its ranks file
        ranks = (run_dir / f"stage1/{split}_ranks.csv").read_text().splitlines()
        assert ranks[0] == "user_id,target_item,rank_full,rank_sampled"
        rows = [line.split(",") for line in ranks[1:]]
        targets[split] = [row[1] for row in rows]
        rank_full = np.array([int(row[2]) for row in rows])
        rank_sampled = np.array([int(row[3]) for row in rows])
        assert metrics[split]["full"]["hr@10"] == pytest.approx(float((rank_full <= 10).mean()))
        assert metrics[split]["sampled"]["ndcg@10"] == pytest.approx(
            float(np.where(rank_sampled <= 10, 1.0 / np.log2(rank_sampled + 1), 0.0).mean()))
    assert targets["valid"] != targets["test"]
    assert main(["evaluate", "--run-dir", str(run_dir), "--stage", "1"]) == 0
    assert "every metric matches" in capsys.readouterr().out
    # a tampered metrics.json is caught, on either split and protocol, and so is a missing figure
    for split, protocol in (("test", "full"), ("valid", "sampled")):
        tampered = json.loads(json.dumps(metrics))
        tampered[split][protocol]["ndcg@10"] += 0.01
        (run_dir / "stage1/metrics.json").write_text(json.dumps(tampered))
        assert main(["evaluate", "--run-dir", str(run_dir), "--stage", "1"]) == 1
        assert f"{split}/{protocol}/ndcg@10: saved" in capsys.readouterr().err
    del metrics["valid"]["full"]["mrr"]
    (run_dir / "stage1/metrics.json").write_text(json.dumps(metrics))
    assert main(["evaluate", "--run-dir", str(run_dir), "--stage", "1"]) == 1
    assert "valid/full/mrr: missing from metrics.json" in capsys.readouterr().err
    # the ranks files are recomputed too: one user's rank moved by one is caught, by file, line and column
    (run_dir / "stage1/metrics.json").unlink()
    lines = (run_dir / "stage1/test_ranks.csv").read_text().splitlines()
    user, item, rank_full, rank_sampled = lines[7].split(",")
    lines[7] = ",".join([user, item, rank_full, str(int(rank_sampled) + 1)])
    (run_dir / "stage1/test_ranks.csv").write_text("\n".join(lines) + "\n")
    assert main(["evaluate", "--run-dir", str(run_dir), "--stage", "1"]) == 1
    out, err = capsys.readouterr()
    assert "not in" in out and "so not checked: stage1/metrics.json" in out  # what the run lacks is said, not failed
    assert f"stage1/test_ranks.csv line 8 (user_id {user}): rank_sampled saved {int(rank_sampled) + 1} vs now " \
        f"{rank_sampled}" in err and "valid_ranks.csv" not in err
    # so is the Pop baseline the printed table shows
    pop_text = (run_dir / "baselines/pop/metrics.json").read_text()
    pop = json.loads(pop_text)
    pop["valid"]["sampled"]["hr@5"] += 0.001
    (run_dir / "baselines/pop/metrics.json").write_text(json.dumps(pop))
    assert main(["evaluate", "--run-dir", str(run_dir), "--stage", "1"]) == 1
    assert "baselines/pop/metrics.json: valid/sampled/hr@5: saved" in capsys.readouterr().err
    # with every output of the stage gone there is nothing of it to reproduce: that is not a pass,
    # though the Pop baseline still matches
    (run_dir / "baselines/pop/metrics.json").write_text(pop_text)
    for name in ("test_ranks.csv", "valid_ranks.csv"):
        (run_dir / "stage1" / name).unlink()
    assert main(["evaluate", "--run-dir", str(run_dir), "--stage", "1"]) == 1
    assert "has no metrics.json: the stage stopped before its final evaluation" in capsys.readouterr().err


def test_evaluate_recomputes_pop_with_its_own_config(smoke_config, tmp_path, capsys):
    # a later command that rewrites the run's config.yaml (text audit, features) must not make the
    # saved Pop baseline look irreproducible
    run_dir = tmp_path / "run"
    config_path = tmp_path / "c.yaml"
    smoke_config.override(["train.epochs=2"]).save(config_path)
    assert main(["train", "--config", str(config_path), "--run-dir", str(run_dir)]) == 0
    smoke_config.override(["eval.num_sampled_negatives=20"]).save(run_dir / "config.yaml")
    assert main(["evaluate", "--run-dir", str(run_dir)]) == 0
    assert "baselines/pop/metrics.json" in capsys.readouterr().out


def test_a_second_train_keeps_the_first_as_prev(smoke_config, tmp_path, capsys):
    run_dir, config_path = tmp_path / "run", tmp_path / "c.yaml"
    smoke_config.override(["train.epochs=2"]).save(config_path)
    assert main(["train", "--config", str(config_path), "--run-dir", str(run_dir)]) == 0
    first = (run_dir / "stage1" / "model.safetensors").read_bytes()
    assert main(["train", "--config", str(config_path), "--run-dir", str(run_dir), "--set", "train.seed=7"]) == 0
    assert "the earlier stage1 kept as stage1.prev" in capsys.readouterr().err
    assert (run_dir / "stage1.prev" / "model.safetensors").read_bytes() == first
    assert main(["evaluate", "--run-dir", str(run_dir)]) == 0


def test_only_real_targets_reach_the_loss_with_the_configured_smoothing_and_tie_gap(smoke_config, synthetic,
                                                                                     tmp_path, monkeypatch):
    seen, gaps, smoothings = [], [], []
    real_loss, real_windows = trainer.recommendation_loss, trainer.training_windows

    def loss(name, states, targets, items, negatives=None, smoothing=0.0):
        seen.append(targets.clone())
        smoothings.append(smoothing)
        return real_loss(name, states, targets, items, negatives, smoothing)

    def windows(dataset, max_len, rng=None, tie_gap=0):
        gaps.append(tie_gap)
        return real_windows(dataset, max_len, rng, tie_gap)

    monkeypatch.setattr(trainer, "recommendation_loss", loss)
    monkeypatch.setattr(trainer, "training_windows", windows)
    run_stage1(smoke_config.override(["train.epochs=1", "train.tie_gap=60", "train.label_smoothing=0.15"]),
               synthetic, tmp_path)
    assert set(smoothings) == {0.15}
    targets = torch.cat(seen)
    assert (targets > 0).all()
    assert len(targets) == sum(len(synthetic.train_sequence(u)) - 1 for u in range(synthetic.n_users))
    assert gaps == [60]


def test_patience_counts_validations_without_a_better_one(smoke_config, synthetic, tmp_path, monkeypatch):
    real, calls = trainer.evaluate, []

    def worse_every_time(model, inputs, config, device="cpu"):
        result = real(model, inputs, config, device)
        calls.append(None)
        result.metrics["full"]["ndcg@10"] = 1.0 / len(calls)
        return result

    monkeypatch.setattr(trainer, "evaluate", worse_every_time)
    result = run_stage1(smoke_config.override(["train.epochs=10", "train.patience=2"]), synthetic, tmp_path)
    assert result.best_epoch == 1 and result.epochs_run == 3  # epochs 2 and 3 are the two without a better one


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "ur4rec", "config", "show"], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    assert "model.dropout" in result.stdout


def test_cli_reports_bad_config_clearly(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("train:\n  epoch: 3\n")
    assert main(["data", "stats", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key 'epoch'" in capsys.readouterr().err



@pytest.mark.slow
def test_cli_stages_and_ablations(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UR4REC_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    common = ["--config", str(ROOT / "configs/smoke.yaml"), "--set", "train.progress=false",
              "--set", "train.epochs=3", "--set", "moe.stage_epochs=2"]
    assert main(["train", *common, "--stage", "3", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "stage3 needs a valid stage-2 checkpoint" in err and "--skip-stage2" in err
    assert not (run_dir / "texts").exists() and not (run_dir / "features").exists()  # refused before building features
    assert main(["train", *common, "--stages", "1,2,3", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "UR4Rec (stage 3)" in out
    for stage in (2, 3):
        for name in ["model.safetensors", "checkpoint.json", "log.jsonl", "metrics.json", "test_ranks.csv",
                     "internals/gate.json", "internals/router_weights.csv"]:
            assert (run_dir / f"stage{stage}" / name).exists(), (stage, name)
        _, epochs, by_epoch = read_epoch_ranks(run_dir / f"stage{stage}")  # epoch 0 = the loaded weights
        best = json.loads((run_dir / f"stage{stage}/checkpoint.json").read_text())["epoch"]
        assert epochs == [0, 1, 2] and by_epoch[best].tolist() == read_ranks(run_dir / f"stage{stage}", "valid")[1].tolist()
    assert main(["evaluate", "--run-dir", str(run_dir), "--stage", "3"]) == 0
    assert "every metric matches" in capsys.readouterr().out
    info = json.loads((run_dir / "stage3/checkpoint.json").read_text())  # the fitted weights, as saved
    saved = load_file(str(run_dir / "stage3/model.safetensors"))["similarity.weight"]
    assert list(info["similarity_weights"]) == ["text", "collaborative"] and any(info["similarity_weights"].values())
    assert saved.tolist() == pytest.approx(list(info["similarity_weights"].values()))
    assert main(["ablate", *common, "--run-dir", str(run_dir), "--only", "gate_off,skip_stage2"]) == 0
    rows = (run_dir / "ablations.csv").read_text().splitlines()
    assert rows[0].startswith("variant,") and [r.split(",")[0] for r in rows[1:]] == ["gate_off", "skip_stage2"]
    assert main(["ablate", *common, "--run-dir", str(run_dir), "--only", "no_memroy"]) == 2
    assert "unknown ablation 'no_memroy'" in capsys.readouterr().err
    assert main(["ablate", *common, "--run-dir", str(run_dir), "--only", "no_memory"]) == 0
    rows = (run_dir / "ablations.csv").read_text().splitlines()  # a later run adds its rows, in the variants' order
    assert [r.split(",")[0] for r in rows[1:]] == ["no_memory", "gate_off", "skip_stage2"]
    info = json.loads((run_dir / "ablations/skip_stage2/stage3/checkpoint.json").read_text())
    assert info["skipped"] == ["stage2"] and not (run_dir / "ablations/skip_stage2/stage2").exists()
    table = {row["variant"]: row for row in csv.DictReader((run_dir / "ablations.csv").read_text().splitlines())}
    assert {name: row["skip_stage2"] for name, row in table.items()} == {
        "no_memory": "False", "gate_off": "False", "skip_stage2": "True"}
    assert table["gate_off"]["overrides"] == "moe.gate=none" and table["no_memory"]["overrides"] == "moe.memory=false"
    for name, key, value in (("gate_off", "gate", "none"), ("no_memory", "memory", False)):  # what each trained with
        saved = json.loads((run_dir / f"ablations/{name}/stage3/checkpoint.json").read_text())["config"]["moe"]
        assert saved[key] == value, name
    capsys.readouterr()  # an ablation is a run directory like any other: its metrics reproduce from it alone
    assert main(["evaluate", "--run-dir", str(run_dir / "ablations/no_memory"), "--stage", "3"]) == 0
    assert "every metric matches" in capsys.readouterr().out


def test_each_ablation_switches_off_what_it_names(smoke_config):
    from ur4rec.training.ablate import ablation_variants

    config = smoke_config
    variants = ablation_variants(config)
    experts, sources = list(config.moe.experts), list(config.moe.similarity)
    assert list(variants) == ["full", *(f"no_{e}" for e in experts), *(f"no_{s}_similarity" for s in sources),
                              "no_memory", "gate_off", "skip_stage2"]
    resolved = {name: config.override(overrides) for name, (overrides, _) in variants.items()}
    assert variants["full"] == ([], False) and resolved["full"] == config
    for expert in experts:
        assert resolved[f"no_{expert}"].moe.experts == [e for e in experts if e != expert]
    for source in sources:
        assert resolved[f"no_{source}_similarity"].moe.similarity == [s for s in sources if s != source]
    assert resolved["no_memory"].moe.memory is False
    assert resolved["gate_off"].moe.gate == "none"
    assert variants["skip_stage2"] == ([], True)
    assert [name for name, (_, skip) in variants.items() if skip] == ["skip_stage2"]
    for name, changed in resolved.items():  # each changes only what it names
        differs = {f"{section}.{key}" for section in ("data", "model", "train", "moe")
                   for key, value in vars(getattr(changed, section)).items()
                   if value != getattr(getattr(config, section), key)}
        assert len(differs) == (0 if name in ("full", "skip_stage2") else 1), (name, differs)


def test_ablate_without_a_usable_stage1_builds_no_texts_or_features(setup, tmp_path, capsys, monkeypatch):
    # before: it generated the texts and encoded the features (minutes on ML-100K), then refused
    from tiny_run import save_stage1

    config, dataset, _ = setup
    config.save(tmp_path / "c.yaml")
    monkeypatch.setenv("UR4REC_CACHE", str(tmp_path / "cache"))
    missing, unfinished = tmp_path / "missing", tmp_path / "unfinished"
    prepare_run(unfinished, config, dataset)
    save_stage1(setup, unfinished / "stage1")
    (unfinished / "stage1" / "metrics.json").unlink()  # stopped before its final evaluation
    for run, message in ((missing, "has no checkpoint: run `ur4rec train --stage 1"), (unfinished, "it never finished")):
        assert main(["ablate", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(run)]) == 2
        assert message in capsys.readouterr().err
        assert not (run / "texts").exists() and not (run / "features").exists()


def test_ablation_table_keeps_only_rows_from_the_same_stage1(tmp_path):
    from ur4rec.training.ablate import write_rows

    path, order = tmp_path / "ablations.csv", ["full", "gate_off", "skip_stage2"]
    write_rows(path, [{"variant": "gate_off", "stage1_sha256": "a", "test": 0.1}], order)
    write_rows(path, [{"variant": "full", "stage1_sha256": "a", "test": 0.2}], order)
    lines = path.read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["full", "gate_off"]
    with pytest.warns(UserWarning, match="dropped the rows of full, gate_off"):
        write_rows(path, [{"variant": "skip_stage2", "stage1_sha256": "b", "test": 0.3}], order)
    assert path.read_text().splitlines()[1:] == ["skip_stage2,b,0.3"]


def test_ablation_table_is_written_whole_and_a_damaged_one_is_refused_naming_the_line(tmp_path, monkeypatch):
    # ablations.csv was rewritten in place: a stop mid-write left it with the header only (every finished
    # variant's row gone) or a row cut short, which the next run kept as if whole; a table without
    # its variant column stopped with a KeyError traceback
    from ur4rec.training import ablate

    path, order = tmp_path / "ablations.csv", ["full", "gate_off", "skip_stage2"]
    ablate.write_rows(path, [{"variant": "full", "stage1_sha256": "a", "test": 0.2},
                             {"variant": "gate_off", "stage1_sha256": "a", "test": 0.1}], order)
    before = path.read_text()

    def stopped(self, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablate.csv.DictWriter, "writerows", stopped)
    for write in (lambda: ablate.write_rows(path, [{"variant": "skip_stage2", "stage1_sha256": "a", "test": 0.3}],
                                            order), lambda: ablate.forget_row(path, "full")):
        with pytest.raises(KeyboardInterrupt):
            write()
        assert path.read_text() == before
    monkeypatch.undo()
    path.write_text(before[:-5])  # the last row cut short
    with pytest.raises(ValueError, match=r"ablations\.csv, line 3: 2 fields, the header has 3"):
        ablate.write_rows(path, [{"variant": "skip_stage2", "stage1_sha256": "a", "test": 0.3}], order)
    path.write_text(before.replace("variant,", "name,"))
    with pytest.raises(ValueError, match=r"ablations\.csv, line 1: no variant column"):
        ablate.forget_row(path, "full")
    path.write_text("")  # an empty table is no table
    ablate.write_rows(path, [{"variant": "full", "stage1_sha256": "a", "test": 0.2}], order)
    assert path.read_text().splitlines() == ["variant,stage1_sha256,test", "full,a,0.2"]


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_over_the_stages_epochs():
    from ur4rec.training.trainer import learning_rate

    config = Config().override(["train.learning_rate=1.0", "train.warmup_epochs=2", "train.epochs=6",
                                "train.lr_schedule=cosine"])
    steps = 4  # per epoch; epochs are 1-based, steps 0-based
    # warm-up: the first step already moves (1/8 of the way), the last one reaches the base rate
    assert learning_rate(config, 1, 0, steps) == pytest.approx(0.125)
    assert learning_rate(config, 2, 3, steps) == pytest.approx(1.0)
    # cosine over the 4 epochs after warm-up: 1 at its start, 1/2 half-way
    assert learning_rate(config, 3, 0, steps) == pytest.approx(1.0)
    assert learning_rate(config, 5, 0, steps) == pytest.approx(0.5)
    # a stage that runs 4 epochs in all (Stages 2-3 with moe.stage_epochs) decays over those
    assert learning_rate(config, 4, 0, steps, epochs=4) == pytest.approx(0.5)
    assert learning_rate(config.override(["train.lr_schedule=constant"]), 5, 0, steps) == 1.0
