import pytest

from ur4rec.config import CHOICES, Config, ConfigError, describe


def test_yaml_round_trip(tmp_path):
    config = Config().override(["model.dropout=0.35", "train.epochs=7", "eval.ks=[1, 10]", "data.path=/x"])
    config.save(tmp_path / "c.yaml")
    again = Config.load(tmp_path / "c.yaml")
    assert again == config
    assert again.model.dropout == 0.35 and again.eval.ks == [1, 10] and again.data.path == "/x"


def test_unknown_key_is_an_error_naming_it(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  dropuot: 0.3\n")
    with pytest.raises(ConfigError, match="dropuot"):
        Config.load(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="unknown key 'trainer'"):
        Config.from_dict({"trainer": {}})
    with pytest.raises(ConfigError, match="unknown keys 'dropuot', 'layers'"):  # every unknown key, not the first
        Config.from_dict({"model": {"layers": 3, "dropuot": 0.3}})


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train: epochs: expected an integer"):
        Config.from_dict({"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match="expected true or false"):
        Config.from_dict({"train": {"progress": "yes"}})


def test_every_field_has_a_meaning():
    rows = describe()
    assert len(rows) > 20
    assert all(meaning for _, _, meaning in rows)


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.glob("configs/*.yaml")):
        Config.load(path)


def test_numbers_and_list_elements_are_type_checked_and_defaults_are_not_shared():
    for raw in ({"train": {"epochs": None}}, {"train": {"epochs": 3.5}}, {"train": {"label_smoothing": True}},
                {"eval": {"ks": ["ten"]}}):
        with pytest.raises(ConfigError):
            Config.from_dict(raw)
    config = Config()
    config.eval.ks.append(99)
    assert Config().eval.ks == [5, 10, 20]


def test_overrides_are_type_checked_and_name_what_is_wrong():
    for override, message in (("train.epochs=true", "train: epochs: expected an integer"),
                              ("model.dropout=true", "model: dropout: expected a number"),
                              ("eval.ks=[5, x]", "eval: ks: expected an integer"),
                              ("trian.epochs=3", "unknown key 'trian'"),
                              ("train=3", "section.key=value"),
                              ("eval.ks=[5,10", "override 'eval.ks=\\[5,10': the value is not valid YAML"),
                              ("data.path=%x", "override 'data.path=%x': the value is not valid YAML")):
        with pytest.raises(ConfigError, match=message):
            Config().override([override])
    with pytest.raises(ConfigError, match="text: backend: expected a string"):
        Config.from_dict({"text": {"backend": 3}})
    # a text field keeps what was typed; a number may be written in exponent form
    config = Config().override(["data.path=2024", "text.folder=yes", "train.learning_rate=1e-3"])
    assert (config.data.path, config.text.folder, config.train.learning_rate) == ("2024", "yes", 0.001)
    assert Config.from_dict({"train": {"learning_rate": "1e-3"}}).train.learning_rate == 0.001


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", "train.epochs must be 1 or more, got 0"),
    ("train.batch_size=-5", "train.batch_size must be 1 or more"),
    ("train.eval_every=0", "train.eval_every must be 1 or more"),
    ("train.patience=0", "train.patience must be 1 or more"),
    ("data.max_len=0", "data.max_len must be 1 or more"),
    ("model.hidden_size=0", "model.hidden_size must be 1 or more"),
    ("eval.batch_size=0", "eval.batch_size must be 1 or more"),
    ("eval.num_sampled_negatives=-5", "eval.num_sampled_negatives must be 1 or more"),
    ("model.num_heads=3", "model.num_heads \\(3\\) must divide model.hidden_size \\(64\\)"),
    ("model.dropout=1.5", "model.dropout must be in \\[0, 1\\)"),
    ("train.learning_rate=.inf", "train.learning_rate must be a positive number"),
    ("eval.select_metric=foo", "eval.select_metric 'foo' is not computed"),
    ("eval.ks=[5]", "eval.select_metric 'ndcg@10' is not computed"),
    ("eval.ks=[0]", "eval.ks must be one or more cut-offs of 1 or more"),
    ("data.path=", "data.path is empty"),
    ("moe.novelty_threshold=1.0", "moe.novelty_threshold must be in \\[0, 1\\)"),
    ("moe.novelty_threshold=-0.1", "moe.novelty_threshold must be in \\[0, 1\\)"),
    ("moe.short_term_size=-1", "moe.short_term_size must be 0 or more"),
    ("moe.long_term_capacity=-2", "moe.long_term_capacity must be 0 or more"),
    ("moe.retrieval_top_k=-1", "moe.retrieval_top_k must be 0 or more"),
    ("moe.gate_init=0", "moe.gate_init must be a non-zero number"),
    ("moe.gate_init=.nan", "moe.gate_init must be a non-zero number"),
    # values known only where they are used, which for Stages 2-3 was after Stage 1 had trained
    ("text.leak_policy=drpo", "text.leak_policy 'drpo' is not one of warn, drop, redact"),
    ("text.backend=opneai", "text.backend 'opneai' is not one of template, openai"),
    ("moe.experts=[visual, semantc]", "moe.experts 'semantc' is not one of visual, semantic, preference, fusion"),
    ("moe.similarity=[txt]", "moe.similarity 'txt' is not one of text, image, collaborative"),
    ("moe.gate=off", "moe.gate 'off' is not one of scalar, none"),
    ("moe.gate_gradient=straight", "moe.gate_gradient 'straight' is not one of"),
    ("moe.loss_weighting=learned", "moe.loss_weighting 'learned' is not one of fixed, uncertainty"),
    ("moe.train_candidates=inbatch", "moe.train_candidates 'inbatch' is not one of sampled, in_batch, full"),
    ("train.lr_schedule=cosin", "train.lr_schedule 'cosin' is not one of constant, cosine"),
    ("train.precision=fp16", "train.precision 'fp16' is not one of auto, bf16, fp32"),
    ("features.precision=fp16", "features.precision 'fp16' is not one of auto, bf16, fp32"),
    ("train.loss=mse", "train.loss 'mse' is not one of ce, bpr, bce"),
    ("data.name=ml-20m", "data.name 'ml-20m' is not one of ml-100k, ml-1m, synthetic"),  # was accepted until loading
    ("train.grad_clip=.nan", "train.grad_clip must be a finite number, got nan"),
    ("moe.alignment_weight=.inf", "moe.alignment_weight must be a finite number, got inf"),
    ("data.synthetic_noise=1.5", "data.synthetic_noise is a probability, in \\[0, 1\\]; got 1.5"),
    ("data.synthetic_noise=-0.1", "data.synthetic_noise is a probability"),
    ("moe.memory_half_life=-1", "moe.memory_half_life must be a positive number"),
])
def test_values_the_code_cannot_use_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        Config().override(["train.loss=ce", override])


def test_a_zero_gate_init_is_fine_with_the_gate_off():
    assert Config().override(["moe.gate=none", "moe.gate_init=0"]).moe.gate_init == 0

def test_a_device_torch_cannot_use_here_is_named(smoke_config, tmp_path):
    import torch

    from ur4rec.cli import main
    from ur4rec.precision import check_device

    config = tmp_path / "c.yaml"
    smoke_config.save(config)
    cases = [("foo", "train.device 'foo' is not a torch device")]
    if not torch.cuda.is_available():  # where there is a GPU, cuda is a usable device
        cases.append(("cuda", "train.device is 'cuda' but torch finds no CUDA device here"))
    for device, message in cases:
        with pytest.raises(ValueError, match=message):
            check_device(device, "train.device")
        assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run"),
                     "--set", f"train.device={device}"]) == 2


def test_an_unusable_train_device_is_refused_before_texts_and_features_are_built(setup, tmp_path, monkeypatch):
    # before: `train --stage 2` and `ablate` generated the texts and encoded the features (minutes on
    # ML-100K), then Stage 2 refused the device
    from tiny_run import save_stage1

    from ur4rec.cli import main
    from ur4rec.rundir import prepare_run

    config, dataset, _ = setup
    run = tmp_path / "run"
    prepare_run(run, config, dataset)
    save_stage1(setup, run / "stage1")
    config.save(tmp_path / "c.yaml")
    monkeypatch.setenv("UR4REC_CACHE", str(tmp_path / "cache"))
    for command in (["train", "--stage", "2"], ["ablate"]):
        assert main([*command, "--config", str(tmp_path / "c.yaml"), "--run-dir", str(run),
                     "--set", "train.device=foo"]) == 2
        assert not (run / "texts").exists() and not (run / "features").exists(), command


def test_an_empty_config_file_or_a_key_given_twice_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match="c.yaml is empty"):
        Config.load(path)
    path.write_text("train:\n  epochs: 3\n  batch_size: 64\n  epochs: 5\n")
    with pytest.raises(ConfigError, match="key 'epochs' is given twice"):
        Config.load(path)


@pytest.mark.parametrize("setting, message", [
    ("moe.backbone_lr_scale=-1", "moe.backbone_lr_scale must be 0 or more"),  # Stage 3's backbone ascended its loss
    ("moe.alignment_weight=-0.1", "moe.alignment_weight must be 0 or more"),
    ("moe.load_balance_weight=-0.01", "moe.load_balance_weight must be 0 or more"),
    ("moe.surprise_alpha=-5", "moe.surprise_alpha must be 0 or more"),  # negative instance weights
    ("moe.router_hidden=0", "moe.router_hidden must be 1 or more"),  # a router that ignores its inputs
    ("moe.attention_sample_users=-1", "moe.attention_sample_users must be 0 or more"),  # failed after training
    ("moe.alignment_temperature=0", "moe.alignment_temperature must be a positive number"),  # NaN loss
    ("moe.memory_half_life=0", "moe.memory_half_life must be a positive number"),  # error naming no key
])
def test_moe_weights_scales_and_sizes_the_stages_cannot_use_are_named(setting, message):
    # before: each was accepted and trained silently the wrong way, or failed later naming no config key
    with pytest.raises(ConfigError, match=message):
        Config().override([setting])


@pytest.mark.parametrize("setting, message", [
    # numpy's own error, naming no key ("low >= high", "lam < 0", "expected non-negative integer")
    ("data.synthetic_items=0", "data.synthetic_items must be 1 or more"),
    ("data.synthetic_length=-3", "data.synthetic_length must be 0 or more"),
    ("data.synthetic_seed=-1", "data.synthetic_seed must be 0 or more"),
    ("train.seed=-1", "train.seed must be 0 or more"),
    ("eval.sample_seed=-1", "eval.sample_seed must be 0 or more"),  # after the finished stages were moved aside
    ("data.synthetic_users=0", "data.synthetic_users must be 1 or more"),  # blamed data.min_interactions
    # LLM backends: refused when the generator was built, in `train --stages 1,2` after Stage 1 had trained
    ("text.max_retries=-1", "text.max_retries must be 0 or more"),
    ("text.max_new_tokens=0", "text.max_new_tokens must be 1 or more"),
    ("text.retry_backoff=-1", "text.retry_backoff must be 0 or more"),  # time.sleep raised on the first retry
    ("text.temperature=-0.5", "text.temperature must be 0 or more"),
    ("text.request_timeout=0", "text.request_timeout must be a positive number"),  # every request failed at once
])
def test_data_seed_and_text_settings_the_code_cannot_use_are_named(setting, message):
    with pytest.raises(ConfigError, match=message):
        Config().override([setting])


def test_the_configs_choices_are_the_ones_the_code_knows():
    from ur4rec.models.losses import LOSSES
    from ur4rec.models.similarity import SOURCES
    from ur4rec.models.ur4rec_model import EXPERTS
    from ur4rec.precision import PRECISIONS
    from ur4rec.text import BACKENDS, LEAK_POLICIES

    assert (CHOICES["train.loss"], CHOICES["moe.experts"], CHOICES["moe.similarity"]) == (LOSSES, EXPERTS, SOURCES)
    assert CHOICES["train.precision"] == CHOICES["features.precision"] == PRECISIONS
    assert (CHOICES["text.backend"], CHOICES["text.leak_policy"]) == (BACKENDS, LEAK_POLICIES)
    for key, known in CHOICES.items():  # every value the code knows is accepted
        for value in known:
            Config().override([f"{key}={[value] if key in ('moe.experts', 'moe.similarity') else value}"])
