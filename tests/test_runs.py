"""The run flow: how stages choose and keep their best epoch, what they write, and how the CLI drives them."""

import csv
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_run import random_features

import ur4rec
import ur4rec.features
from ur4rec import rundir
from ur4rec.cli import main
from ur4rec.data import load_dataset
from ur4rec.data.dataset import build_dataset
from ur4rec.data.movielens import RawInteractions
from ur4rec.evaluation import metrics_from_ranks
from ur4rec.evaluation.compare import read_epoch_ranks, read_ranks
from ur4rec.reproduce import check_history, compare_outputs
from ur4rec.rundir import EpochRanks, RunDirError, prepare_run, write_json, write_ranks
from ur4rec.training import checkpoint, stages, trainer
from ur4rec.training.checkpoint import CheckpointError, save_checkpoint
from ur4rec.training.stages import train_stage
from ur4rec.training.trainer import train_stage1


@pytest.fixture(scope="module")
def stage1(setup, tmp_path_factory):
    config, dataset, _ = setup
    run = tmp_path_factory.mktemp("stage1")
    prepare_run(run, config, dataset)
    train_stage1(config, dataset, run)
    return run / "stage1"


@pytest.fixture(scope="module")
def stage2(setup, stage1, tmp_path_factory):
    config, dataset, features = setup
    run = new_run(setup, stage1, tmp_path_factory.mktemp("stage2"))
    result = train_stage(config, dataset, features, run, 2)
    return run / "stage2", result


def new_run(setup, stage1, folder):
    """A run directory holding a copy of the module's Stage-1 checkpoint."""
    config, dataset, _ = setup
    prepare_run(folder, config, dataset)
    shutil.copytree(stage1, folder / "stage1")
    return folder


def forced_metric(real, values):
    """``evaluate`` whose first len(values) calls report ``values`` as full-ranking NDCG@10."""
    queue = list(values)

    def evaluate(model, inputs, config, device="cpu"):
        result = real(model, inputs, config, device)
        if queue:
            result.metrics["full"]["ndcg@10"] = queue.pop(0)
        return result

    return evaluate


def no_training(model, *args, **kwargs):
    return {"total": 0.0}


def log_of(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def info_of(folder):
    return json.loads((folder / "checkpoint.json").read_text())


# --------------------------------------------------------------------------- Stages 2-3: choosing the epoch


def test_a_tie_with_the_loaded_model_keeps_epoch_0_and_patience_counts_validations_without_a_better_one(
        setup, stage1, tmp_path, monkeypatch):
    config, dataset, features = setup
    run = new_run(setup, stage1, tmp_path)
    monkeypatch.setattr(stages, "train_multimodal_epoch", no_training)
    monkeypatch.setattr(stages, "evaluate", forced_metric(stages.evaluate, [0.5, 0.5, 0.4, 0.4, 0.4]))
    result = train_stage(config.override(["train.epochs=5", "train.patience=2"]), dataset, features, run, 2)
    # epoch 1 ties epoch 0 (not better), epoch 2 is worse: the second validation without a better one stops
    assert (result.best_epoch, result.best_value, result.epochs_run) == (0, 0.5, 2)
    info = info_of(run / "stage2")
    assert info["epoch"] == 0 and info["best"] == {"metric": "valid/full/ndcg@10", "value": 0.5}
    assert [record["valid"]["full"]["ndcg@10"] for record in log_of(run / "stage2")] == [0.5, 0.4]


def test_moe_stage_epochs_caps_stages_2_and_3_instead_of_train_epochs(setup, stage1, tmp_path, monkeypatch):
    config, dataset, features = setup
    run = new_run(setup, stage1, tmp_path)
    monkeypatch.setattr(stages, "train_multimodal_epoch", no_training)
    result = train_stage(config.override(["train.epochs=4", "moe.stage_epochs=1"]), dataset, features, run, 2)
    assert result.epochs_run == 1 and [record["epoch"] for record in log_of(run / "stage2")] == [1]


def test_a_cosine_schedule_decays_over_the_stages_own_epochs(setup, stage1, tmp_path):
    config, dataset, features = setup
    run = new_run(setup, stage1, tmp_path)
    config = config.override(["train.epochs=200", "moe.stage_epochs=2", "train.lr_schedule=cosine", "train.patience=9"])
    train_stage(config, dataset, features, run, 2)
    # the last step of the stage's last epoch is near the end of the cosine, not 1% into one over train.epochs
    # (before: the rate in Stages 2-3 stayed at 99.99% of train.learning_rate)
    last = log_of(run / "stage2")[-1]
    assert last["epoch"] == 2 and last["lr"] < 0.1 * config.train.learning_rate


def test_epoch_0_is_kept_with_the_similarity_weights_fitted_to_it(setup, stage1, tmp_path, monkeypatch):
    config, dataset, features = setup
    run = new_run(setup, stage1, tmp_path)
    monkeypatch.setattr(stages, "train_multimodal_epoch", no_training)  # no epoch can beat the loaded model
    result = train_stage(config, dataset, features, run, 2)
    folder = run / "stage2"
    info = info_of(folder)
    assert result.best_epoch == info["epoch"] == 0
    fitted = info["similarity_weights"]
    assert list(fitted) == ["text", "collaborative"] and all(value != 0 for value in fitted.values())
    saved = load_file(str(folder / "model.safetensors"))
    assert saved["similarity.weight"].tolist() == pytest.approx(list(fitted.values()))
    assert all(torch.equal(value, saved[key]) for key, value in load_file(str(stage1 / "model.safetensors")).items())
    _, epochs, by_epoch = read_epoch_ranks(folder)
    assert epochs == [0, 1, 2] and by_epoch[0].tolist() == read_ranks(folder, "valid")[1].tolist()


def test_the_best_epoch_is_saved_with_the_similarity_weights_fitted_before_its_validation(
        setup, stage1, tmp_path, monkeypatch):
    config, dataset, features = setup
    run = new_run(setup, stage1, tmp_path)
    forced, validated_with = forced_metric(stages.evaluate, [0.1, 0.2, 0.3]), []  # epochs 0, 1, 2

    def evaluate(model, *args, **kwargs):
        validated_with.append(model.similarity.weight.tolist())
        return forced(model, *args, **kwargs)

    monkeypatch.setattr(stages, "evaluate", evaluate)
    # Stage 3 (from Stage 1): its backbone trains, so each epoch refits the weights to other values
    result = train_stage(config, dataset, features, run, 3, skip_stage2=True)
    folder = run / "stage3"
    info, log = info_of(folder), log_of(folder)
    assert result.best_epoch == info["epoch"] == 2 and info["best"]["value"] == 0.3
    assert [record["epoch"] for record in log] == [1, 2]
    assert validated_with[0] != validated_with[1]  # epoch 1's refit moved them
    # each validation scores with the weights fitted just before it, the ones its log line reports
    assert validated_with[1:3] == [list(record["similarity_weights"].values()) for record in log]
    for record in log:
        assert {"epoch", "seconds", "train_loss", "losses", "gate", "lr", "valid", "similarity_weights"} <= set(record)
        assert list(record["similarity_weights"]) == ["text", "collaborative"]
    assert info["similarity_weights"] == log[-1]["similarity_weights"]
    saved = load_file(str(folder / "model.safetensors"))["similarity.weight"]
    assert saved.tolist() == pytest.approx(list(log[-1]["similarity_weights"].values()))
    # the ranks validated at epoch 2 are those of the saved model: the weights were fitted before validating
    _, epochs, by_epoch = read_epoch_ranks(folder)
    assert epochs == [0, 1, 2] and by_epoch[2].tolist() == read_ranks(folder, "valid")[1].tolist()


def test_a_stop_while_a_stages_best_checkpoint_is_written_keeps_the_epochs_log_line_and_gate(
        setup, stage1, tmp_path, monkeypatch):
    # as in Stage 1: the line and the gate entry of the epoch whose checkpoint was being written were lost
    config, dataset, features = setup
    run = new_run(setup, stage1, tmp_path / "run")
    monkeypatch.setattr(stages, "evaluate", forced_metric(stages.evaluate, [0.1, 0.2, 0.3]))
    real_save, saved = stages.save_checkpoint, []

    def stopped(out, model, info):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(info["epoch"])
        real_save(out, model, info)

    monkeypatch.setattr(stages, "save_checkpoint", stopped)
    with pytest.raises(KeyboardInterrupt):
        train_stage(config.override(["moe.stage_epochs=3"]), dataset, features, run, 2)
    assert saved == [0, 1] and [record["epoch"] for record in log_of(run / "stage2")] == [1, 2]
    assert [entry["epoch"] for entry in json.loads((run / "stage2/internals/gate.json").read_text())["gate"]] == [0, 1, 2]
    assert stages.load_stage_model(run / "stage2", features, dataset)[1]["epoch"] == 1


def test_stage_eval_every_validates_every_nth_epoch_and_the_last(setup, stage1, tmp_path, monkeypatch):
    config, dataset, features = setup
    run = new_run(setup, stage1, tmp_path)
    monkeypatch.setattr(stages, "train_multimodal_epoch", no_training)
    train_stage(config.override(["train.epochs=3", "train.eval_every=2"]), dataset, features, run, 2)
    log = log_of(run / "stage2")
    assert [record["epoch"] for record in log] == [1, 2, 3]
    assert [record["epoch"] for record in log if "valid" in record] == [2, 3]
    assert read_epoch_ranks(run / "stage2")[1] == [0, 2, 3]


def test_stage_seconds_are_per_epoch(setup, stage1, tmp_path, monkeypatch):
    config, dataset, features = setup
    run = new_run(setup, stage1, tmp_path)
    clock = [100.0]
    monkeypatch.setattr(stages, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def two_seconds(model, *args, **kwargs):
        clock[0] += 2.0
        return {"total": 0.0}

    monkeypatch.setattr(stages, "train_multimodal_epoch", two_seconds)
    result = train_stage(config, dataset, features, run, 2)
    assert [record["seconds"] for record in log_of(run / "stage2")] == [2.0, 2.0]
    assert (result.seconds_per_epoch, result.total_seconds) == (2.0, 4.0)


def test_training_a_stage_again_starts_a_new_log(setup, stage1, tmp_path, monkeypatch):
    config, dataset, features = setup
    run = new_run(setup, stage1, tmp_path)
    monkeypatch.setattr(stages, "train_multimodal_epoch", no_training)
    for _ in range(2):
        train_stage(config, dataset, features, run, 2)
    assert [record["epoch"] for record in log_of(run / "stage2")] == [1, 2]
    for _ in range(2):
        train_stage1(config.override(["train.epochs=1"]), dataset, run)
    assert [record["epoch"] for record in log_of(run / "stage1")] == [1]


def test_stage_metrics_recompute_from_the_saved_ranks(stage2):
    folder, result = stage2
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics == result.metrics
    for split in ("valid", "test"):
        with open(folder / f"{split}_ranks.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        for protocol in ("full", "sampled"):
            ranks = np.array([int(row[f"rank_{protocol}"]) for row in rows])
            recomputed = metrics_from_ranks(ranks)
            assert all(recomputed[name] == pytest.approx(value) for name, value in metrics[split][protocol].items()
                       if name in recomputed), (split, protocol)


def test_internals_rank_the_test_target_as_test_ranks_does_and_the_top_items_1_to_10(setup, stage2):
    _, dataset, _ = setup
    folder, _ = stage2
    with open(folder / "test_ranks.csv", newline="") as handle:
        test = {row["user_id"]: row for row in csv.DictReader(handle)}
    with open(folder / "internals/router_weights.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    targets = [row for row in rows if row["role"] == "target"]
    assert len(targets) == dataset.n_users
    for row in targets:
        assert (row["item_id"], row["rank"]) == (test[row["user_id"]]["target_item"], test[row["user_id"]]["rank_full"])
    user = rows[0]["user_id"]
    assert [int(row["rank"]) for row in rows if row["user_id"] == user and row["role"] == "top"] == list(range(1, 11))


# --------------------------------------------------------------------------- Stage 1 bookkeeping


def test_stage1_keeps_its_first_validated_epoch_at_a_zero_metric_and_a_tie_never_replaces_it(
        setup, tmp_path, monkeypatch):
    config, dataset, _ = setup
    prepare_run(tmp_path, config, dataset)
    monkeypatch.setattr(trainer, "evaluate", forced_metric(trainer.evaluate, [0.0, 0.0]))
    result = train_stage1(config, dataset, tmp_path)
    assert (result.best_epoch, result.best_value) == (1, 0.0)
    assert info_of(tmp_path / "stage1")["epoch"] == 1


def test_stage1_eval_every_validates_every_nth_epoch_and_the_last(setup, tmp_path):
    config, dataset, _ = setup
    prepare_run(tmp_path, config, dataset)
    train_stage1(config.override(["train.epochs=5", "train.eval_every=2", "train.patience=10"]), dataset, tmp_path)
    log = log_of(tmp_path / "stage1")
    assert [record["epoch"] for record in log] == [1, 2, 3, 4, 5]
    assert [record["epoch"] for record in log if "valid" in record] == [2, 4, 5]
    assert read_epoch_ranks(tmp_path / "stage1")[1] == [2, 4, 5]
    assert info_of(tmp_path / "stage1")["epoch"] in (2, 4, 5)


def test_stage1_seconds_are_per_epoch(setup, tmp_path, monkeypatch):
    config, dataset, _ = setup
    prepare_run(tmp_path, config, dataset)
    clock = [100.0]
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real = trainer.train_epoch

    def two_seconds(*args, **kwargs):
        clock[0] += 2.0
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_epoch", two_seconds)
    result = train_stage1(config, dataset, tmp_path)
    assert [record["seconds"] for record in log_of(tmp_path / "stage1")] == [2.0, 2.0]
    assert (result.seconds_per_epoch, result.total_seconds) == (2.0, 4.0)


# --------------------------------------------------------------------------- run directory and checkpoints


def test_prepare_run_writes_data_json_and_refuses_another_datasets_run_untouched(setup, tmp_path):
    config, dataset, _ = setup
    prepare_run(tmp_path, config, dataset)
    assert json.loads((tmp_path / "data.json").read_text()) == json.loads(json.dumps(dataset.summary()))
    before = {name: (tmp_path / name).read_text() for name in ("config.yaml", "data.json")}
    other = config.override(["data.synthetic_users=41"])
    with pytest.raises(RunDirError, match=f"holds a run on data {dataset.fingerprint}"):
        prepare_run(tmp_path, other, load_dataset(other.data))
    assert {name: (tmp_path / name).read_text() for name in before} == before


def test_a_failed_write_json_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json(path, {"a": 1})

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(rundir.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_rank_files_use_raw_ids(tmp_path):
    dataset = types.SimpleNamespace(n_users=2, user_raw_ids=np.array(["u7", "u9"]), item_raw_ids=np.array(["", "a", "b", "c"]),
                                    target=lambda split: np.array([3, 1]) if split == "valid" else np.array([2, 2]))
    write_ranks(tmp_path / "valid_ranks.csv", dataset, "valid", np.array([4, 1]), np.array([2, 1]))
    assert (tmp_path / "valid_ranks.csv").read_text().splitlines() == [
        "user_id,target_item,rank_full,rank_sampled", "u7,c,4,2", "u9,a,1,1"]
    epochs = EpochRanks(tmp_path / "valid_ranks_by_epoch.csv", dataset)
    epochs.add(0, np.array([5, 2]))
    epochs.add(3, np.array([4, 1]))
    assert (tmp_path / "valid_ranks_by_epoch.csv").read_text().splitlines() == [
        "user_id,target_item,epoch_0,epoch_3", "u7,c,5,4", "u9,a,2,1"]


def test_checkpoint_json_records_the_versions(tmp_path):
    save_checkpoint(tmp_path, torch.nn.Linear(2, 1), {"stage": 1})
    info = info_of(tmp_path)
    assert info["stage"] == 1 and info["versions"]["ur4rec"] == ur4rec.__version__
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["numpy"] == np.__version__
    import subprocess
    from pathlib import Path

    head = subprocess.run(["git", "-C", str(Path(ur4rec.__file__).parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI's clone is one): the commit that wrote it
        assert info["versions"]["ur4rec_commit"].removesuffix("+modified") == head.stdout.strip()
    else:
        assert "ur4rec_commit" not in info["versions"]


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, torch.nn.Linear(2, 1), {"stage": 1, "epoch": 1})
    before = {name: (tmp_path / name).read_bytes() for name in ("model.safetensors", "checkpoint.json")}

    def torn(path, data):  # the temporary weights file is cut short by a stop
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError("killed")

    monkeypatch.setattr(Path, "write_bytes", torn)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path, torch.nn.Linear(2, 1), {"stage": 1, "epoch": 2})
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_config(setup, tmp_path, monkeypatch):
    """The tiny config as a YAML file; building or loading features gives the random ones."""
    config, _, _ = setup
    path = tmp_path / "tiny.yaml"
    config.save(path)
    built = []

    def build_features(config, dataset, run_dir, *args, **kwargs):
        built.append(run_dir)
        return random_features(dataset)

    monkeypatch.setattr(ur4rec.features, "build_features", build_features)
    monkeypatch.setattr(ur4rec.features, "load_features", lambda run_dir, dataset: random_features(dataset))
    return path, built


def test_cli_stage3_with_skip_stage2_runs_from_stage1_and_evaluate_reproduces_it(cli_config, tmp_path, capsys):
    config, built = cli_config
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--stage", "1", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    test = json.loads((run / "stage1/metrics.json").read_text())["test"]
    for protocol in ("full", "sampled"):  # the printed table holds the test metrics
        assert f"{'SASRec (stage 1)':<20} {protocol:<8} {test[protocol]['hr@5']:>9.4f} {test[protocol]['hr@10']:>9.4f}" \
            in out
    assert main(["train", "--config", str(config), "--stage", "3", "--skip-stage2", "--run-dir", str(run)]) == 0
    assert "UR4Rec (stage 3)" in capsys.readouterr().out and built == [run]
    assert info_of(run / "stage3")["skipped"] == ["stage2"] and not (run / "stage2").exists()
    assert main(["evaluate", "--run-dir", str(run), "--stage", "3"]) == 0
    out = capsys.readouterr().out
    assert "every metric matches" in out
    for name in ["internals/router_weights.csv", "internals/expert_contributions.csv", "internals/attention.npz",
                 "test_ranks.csv", "valid_ranks.csv"]:
        assert name in out, name
    # the internals are recomputed from the checkpoint: a router weight or an attention weight changed is caught
    router = run / "stage3/internals/router_weights.csv"
    original = router.read_text()
    lines = original.splitlines()
    cells = lines[3].split(",")
    cells[-1] = f"{float(cells[-1]) + 1e-4:.6f}"  # ten times the tolerance for values written to 6 decimals
    router.write_text("\n".join(lines[:3] + [",".join(cells)] + lines[4:]) + "\n")
    assert main(["evaluate", "--run-dir", str(run), "--stage", "3"]) == 1
    assert f"internals/router_weights.csv line 4 (user_id {cells[0]}): {lines[0].split(',')[-1]} saved" \
        in capsys.readouterr().err
    router.write_text(original)
    attention = run / "stage3/internals/attention.npz"
    original = attention.read_bytes()
    arrays = dict(np.load(attention))
    arrays["backbone_layer0"] = arrays["backbone_layer0"].copy()
    arrays["backbone_layer0"][0, 0, -1, -1] += 1e-3
    np.savez_compressed(attention, **arrays)
    assert main(["evaluate", "--run-dir", str(run), "--stage", "3"]) == 1
    assert "internals/attention.npz: backbone_layer0 differs by up to 0.001 at 1 of" in capsys.readouterr().err
    attention.write_bytes(original)
    metrics = json.loads((run / "stage3/metrics.json").read_text())
    metrics["test"]["full"]["ndcg@10"] += 0.01
    (run / "stage3/metrics.json").write_text(json.dumps(metrics))
    assert main(["evaluate", "--run-dir", str(run), "--stage", "3"]) == 1
    assert "test/full/ndcg@10: saved" in capsys.readouterr().err
    assert json.loads((run / "stage3/metrics.json").read_text()) == metrics  # evaluate never rewrites it


def test_cli_tables_show_the_cut_offs_of_eval_ks(cli_config, tmp_path, capsys):
    # eval.ks other than 5, 10, 20 is a valid config: train and evaluate print its metrics, not a KeyError
    config, _ = cli_config
    run = tmp_path / "run"
    overrides = ["--set", "eval.ks=[20,1]", "--set", "eval.select_metric=ndcg@20"]
    assert main(["train", "--config", str(config), "--stage", "1", "--run-dir", str(run), *overrides]) == 0
    out = capsys.readouterr().out
    assert "hr@1     hr@20    ndcg@1   ndcg@20       mrr mean_rank" in out and "hr@10" not in out
    test = json.loads((run / "stage1/metrics.json").read_text())["test"]["full"]
    assert f"{'SASRec (stage 1)':<20} {'full':<8} {test['hr@1']:>9.4f} {test['hr@20']:>9.4f}" in out
    assert main(["evaluate", "--run-dir", str(run), "--stage", "1"]) == 0
    assert "ndcg@20" in capsys.readouterr().out


def test_evaluate_runs_where_the_training_device_is_missing(cli_config, tmp_path, capsys):
    # a run trained on a GPU is checked on a laptop: the saved train.device is not available here, so
    # evaluate says so and runs on cpu (it used to fail moving the model there); --device chooses
    config, _ = cli_config
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--stage", "1", "--run-dir", str(run)]) == 0
    path = run / "stage1/checkpoint.json"
    info = json.loads(path.read_text())
    info["config"]["train"]["device"] = "cuda:7"  # no such device on the machines tests run on
    path.write_text(json.dumps(info))
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(run), "--stage", "1"]) == 0
    err = capsys.readouterr().err
    assert "train.device is 'cuda:7'" in err and "evaluating on cpu instead" in err
    assert main(["evaluate", "--run-dir", str(run), "--stage", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["evaluate", "--run-dir", str(run), "--stage", "1", "--device", "nonsense"]) == 2
    assert "--device 'nonsense' is not a torch device" in capsys.readouterr().err


def test_evaluate_checks_the_kept_epochs_history_and_what_only_the_saved_files_hold(cli_config, tmp_path, capsys):
    config, _ = cli_config
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--stage", "1", "--run-dir", str(run)]) == 0
    assert main(["train", "--config", str(config), "--stage", "3", "--skip-stage2", "--run-dir", str(run)]) == 0
    assert main(["evaluate", "--run-dir", str(run), "--stage", "3"]) == 0
    out = capsys.readouterr().out
    epoch = info_of(run / "stage3")["epoch"]
    for checked in ("stage3/checkpoint.json (best value, similarity weights)", f"stage3/internals/gate.json (epoch {epoch})",
                    f"stage3/valid_ranks_by_epoch.csv (epoch_{epoch})"):
        assert checked in out, checked

    def edit(stage, name, change):
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy)
        path = copy / f"stage{stage}" / name
        path.write_text(change(path.read_text()))
        assert main(["evaluate", "--run-dir", str(copy), "--stage", str(stage)]) == 1
        return capsys.readouterr().err

    def in_json(change):
        def apply(text):
            payload = json.loads(text)
            change(payload)
            return json.dumps(payload)
        return apply

    def log_line(text):  # stage 1's kept epoch always has its line
        kept = info_of(run / "stage1")["epoch"]
        lines = [json.loads(line) for line in text.splitlines()]
        next(r for r in lines if r["epoch"] == kept)["valid"]["full"]["ndcg@10"] += 0.01
        return "\n".join(json.dumps(r) for r in lines) + "\n"

    def column(text):
        rows = [line.split(",") for line in text.splitlines()]
        at = rows[0].index(f"epoch_{epoch}")
        rows[1][at] = str(int(rows[1][at]) + 1)
        return "\n".join(",".join(r) for r in rows) + "\n"

    def gate(payload):
        next(e for e in payload["gate"] if e["epoch"] == epoch)["gate"] += 1e-3

    def nudge(payload):
        payload["best"]["value"] += 0.01

    def weight(payload):
        payload["similarity_weights"]["text"] += 0.1

    def extra(payload):
        payload["test"]["full"]["hr@50"] = 0.99

    def text_value(payload):
        payload["valid"]["full"]["mrr"] = str(payload["valid"]["full"]["mrr"])

    for stage, name, change, message in (
            (3, "checkpoint.json", in_json(nudge), "stage3/checkpoint.json: best value: saved"),
            (3, "checkpoint.json", in_json(weight), "stage3/checkpoint.json: similarity_weights/text: saved"),
            (1, "log.jsonl", log_line, "valid/full/ndcg@10: saved"),
            (3, "valid_ranks_by_epoch.csv", column, f"epoch_{epoch} differs from the validation ranks now at 1 rows"),
            (3, "internals/gate.json", in_json(gate), f"stage3/internals/gate.json: epoch {epoch} gate: saved"),
            (3, "metrics.json", in_json(extra), "test/full/hr@50: in metrics.json but not recomputed"),
            (3, "metrics.json", in_json(text_value), "valid/full/mrr: saved '0."),
            (1, "test_ranks.csv", lambda t: t.replace("\n", ".000009\n", 2).replace(".000009\n", "\n", 1), "rank_sampled saved"),
            (1, "test_ranks.csv", lambda t: "\n".join([t.splitlines()[0], ",".join(t.splitlines()[1].split(",")[:2])]
                                                      + t.splitlines()[2:]) + "\n", "line 2: 2 cells saved, the header has 4")):
        assert message in edit(stage, name, change), (name, message)
    # a difference in a stage another commit of ur4rec wrote names that commit
    def other_commit(payload):
        payload["versions"]["ur4rec_commit"] = "0" * 40
        payload["best"]["value"] += 0.01

    assert f"written by ur4rec commit {'0' * 40}" in edit(3, "checkpoint.json", in_json(other_commit))
    # history files deleted: log.jsonl is a difference, valid_ranks_by_epoch.csv is listed as not checked
    copy = tmp_path / "copy"
    for stage in (1, 3):
        shutil.rmtree(copy)
        shutil.copytree(run, copy)
        (copy / f"stage{stage}/log.jsonl").unlink()
        assert main(["evaluate", "--run-dir", str(copy), "--stage", str(stage)]) == 1
        assert f"stage{stage}/log.jsonl is missing" in capsys.readouterr().err
    shutil.rmtree(copy)
    shutil.copytree(run, copy)
    (copy / "stage3/valid_ranks_by_epoch.csv").unlink()
    assert main(["evaluate", "--run-dir", str(copy), "--stage", "3"]) == 0
    assert "so not checked: " in (out := capsys.readouterr().out) and "stage3/valid_ranks_by_epoch.csv" in out
    # a stage that never reached its final evaluation is not reproduced, though the Pop baseline is
    (run / "stage1/metrics.json").unlink()
    assert main(["evaluate", "--run-dir", str(run), "--stage", "1"]) == 1
    assert "stage1 has no metrics.json: the stage stopped before its final evaluation" in capsys.readouterr().err


def test_cli_train_refused_or_failing_leaves_the_runs_config_and_skip_stage2_is_only_for_stage3(
        cli_config, tmp_path, capsys):
    config, built = cli_config
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--stage", "1", "--run-dir", str(run)]) == 0
    before = (run / "config.yaml").read_text()
    assert main(["train", "--config", str(config), "--stage", "3", "--run-dir", str(run), "--set", "train.seed=9"]) == 2
    assert main(["train", "--config", str(config), "--stage", "2", "--run-dir", str(run),
                 "--set", "model.hidden_size=32"]) == 2  # Stage 1's weights do not fit
    assert "did not load" in capsys.readouterr().err and (run / "config.yaml").read_text() == before
    for chosen in (["--stages", "1,2,3"], ["--stages", "2,3"], ["--stage", "1"]):
        assert main(["train", "--config", str(config), *chosen, "--skip-stage2", "--run-dir", str(run)]) == 2
        err = capsys.readouterr().err
        assert "--skip-stage2 trains Stage 3 straight from Stage 1" in err and f"(got {' '.join(chosen)})" in err
    assert not (run / "stage2").exists() and (run / "config.yaml").read_text() == before
    assert main(["train", "--config", str(config), "--stage", "3", "--skip-stage2", "--run-dir", str(run),
                 "--set", "train.seed=9"]) == 0  # a stage that trains makes its config the run's
    assert "seed: 9" in (run / "config.yaml").read_text()


def test_a_retrain_the_data_cannot_serve_fails_before_moving_the_finished_stages_aside(setup, cli_config, tmp_path,
                                                                                      capsys):
    config, _ = cli_config
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--stages", "1,2", "--run-dir", str(run)]) == 0
    before = {path: path.read_bytes() for path in [run / "config.yaml", *run.glob("stage*/*.*")]}
    for stage in ("1", "2"):  # 40 items: no user has 60 unseen ones to draw as sampled negatives
        assert main(["train", "--config", str(config), "--stage", stage, "--run-dir", str(run),
                     "--set", "eval.num_sampled_negatives=60"]) == 2
        assert "lower eval.num_sampled_negatives" in capsys.readouterr().err
    assert not list(run.glob("*.prev")) and {path: path.read_bytes() for path in before} == before
    # a dataset with no train interaction to predict (every user has 3: the train part is one item)
    three = build_dataset(RawInteractions("t", "t", np.repeat(["a", "b", "c", "d"], 3), np.arange(1, 13).astype(str),
                                          np.zeros(12, dtype=np.int64), {}))
    with pytest.raises(ValueError, match="no user has two or more train interactions"):
        train_stage1(setup[0], three, run)
    assert not list(run.glob("*.prev")) and {path: path.read_bytes() for path in before} == before


def test_a_stage_stopped_in_its_final_evaluation_is_unfinished(setup, stage1, tmp_path, monkeypatch):
    config, dataset, features = setup
    run = tmp_path / "run"
    shutil.copytree(stage1, run / "stage1")
    (run / "data.json").write_text("{}")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "write_internals", stopped)
    with pytest.raises(KeyboardInterrupt):
        train_stage(config, dataset, features, run, 2)
    assert not (run / "stage2/metrics.json").exists()  # so a rerun starts it over and keeps no half-written stage


def test_cli_train_refuses_a_later_stage_without_its_predecessor_before_building_features(
        cli_config, tmp_path, capsys):
    config, built = cli_config
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--stage", "2", "--run-dir", str(run)]) == 2
    assert "stage2 needs a valid stage-1 checkpoint" in capsys.readouterr().err
    assert built == [] and not (run / "stage1").exists() and not (run / "stage2").exists()


def test_cli_stages_must_be_increasing_stage_numbers(cli_config, tmp_path, capsys):
    config, _ = cli_config
    for stages_arg, message in (("2,1", "stages are 1, 2, 3 in increasing order"), ("1,4", "increasing order"),
                                ("1,1", "increasing order"),  # not Stage 1 twice, the first moved to stage1.prev
                                ("1,x", "expected comma-separated stage numbers")):
        assert main(["train", "--config", str(config), "--stages", stages_arg, "--run-dir", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err, stages_arg
    assert not list(tmp_path.glob("stage*"))


def test_cli_errors_exit_2_with_a_message(cli_config, setup, tmp_path, capsys):
    config, built = cli_config
    assert main(["train", "--config", str(config), "--set", "train.epoch=3", "--run-dir", str(tmp_path / "a")]) == 2
    assert "epoch" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["evaluate", "--run-dir", str(tmp_path / "missing"), "--stage", "2"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert main(["ablate", "--config", str(config), "--run-dir", str(tmp_path), "--only", "gate_off,no_memroy"]) == 2
    assert "unknown ablation 'no_memroy'" in capsys.readouterr().err and built == []
    assert main(["ablate", "--config", str(config), "--run-dir", str(tmp_path), "--set", "eval.ks=[5]",
                 "--set", "eval.select_metric=ndcg@5"]) == 2  # its table needs @10: refused before training
    assert "eval.ks must include 10, got [5]" in capsys.readouterr().err and built == []
    prepare_run(tmp_path / "b", *setup[:2])  # a run on other data
    assert main(["train", "--config", str(config), "--set", "data.synthetic_users=41", "--run-dir",
                 str(tmp_path / "b")]) == 2
    assert "holds a run on data" in capsys.readouterr().err and not (tmp_path / "b/stage1").exists()


def test_cli_data_stats_json_and_config_show_reflect_the_overrides(setup, cli_config, capsys):
    _, dataset, _ = setup
    config, _ = cli_config
    assert main(["data", "stats", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(dataset.summary()))
    assert main(["config", "show", "--config", str(config), "--set", "train.epochs=7"]) == 0
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert (lines["train.epochs"], lines["data.synthetic_users"]) == ("7", "40")


def test_compare_outputs_holds_ranks_and_ids_exactly_and_decimals_to_the_tolerance(tmp_path):
    saved, fresh = tmp_path / "saved", tmp_path / "fresh"
    for folder in (saved, fresh):
        (folder / "internals").mkdir(parents=True)
    header = "user_id,item_id,rank,weight\n"
    (saved / "internals/a.csv").write_text(header + "u1,i1,3,0.123456\nu2,i2,4,0.500000\nu3,i3,5,0.2\n")
    (fresh / "internals/a.csv").write_text(header + "u1,i1,3,0.123460\nu2,i9,3,0.500000\nu3,i3,5,0.20002\n")
    np.savez(saved / "internals/b.npz", ids=np.array([1, 2]), w=np.array([0.5, 0.25]))
    np.savez(fresh / "internals/b.npz", ids=np.array([1, 3]), w=np.array([0.500004, 0.25]))
    (fresh / "test_ranks.csv").write_text("user_id,target_item,rank_full,rank_sampled\n")
    compared, absent, differences = compare_outputs(saved, fresh)
    assert compared == ["internals/a.csv", "internals/b.npz"] and absent == ["test_ranks.csv"]
    assert differences == [  # 4e-6 and 4e-6 pass; another item, a rank one off and 2e-5 do not
        "internals/a.csv line 3 (user_id u2): item_id saved i2 vs now i9",
        "internals/a.csv line 3 (user_id u2): rank saved 4 vs now 3",
        "internals/a.csv line 4 (user_id u3): weight saved 0.2 vs now 0.20002",
        "internals/b.npz: ids differs at 1 of 2 entries",
    ]
    (fresh / "internals/a.csv").write_text("user_id,item_id,rank\n")
    assert compare_outputs(saved, fresh)[2][0].startswith("internals/a.csv: header ['user_id', 'item_id', 'rank', 'weight']")


def test_compare_outputs_counts_a_saved_file_that_does_not_read(tmp_path):
    # a cut-short attention.npz (a copy of the run stopped part way) stopped `ur4rec evaluate` with a
    # BadZipFile traceback; a ranks file or log that is not UTF-8 with a UnicodeDecodeError naming no file
    saved, fresh = tmp_path / "saved", tmp_path / "fresh"
    for folder in (saved, fresh):
        (folder / "stage3" / "internals").mkdir(parents=True)
        np.savez_compressed(folder / "stage3/internals/attention.npz", w=np.arange(1000.0))
        (folder / "stage3/test_ranks.csv").write_text("user_id,target_item,rank_full,rank_sampled\nu1,i1,1,1\n")
    whole = (saved / "stage3/internals/attention.npz").read_bytes()
    (saved / "stage3/internals/attention.npz").write_bytes(whole[: len(whole) // 2])
    (saved / "stage3/test_ranks.csv").write_bytes(b"user_id,target_item,rank_full,rank_sampled\nu1,\xff,1,1\n")
    differences = compare_outputs(saved, fresh)[2]
    assert len(differences) == 2
    assert differences[0].startswith("stage3/internals/attention.npz: the saved file does not read (")
    assert differences[1].startswith("stage3/test_ranks.csv: the saved file does not read (")
    # the kept epoch's history: a log or an epoch-ranks file that is not UTF-8 is a difference naming it
    (fresh / "stage3/valid_ranks.csv").write_text("user_id,target_item,rank_full,rank_sampled\nu1,i1,1,1\n")
    write_json(fresh / "stage3/metrics.json", {"valid": {"full": {"ndcg@10": 1.0}}})
    write_json(saved / "stage3/checkpoint.json", {"stage": 3, "epoch": 1,
                                                   "best": {"metric": "valid/full/ndcg@10", "value": 1.0}})
    for name in ("log.jsonl", "valid_ranks_by_epoch.csv"):
        (saved / "stage3" / name).write_bytes(b"\xf7\x00")
    assert [d.split(" (")[0] for d in check_history(saved / "stage3", fresh / "stage3")[1]] == [
        "stage3/log.jsonl: the saved file does not read", "stage3/valid_ranks_by_epoch.csv: the saved file does not read"]


def test_compare_outputs_holds_metrics_to_a_relative_1e_6_and_counts_a_saved_nan(tmp_path):
    saved, fresh = tmp_path / "saved", tmp_path / "fresh"
    for folder in (saved, fresh):
        (folder / "stage1").mkdir(parents=True)
    write_json(fresh / "stage1/metrics.json", {"test": {"full": {"ndcg@10": 0.25, "mrr": 0.5}}})
    write_json(saved / "stage1/metrics.json", {"test": {"full": {"ndcg@10": 0.25 * (1 + 1e-5), "mrr": 0.5 * (1 + 1e-8)}}})
    np.savez(fresh / "stage1/a.npz", w=np.array([0.5, 0.25]))
    np.savez(saved / "stage1/a.npz", w=np.array([0.5, np.nan]))
    assert compare_outputs(saved, fresh)[2] == [
        "stage1/metrics.json: test/full/ndcg@10: saved 0.2500025 vs now 0.25",  # 1e-5 off is a difference, 1e-8 not
        "stage1/a.npz: w differs by up to nan at 1 of 2 entries",
    ]


def test_check_history_wants_the_log_line_of_a_kept_epoch_after_0(tmp_path):
    # Stages 2-3 log no line for epoch 0 (the loaded weights); any later kept epoch must have one
    saved, fresh = tmp_path / "saved" / "stage2", tmp_path / "fresh" / "stage2"
    for folder in (saved, fresh):
        folder.mkdir(parents=True)
    write_json(fresh / "metrics.json", {"valid": {"full": {"ndcg@10": 0.5}}})
    (saved / "log.jsonl").write_text(json.dumps({"epoch": 1, "valid": {"full": {"ndcg@10": 0.4}}}) + "\n")
    for epoch, expected in ((0, []), (2, ["stage2/log.jsonl: no line for the kept epoch 2"])):
        write_json(saved / "checkpoint.json", {"stage": 2, "epoch": epoch,
                                               "best": {"metric": "valid/full/ndcg@10", "value": 0.5}})
        assert check_history(saved, fresh)[1] == expected, epoch


def test_the_pop_baseline_of_each_split_is_ranked_on_that_split(setup, tmp_path):
    from ur4rec.cli import write_pop_baseline
    from ur4rec.evaluation import Popularity, build_eval_inputs, evaluate, sample_negatives

    config, dataset, _ = setup
    pop = write_pop_baseline(tmp_path, dataset, config)
    negatives = sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
    for split in ("valid", "test"):
        expected = evaluate(Popularity(dataset), build_eval_inputs(dataset, split, config.data.max_len, negatives),
                            config.eval).metrics
        assert pop[split] == expected, split
    assert pop["valid"] != pop["test"]
    assert json.loads((tmp_path / "baselines/pop/metrics.json").read_text()) == pop


def test_a_stopped_ablation_rerun_keeps_no_row_for_the_variant_it_was_retraining(setup, stage1, tmp_path, monkeypatch):
    from ur4rec.training import ablate

    config, dataset, features = setup
    run = tmp_path / "run"
    shutil.copytree(stage1, run / "stage1")
    ablate.run_ablations(config, dataset, features, run, ["gate_off", "skip_stage2"])
    assert [row["variant"] for row in csv.DictReader(open(run / "ablations.csv"))] == ["gate_off", "skip_stage2"]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablate, "train_stage", stopped)
    with pytest.raises(KeyboardInterrupt):
        ablate.run_ablations(config, dataset, features, run, ["gate_off"])
    assert [row["variant"] for row in csv.DictReader(open(run / "ablations.csv"))] == ["skip_stage2"]
    # a config the data cannot serve is refused before any row is forgotten (40 items: 60 sampled negatives)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="lower eval.num_sampled_negatives"):
        ablate.run_ablations(config.override(["eval.num_sampled_negatives=60"]), dataset, features, run,
                             ["skip_stage2"])
    assert [row["variant"] for row in csv.DictReader(open(run / "ablations.csv"))] == ["skip_stage2"]


def test_ablate_refuses_an_unfinished_or_damaged_stage1_before_touching_any_variant(setup, stage1, tmp_path):
    # it copied RUN/stage1 over the variant's copy and dropped the variant's row first, then the variant's
    # Stage 2 refused "ablations/<variant>/stage1 ... train it again", naming the copy
    from ur4rec.training import ablate

    config, dataset, features = setup
    run = tmp_path / "run"
    shutil.copytree(stage1, run / "stage1")
    ablate.run_ablations(config, dataset, features, run, ["gate_off"])
    table, copy = (run / "ablations.csv").read_text(), run / "ablations" / "gate_off" / "stage1"
    (run / "stage1" / "metrics.json").unlink()  # a retrained Stage 1 that was stopped
    with pytest.raises(CheckpointError, match=rf"{run / 'stage1'}: it never finished"):
        ablate.run_ablations(config, dataset, features, run, ["gate_off"])
    assert (run / "ablations.csv").read_text() == table and (copy / "metrics.json").exists()
    shutil.copy(copy / "metrics.json", run / "stage1")
    weights = run / "stage1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # cut short
    with pytest.raises(CheckpointError, match=rf"{weights} is not the file"):
        ablate.run_ablations(config, dataset, features, run, ["gate_off"])
    assert (run / "ablations.csv").read_text() == table and (copy / "model.safetensors").read_bytes() != \
        weights.read_bytes()


def test_similarity_weights_are_fitted_to_the_optimum_from_wherever_they_start(setup, stage1, tmp_path, monkeypatch):
    # each validation refits from the previous weights; in float32 L-BFGS could stop there with
    # a gradient left (2e-5 above the optimum's loss on this run), keeping stale weights
    import torch.nn.functional as F

    config, dataset, features = setup
    shutil.copytree(stage1, tmp_path / "stage1")
    calls, real = [], stages.fit_similarity_weights

    def spy(base, terms, targets, initial):
        calls.append((base, terms, targets, initial.detach().clone(), real(base, terms, targets, initial)))
        return calls[-1][-1]

    monkeypatch.setattr(stages, "fit_similarity_weights", spy)
    train_stage(config.override(["moe.backbone_lr_scale=1.0"]), dataset, features, tmp_path, 3, skip_stage2=True)
    assert len(calls) >= 3
    for base, terms, targets, start, fitted in calls:
        def loss(weight, base=base, terms=terms, targets=targets):
            return F.cross_entropy(base.double() + torch.einsum("k,bkv->bv", weight.double(), terms.double()), targets)

        best = start.double().clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([best], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                      line_search_fn="strong_wolfe")
        optimizer.step(lambda optimizer=optimizer, best=best, loss=loss: _backward(optimizer, loss(best)))
        assert loss(fitted).item() <= loss(best.detach()).item() + 1e-7, start.tolist()


def _backward(optimizer, value):
    optimizer.zero_grad()
    value.backward()
    return value


def test_source_commit_is_only_that_of_a_repository_tracking_the_package(tmp_path, monkeypatch):
    # an installed copy inside another project's repository (a virtual environment in it) must not
    # be credited with that project's commit
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "README").write_text("another project\n")
    git("add", "README")
    git("commit", "-q", "-m", "other")
    package = tmp_path / "venv" / "ur4rec"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(ur4rec, "__file__", str(package / "__init__.py"))
    assert checkpoint.source_commit.__wrapped__() is None  # untracked there
    git("add", "venv/ur4rec/__init__.py")
    git("commit", "-q", "-m", "tracked")
    assert checkpoint.source_commit.__wrapped__() == git("rev-parse", "HEAD")
    (package / "__init__.py").write_text("changed = True\n")
    assert checkpoint.source_commit.__wrapped__() == git("rev-parse", "HEAD") + "+modified"


def test_the_weights_file_gets_the_same_permissions_as_the_runs_other_files(tmp_path):
    import os

    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, model, {"stage": 1})
    mode = os.stat(tmp_path / "model.safetensors").st_mode & 0o777
    # before: safetensors' save_file made it 0600, so others on a shared machine could not read the checkpoint
    assert mode == os.stat(tmp_path / "checkpoint.json").st_mode & 0o777
    assert torch.equal(load_file(tmp_path / "model.safetensors")["weight"], model.weight.detach())
