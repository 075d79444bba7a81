import pytest

from ur4rec.config import Config, ConfigError, describe


def test_yaml_round_trip(tmp_path):
    config = Config().override(["model.dropout=0.35", "train.epochs=7", "eval.ks=[1, 5]", "data.path=/x"])
    config.save(tmp_path / "c.yaml")
    again = Config.load(tmp_path / "c.yaml")
    assert again == config
    assert again.model.dropout == 0.35 and again.eval.ks == [1, 5] and again.data.path == "/x"


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
                              ("text.backend=3", "text: backend: expected a string"),
                              ("trian.epochs=3", "unknown key 'trian'"),
                              ("train=3", "section.key=value")):
        with pytest.raises(ConfigError, match=message):
            Config().override([override])

