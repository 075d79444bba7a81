import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_run import CountingEncoder, MeanColourEncoder

from ur4rec.cli import main
from ur4rec.features import (
    EncoderUnavailableError,
    FeatureSet,
    FeaturesNotFoundError,
    build_features,
    build_image_features,
    build_text_features,
    load_features,
    semantic,
    visual,
)
from ur4rec.features.quality import (
    genre_agreement,
    modality_quality,
    random_pair_cosine,
    user_text_alignment,
    within_user_cosine,
)
from ur4rec.features.visual import ImageFolderNotFoundError
from ur4rec.text.prompts import display_genres


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every feature store write goes under tmp_path, never into ~/.cache."""
    monkeypatch.setenv("UR4REC_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------- semantic encoder


@pytest.mark.slow
def test_bundled_minilm_encodes_offline_to_384_d_unit_vectors():
    encoder = semantic.load_text_encoder("all-MiniLM-L6-v2", batch_size=4, precision="fp32")
    vectors = encoder.encode(["A heist film.", "A bank robbery thriller.", "A cartoon about toys."])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # it is a real sentence model
    bf16 = semantic.load_text_encoder("all-MiniLM-L6-v2", precision="bf16").encode(["A heist film."])
    assert float(bf16[0] @ vectors[0]) > 0.999


def test_both_names_of_the_bundled_model_resolve_to_the_local_copy():
    for name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        resolved = semantic.resolve_text_model(name)
        assert resolved.identity == "sentence-transformers/all-MiniLM-L6-v2" and resolved.local
        assert (Path(resolved.location) / "model.safetensors").is_file()


def test_text_model_that_looks_like_a_missing_path_is_an_error():
    for name in ("./no-such-model", "/no/such/model", "~/no-such-model", "org/model/extra"):
        with pytest.raises(EncoderUnavailableError, match="looks like a path but is not a folder"):
            semantic.resolve_text_model(name)
    assert semantic.resolve_text_model("org/some-model") == semantic.ResolvedModel("org/some-model", "org/some-model",
                                                                                   False)


def test_hub_model_name_offline_fails_at_once():
    started = time.perf_counter()
    with pytest.raises(EncoderUnavailableError, match="HF_HUB_OFFLINE is set"):
        semantic.load_text_encoder("sentence-transformers/some-model-not-cached")
    assert time.perf_counter() - started < 15


# ---------------------------------------------------------------- visual encoder


def write_images(folder, raw_ids):
    """Five decodable images in three formats, one corrupt file; any other id has no image."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    formats = ["png", "jpeg", "bmp", "png", "jpeg"]
    for raw_id, fmt in zip(raw_ids[:5], formats):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{raw_id}.{fmt.replace('jpeg', 'jpg')}", format=fmt.upper())
    (folder / f"{raw_ids[5]}.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (folder / "notes.txt").write_text("not an item")


def test_clip_features_mask_missing_and_corrupt_images(smoke_config, synthetic, tmp_path, caplog):
    raw_ids = [str(raw_id) for raw_id in synthetic.item_raw_ids[1:7]]
    write_images(tmp_path / "images", raw_ids)
    config = smoke_config.override([f"features.image_folder={tmp_path / 'images'}",
                                    "features.image_model=ViT-S-32-alt"])
    with caplog.at_level(logging.WARNING):
        entry = build_features_image_only(config, synthetic, tmp_path / "run")
    assert f"{synthetic.n_items - 6} of {synthetic.n_items} items have no image and 1 image files could not be read" \
        in caplog.text
    arrays = {name: np.load(f"{entry['path']}/{name}.npy") for name in ("item_image", "item_image_mask")}
    mask = arrays["item_image_mask"]
    assert mask.shape == (synthetic.n_items + 1,) and not mask[0]
    assert mask[1:6].all() and not mask[6] and mask.sum() == 5  # item 6 is the corrupt file
    assert entry["coverage"]["item_image"] == pytest.approx(5 / synthetic.n_items)
    assert entry["unreadable_images"] == [f"{raw_ids[5]}.jpg"] and entry["missing_images"] == synthetic.n_items - 6
    np.testing.assert_allclose(np.linalg.norm(arrays["item_image"][mask], axis=1), 1.0, atol=1e-4)
    assert not arrays["item_image"][~mask].any()


def build_features_image_only(config, dataset, run_dir):
    return build_image_features(config, dataset, run_dir, progress=False)


def test_clip_tag_offline_and_missing_checkpoint_fail_at_once(tmp_path):
    started = time.perf_counter()
    with pytest.raises(EncoderUnavailableError, match="give features.image_pretrained as the local checkpoint file"):
        visual.load_image_encoder("ViT-S-32-alt", "openai")
    assert time.perf_counter() - started < 5
    with pytest.raises(ImageFolderNotFoundError, match="no such checkpoint file"):
        visual.load_image_encoder("ViT-S-32-alt", str(tmp_path / "clip.pt"))
    with pytest.raises(ImageFolderNotFoundError, match="is not a folder"):
        visual.find_images(tmp_path / "nowhere", ["1"])


def test_clip_tag_fails_before_open_clip_when_the_hub_is_unusable(monkeypatch):
    import open_clip

    def would_download(*args, **kwargs):
        raise RuntimeError("open_clip was asked to download")

    monkeypatch.setattr(visual, "hub_unavailable_reason", lambda: "the hub is down (test)")
    monkeypatch.setattr(visual, "_hub_library_offline", lambda: False)  # huggingface_hub itself would try
    monkeypatch.setattr(open_clip, "create_model_and_transforms", would_download)
    with pytest.raises(EncoderUnavailableError, match=r"'openai' is an open_clip tag whose weights come from the "
                                                      r"Hugging Face hub, and the hub is down \(test\)"):
        visual.load_image_encoder("ViT-S-32-alt", "openai")


def test_image_set_is_rebuilt_when_an_image_file_changes(smoke_config, synthetic, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(visual, "load_image_encoder", lambda *args, **kwargs: loads.append(args) or MeanColourEncoder())
    raw_ids = [str(raw_id) for raw_id in synthetic.item_raw_ids[1:7]]
    write_images(tmp_path / "images", raw_ids)
    config = smoke_config.override([f"features.image_folder={tmp_path / 'images'}",
                                    "features.image_model=ViT-S-32-alt"])
    first = build_features_image_only(config, synthetic, tmp_path / "run")
    build_features_image_only(config, synthetic, tmp_path / "run")
    assert len(loads) == 1  # nothing changed: the set is reused
    Image.new("RGB", (48, 48), (250, 10, 10)).save(tmp_path / "images" / f"{raw_ids[0]}.png")
    second = build_features_image_only(config, synthetic, tmp_path / "run")
    assert len(loads) == 2 and second["path"] != first["path"]
    red = np.load(f"{second['path']}/item_image.npy")[1]
    np.testing.assert_allclose(red, semantic.normalise_rows(np.array([[250.0, 10.0, 10.0]]))[0], rtol=1e-5)


# ---------------------------------------------------------------- feature store


def test_feature_store_reuses_sets_and_force_rebuilds(smoke_config, synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(semantic, "load_text_encoder", lambda *args, **kwargs: CountingEncoder())
    CountingEncoder.calls = 0
    first = build_features(smoke_config, synthetic, tmp_path / "a", progress=False)
    assert CountingEncoder.calls == 2  # items, users
    second = build_features(smoke_config, synthetic, tmp_path / "b", progress=False)  # another run, same inputs
    assert CountingEncoder.calls == 2
    np.testing.assert_array_equal(first.item_text, second.item_text)
    build_features(smoke_config, synthetic, tmp_path / "b", force=True, progress=False)
    assert CountingEncoder.calls == 4
    manifest = json.loads((tmp_path / "a" / "features" / "manifest.json").read_text())
    assert manifest["fingerprint"] == synthetic.fingerprint and manifest["image"] is None
    assert manifest["text"]["path"].startswith(str(tmp_path / "cache" / "features" / synthetic.fingerprint))
    assert set(manifest["text"]) >= {"encoder", "dim", "coverage", "created", "fingerprint"}
    # Another precision gives other numbers: a set of its own, encoded anew.
    other = "fp32" if semantic.check_precision(smoke_config.features.precision) == "bf16" else "bf16"
    build_text_features(smoke_config.override([f"features.precision={other}"]), synthetic, tmp_path / "a", progress=False)
    assert CountingEncoder.calls == 6


def test_a_forced_rebuild_stopped_half_way_leaves_a_set_that_is_rebuilt_not_reused(tmp_path, monkeypatch):
    from ur4rec.features import store

    folder = tmp_path / "set"
    store.save_set(folder, {"a": np.zeros(2), "b": np.zeros(2)}, {"kind": "text"})
    saved, real_save = [], np.save

    def stopped(path, array):  # the second array of the rebuild never gets written
        if saved:
            raise KeyboardInterrupt
        saved.append(path)
        real_save(path, array)

    monkeypatch.setattr(store.np, "save", stopped)
    with pytest.raises(KeyboardInterrupt):
        store.save_set(folder, {"a": np.ones(2), "b": np.ones(2)}, {"kind": "text"})
    assert store.read_manifest(folder) is None  # old b.npy beside a new a.npy: not a complete set


def test_load_features_names_what_is_missing(synthetic, tmp_path, smoke_config, monkeypatch):
    with pytest.raises(FeaturesNotFoundError, match="ur4rec features text --run-dir"):
        load_features(tmp_path / "empty", synthetic)
    monkeypatch.setattr(semantic, "load_text_encoder", lambda *args, **kwargs: CountingEncoder())
    features = build_features(smoke_config, synthetic, tmp_path / "run", progress=False)
    assert features.item_text.shape == (synthetic.n_items + 1, 8) and not features.item_text[0].any()
    assert features.user_text.shape == (synthetic.n_users, 8) and features.user_text_mask.all()
    assert features.item_image is None and features.item_image_mask is None
    path = json.loads((tmp_path / "run" / "features" / "manifest.json").read_text())["text"]["path"]
    (tmp_path / "cache" / "features" / synthetic.fingerprint / path.split("/")[-1] / "user_text.npy").unlink()
    with pytest.raises(FeaturesNotFoundError, match=r"user_text.npy is missing.*Rebuild them with `ur4rec features "
                                                    r"text --config .*/run/config.yaml --run-dir .*/run --force`"):
        load_features(tmp_path / "run", synthetic)


def test_load_features_refuses_a_set_whose_rebuild_was_stopped(synthetic, tmp_path, smoke_config, monkeypatch):
    # a `features text --force` stopped half-way leaves the set without its manifest and an array cut
    # short; `ur4rec evaluate --stage 2` read it and stopped at "EOF: reading magic string", naming no file
    monkeypatch.setattr(semantic, "load_text_encoder", lambda *args, **kwargs: CountingEncoder())
    build_features(smoke_config, synthetic, tmp_path / "run", progress=False)
    folder = Path(json.loads((tmp_path / "run" / "features" / "manifest.json").read_text())["text"]["path"])
    (folder / "item_text.npy").write_bytes((folder / "item_text.npy").read_bytes()[:6])
    with pytest.raises(FeaturesNotFoundError, match=r"item_text\.npy is not a readable array .*Rebuild them with"):
        load_features(tmp_path / "run", synthetic)
    (folder / "manifest.json").unlink()
    with pytest.raises(FeaturesNotFoundError, match=rf"{folder} has no manifest\.json: its build was stopped .*Rebuild"):
        load_features(tmp_path / "run", synthetic)


def test_load_features_refuses_features_built_for_other_data(synthetic, tmp_path, smoke_config, monkeypatch):
    monkeypatch.setattr(semantic, "load_text_encoder", lambda *args, **kwargs: CountingEncoder())
    build_features(smoke_config, synthetic, tmp_path / "run", progress=False)
    path = tmp_path / "run" / "features" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fingerprint": "other-data"}))
    with pytest.raises(FeaturesNotFoundError, match=f"built for data other-data, not {synthetic.fingerprint}"):
        load_features(tmp_path / "run", synthetic)


def test_text_set_is_rebuilt_when_an_item_description_or_a_user_paragraph_changes(smoke_config, synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(semantic, "load_text_encoder", lambda *args, **kwargs: CountingEncoder())
    CountingEncoder.calls = 0
    folder = tmp_path / "llm"
    folder.mkdir()
    users = {str(raw_id): f"paragraph {raw_id}" for raw_id in synthetic.user_raw_ids}
    (folder / "user_preferences.json").write_text(json.dumps(users))
    item = str(synthetic.item_raw_ids[1])
    (folder / "item_descriptions.json").write_text(json.dumps({item: "Item 1, a quiet film."}))
    config = smoke_config.override(["text.backend=json", f"text.folder={folder}"])
    first = build_features(config, synthetic, tmp_path / "run", progress=False)
    assert CountingEncoder.calls == 2
    (folder / "item_descriptions.json").write_text(json.dumps({item: "Item 1, a loud film."}))
    second = build_features(config, synthetic, tmp_path / "run", progress=False)
    assert CountingEncoder.calls == 4  # the user texts are the same, the item inputs are not
    assert (first.item_text[1] != second.item_text[1]).any()
    np.testing.assert_array_equal(first.item_text[2:], second.item_text[2:])
    np.testing.assert_array_equal(first.user_text, second.user_text)
    # user texts count by content too: an edited (e.g. redacted) paragraph is encoded again
    users[str(synthetic.user_raw_ids[0])] = "paragraph [redacted]"
    (folder / "user_preferences.json").write_text(json.dumps(users))
    third = build_features(config, synthetic, tmp_path / "run", progress=False)
    assert CountingEncoder.calls == 6
    np.testing.assert_allclose(third.user_text[0], CountingEncoder().encode(["paragraph [redacted]"])[0], rtol=1e-6)
    np.testing.assert_array_equal(second.user_text[1:], third.user_text[1:])


def test_leak_policy_drop_masks_leaking_users(synthetic, smoke_config, tmp_path, monkeypatch):
    monkeypatch.setattr(semantic, "load_text_encoder", lambda *args, **kwargs: CountingEncoder())
    run = tmp_path / "run"
    build_features(smoke_config, synthetic, run, progress=False)  # writes the template texts
    users = json.loads((run / "texts" / "user_texts.json").read_text())
    user = next(u for u in range(synthetic.n_users) if synthetic.target("valid")[u] not in synthetic.train_sequence(u))
    folder = tmp_path / "llm"
    folder.mkdir()
    users[str(synthetic.user_raw_ids[user])] += f" Loves {synthetic.item_meta[synthetic.target('valid')[user]].title}."
    (folder / "user_preferences.json").write_text(json.dumps(users))
    (folder / "item_descriptions.json").write_text("{}")
    config = smoke_config.override(["text.backend=json", f"text.folder={folder}", "text.leak_policy=drop"])
    features = build_features(config, synthetic, run, progress=False)
    assert not features.user_text_mask[user] and features.user_text_mask.sum() == synthetic.n_users - 1
    assert f"\n{synthetic.user_raw_ids[user]},1,0,Item " in (run / "texts" / "audit.csv").read_text()


# ---------------------------------------------------------------- quality


def test_quality_identities_match_brute_force(synthetic):
    rng = np.random.default_rng(0)
    vectors = semantic.normalise_rows(rng.normal(size=(synthetic.n_items + 1, 6)) + 0.5)
    mask = np.ones(synthetic.n_items + 1, dtype=bool)
    mask[0] = mask[5] = False
    covered = vectors[mask]
    pairs = covered @ covered.T
    n = len(covered)
    assert random_pair_cosine(vectors, mask) == pytest.approx((pairs.sum() - n) / (n * (n - 1)), rel=1e-5)
    means = []
    for user in range(synthetic.n_users):
        items = [i for i in set(synthetic.train_sequence(user).tolist()) if mask[i]]
        if len(items) >= 2:
            sims = [vectors[a] @ vectors[b] for a in items for b in items if a != b]
            means.append(np.mean(sims))
    assert within_user_cosine(vectors, mask, synthetic) == pytest.approx(np.mean(means), rel=1e-5)


def test_quality_lift_on_known_cases(synthetic):
    rng = np.random.default_rng(1)
    genres = sorted({g for meta in synthetic.item_meta[1:] for g in meta.genres})
    one_hot = np.zeros((synthetic.n_items + 1, len(genres)), dtype=np.float32)
    for item in range(1, synthetic.n_items + 1):
        one_hot[item, genres.index(synthetic.item_meta[item].genres[0])] = 1.0
    mask = np.ones(synthetic.n_items + 1, dtype=bool)
    mask[0] = False
    # Items a user puts together share a genre arc, so genre features are nearly identical within users.
    informed = modality_quality(one_hot + 0.05, mask, synthetic)
    assert informed["lift_pct"] > 100
    assert informed["genre_agreement_knn"] > 0.95 > 0.3 > informed["genre_agreement_random"]
    # Features that know nothing about users or genres: no lift, no genre agreement beyond chance.
    noise = modality_quality(rng.random((synthetic.n_items + 1, 32)).astype(np.float32), mask, synthetic)
    assert abs(noise["lift_pct"]) < 3
    assert abs(noise["genre_agreement_knn"] - noise["genre_agreement_random"]) < 0.06
    assert noise["coverage"] == 1.0
    knn, random = genre_agreement(one_hot + 0.05, mask, synthetic, k=5)
    assert knn == pytest.approx(1.0)


def test_random_genre_agreement_is_the_share_of_other_items_sharing_a_genre(synthetic):
    vectors = np.random.default_rng(2).normal(size=(synthetic.n_items + 1, 4))
    mask = np.ones(synthetic.n_items + 1, dtype=bool)
    mask[0] = mask[7] = False
    covered = np.flatnonzero(mask)
    genres = {item: set(display_genres(synthetic.item_meta[item])) for item in covered}
    shares = [np.mean([bool(genres[item] & genres[other]) for other in covered if other != item])
              for item in covered if genres[item]]
    _, random = genre_agreement(vectors, mask, synthetic, k=5)
    assert random == pytest.approx(np.mean(shares), abs=1e-9)


def test_user_text_alignment_compares_each_user_with_their_validation_item(synthetic):
    # One-hot item texts; each user's paragraph is exactly their validation item's text.
    item_text = np.eye(synthetic.n_items + 1, dtype=np.float32)
    item_text[0, 0] = 0
    item_mask = np.ones(synthetic.n_items + 1, dtype=bool)
    item_mask[0] = False
    user_text = item_text[synthetic.target("valid")]
    assert (synthetic.target("valid") != synthetic.target("test")).all()  # test items are orthogonal
    features = FeatureSet(item_text, item_mask, user_text, np.ones(synthetic.n_users, dtype=bool))
    alignment = user_text_alignment(features, synthetic)
    assert alignment["user_to_valid_item_cosine"] == pytest.approx(1.0)
    assert alignment["user_to_random_item_cosine"] == pytest.approx(1 / synthetic.n_items)


# ---------------------------------------------------------------- command line


@pytest.mark.slow
def test_cli_features_text_and_quality(tmp_path, capsys):
    run = tmp_path / "run"
    smoke = ["--config", "configs/smoke.yaml", "--run-dir", str(run), "--set", "train.progress=false"]
    assert main(["features", "text", *smoke]) == 0
    out = capsys.readouterr().out
    assert "sentence-transformers/all-MiniLM-L6-v2 (384-d)" in out and str(tmp_path / "cache") in out
    assert main(["features", "quality", *smoke]) == 0
    out = capsys.readouterr().out
    assert "text" in out and "lift" in out
    quality = json.loads((run / "features" / "quality.json").read_text())
    text = quality["modalities"]["text"]
    assert text["coverage"] == 1.0 and text["lift_pct"] > 0  # template texts carry the planted genre arcs
    assert text["genre_agreement_knn"] > text["genre_agreement_random"]
    with open(run / "features" / "projection.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["item_id", "modality", "x", "y", "genre"] and len(rows) == 100
    assert {row["modality"] for row in rows} == {"text"} and rows[0]["genre"]
    assert main(["features", "image", *smoke]) == 2  # no image folder configured: a clear error
    assert "features.image_folder is not set" in capsys.readouterr().err


def test_a_reader_never_sees_a_half_written_run_manifest(tmp_path):
    # Two commands on one run directory (e.g. `features text` while a stage starts) read and
    # write RUN/features/manifest.json; a reader must see the old or the new file, never a torn one.
    import threading

    from ur4rec.features.store import run_manifest_path, update_run_manifest

    update_run_manifest(tmp_path, "fp", "text", {"n": -1})
    done, torn = threading.Event(), []

    def read_repeatedly():
        while not done.is_set():
            try:
                json.loads(run_manifest_path(tmp_path).read_text())
            except ValueError as error:
                torn.append(error)

    reader = threading.Thread(target=read_repeatedly)
    reader.start()
    try:
        for n in range(200):
            update_run_manifest(tmp_path, "fp", "text", {"n": n, "padding": "x" * 200_000})
    finally:
        done.set()
        reader.join()
    assert not torn, f"{len(torn)} reads saw a partly written manifest: {torn[0]}"
    assert json.loads(run_manifest_path(tmp_path).read_text())["text"]["n"] == 199


def test_a_local_text_model_folder_whose_files_change_gets_new_features(smoke_config, synthetic, tmp_path, monkeypatch):
    # a folder is named by its path, but what it holds can change (other weights, other pooling):
    # the stored set must not be reused then
    monkeypatch.setattr(semantic, "load_text_encoder", lambda *args, **kwargs: CountingEncoder())
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text('{"pooling": "mean"}')
    config = smoke_config.override([f"features.text_model={model}"])
    CountingEncoder.calls = 0
    build_features(config, synthetic, tmp_path / "run", progress=False)
    build_features(config, synthetic, tmp_path / "run", progress=False)
    assert CountingEncoder.calls == 2  # the second build reused the stored set (items, users)
    (model / "config.json").write_text('{"pooling": "cls", "changed": true}')
    build_features(config, synthetic, tmp_path / "run", progress=False)
    assert CountingEncoder.calls == 4
