"""Build a run's features (texts -> audit -> leak policy -> encoders -> store) and load them back.

Feature extraction is an offline step (DESIGN section 2, STYLE rule 7): models never run an
encoder; they read the arrays of a :class:`FeatureSet`. ``build_features`` generates the
texts if the run has none (from the cache otherwise), audits the user texts for held-out
titles and applies ``text.leak_policy`` before anything is encoded, so a dropped or
redacted text never reaches a feature. Encoded sets are reused from the store unless
``force`` is given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ur4rec.config import Config
from ur4rec.data.dataset import SequenceDataset
from ur4rec.features import semantic, visual
from ur4rec.features.store import (
    FeaturesNotFoundError,
    inputs_hash,
    load_arrays,
    read_manifest,
    read_run_manifest,
    save_set,
    store_folder,
    update_run_manifest,
)
from ur4rec.text import apply_leak_policy, audit_user_texts, generate_texts, texts_dir, write_audit_csv

TEXT_ARRAYS = ["item_text", "item_text_mask", "user_text", "user_text_mask"]
IMAGE_ARRAYS = ["item_image", "item_image_mask"]


@dataclass
class FeatureSet:
    item_text: np.ndarray  # (n_items + 1, D_t) float32, row 0 = padding zeros
    item_text_mask: np.ndarray  # (n_items + 1,) bool, row 0 False
    user_text: np.ndarray  # (n_users, D_t) float32 (preference paragraphs)
    user_text_mask: np.ndarray  # (n_users,) bool
    item_image: np.ndarray | None = None  # (n_items + 1, D_v) or None when no image folder
    item_image_mask: np.ndarray | None = None  # (n_items + 1,) bool


def build_features(
    config: Config, dataset: SequenceDataset, run_dir: Path, force: bool = False, progress: bool = True
) -> FeatureSet:
    """Text features always, image features when ``features.image_folder`` is set; writes
    ``RUN/features/manifest.json`` and returns what :func:`load_features` would read."""
    build_text_features(config, dataset, run_dir, force=force, progress=progress)
    if config.features.image_folder:
        build_image_features(config, dataset, run_dir, force=force, progress=progress)
    else:
        update_run_manifest(run_dir, dataset.fingerprint, "image", None)
    return load_features(run_dir, dataset)


def build_text_features(
    config: Config, dataset: SequenceDataset, run_dir: Path, force: bool = False, progress: bool = True
) -> dict:
    """Encode item descriptions and (policy-applied) user texts; returns the run manifest entry."""
    texts = generate_texts(config, dataset, run_dir, progress=progress)
    audit = audit_user_texts(texts.users, dataset)
    write_audit_csv(audit, texts_dir(run_dir) / "audit.csv")
    user_texts = apply_leak_policy(texts.users, audit, config.text.leak_policy)

    item_inputs = semantic.item_text_inputs(dataset, texts.items)  # (n_items,)
    user_inputs = [user_texts.get(str(raw_id)) for raw_id in dataset.user_raw_ids]  # (n_users,) or None
    resolved = semantic.resolve_text_model(config.features.text_model)
    precision = semantic.check_precision(config.features.precision, config.features.device)
    # (a local folder's signature joins only when it has one, so the bundled model's sets keep their digest)
    digest = inputs_hash([resolved.identity, *([resolved.signature] if resolved.signature else []), precision,
                          item_inputs, user_inputs])
    folder = store_folder(dataset.fingerprint, "text", Path(resolved.identity).name, digest)
    manifest = read_manifest(folder)
    if manifest is None or force:
        started = time.perf_counter()
        encoder = semantic.load_text_encoder(config.features.text_model, config.features.device,
                                             config.features.batch_size, precision)
        loaded = time.perf_counter()
        item_vectors = encoder.encode(item_inputs, progress=progress)  # (n_items, D)
        encoded_items = time.perf_counter()
        has_text = np.array([text is not None for text in user_inputs], dtype=bool)
        user_vectors = encoder.encode([text for text in user_inputs if text is not None], progress=progress)
        finished = time.perf_counter()

        item_text = np.zeros((dataset.n_items + 1, encoder.dim), dtype=np.float32)
        item_text[1:] = item_vectors
        item_text_mask = np.ones(dataset.n_items + 1, dtype=bool)
        item_text_mask[0] = False
        user_text = np.zeros((dataset.n_users, encoder.dim), dtype=np.float32)
        user_text[has_text] = user_vectors
        described = sum(str(raw_id) in texts.items for raw_id in dataset.item_raw_ids[1:])
        manifest = {
            "kind": "text",
            "encoder": encoder.identity,
            "precision": precision,
            "dim": encoder.dim,
            "coverage": {
                "item_text": float(item_text_mask[1:].mean()),
                "item_description": described / dataset.n_items,
                "user_text": float(has_text.mean()),
            },
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "fingerprint": dataset.fingerprint,
            "inputs_hash": digest,
            "text_backend": texts.backend,
            "leak_policy": config.text.leak_policy,
            "leaking_user_texts": audit.counts()["names_either"],
            "seconds": {"load_model": loaded - started, "items": encoded_items - loaded,
                        "users": finished - encoded_items, "total": finished - started},
            "arrays": TEXT_ARRAYS,
        }
        save_set(folder, {"item_text": item_text, "item_text_mask": item_text_mask,
                          "user_text": user_text, "user_text_mask": has_text}, manifest)
    entry = {**manifest, "path": str(folder)}
    update_run_manifest(run_dir, dataset.fingerprint, "text", entry)
    return entry


def build_image_features(
    config: Config, dataset: SequenceDataset, run_dir: Path, force: bool = False, progress: bool = True
) -> dict:
    """Encode the item images of ``features.image_folder``; returns the run manifest entry."""
    if not config.features.image_folder:
        raise ValueError("features.image_folder is not set: there are no images to encode")
    raw_ids = [str(raw_id) for raw_id in dataset.item_raw_ids[1:]]
    images = visual.find_images(Path(config.features.image_folder), raw_ids)
    model, pretrained = config.features.image_model, config.features.image_pretrained
    identity = f"{model}/{visual.pretrained_identity(pretrained)}"
    precision = semantic.check_precision(config.features.precision, config.features.device)
    files = sorted((raw_id, path.name, path.stat().st_size, path.stat().st_mtime_ns) for raw_id, path in images.items())
    digest = inputs_hash([identity, precision, str(Path(config.features.image_folder).expanduser().resolve()), files])
    label = f"{model}-{Path(pretrained).name if pretrained else 'random'}"
    folder = store_folder(dataset.fingerprint, "image", label, digest)
    manifest = read_manifest(folder)
    if manifest is None or force:
        started = time.perf_counter()
        encoder = visual.load_image_encoder(model, pretrained, config.features.device, precision)
        encoding = visual.encode_item_images(encoder, raw_ids, images, config.features.batch_size, progress)
        manifest = {
            "kind": "image",
            "encoder": identity,
            "precision": precision,
            "dim": encoder.dim,
            "coverage": {"item_image": float(encoding.mask[1:].mean())},
            "missing_images": encoding.missing,
            "unreadable_images": encoding.unreadable,
            "image_folder": str(Path(config.features.image_folder).expanduser().resolve()),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "fingerprint": dataset.fingerprint,
            "inputs_hash": digest,
            "seconds": {"total": time.perf_counter() - started},
            "arrays": IMAGE_ARRAYS,
        }
        save_set(folder, {"item_image": encoding.vectors, "item_image_mask": encoding.mask}, manifest)
    entry = {**manifest, "path": str(folder)}
    update_run_manifest(run_dir, dataset.fingerprint, "image", entry)
    return entry


def load_features(run_dir: Path, dataset: SequenceDataset) -> FeatureSet:
    """The arrays ``RUN/features/manifest.json`` points at, checked against ``dataset``."""
    manifest = read_run_manifest(run_dir)
    if manifest.get("fingerprint") != dataset.fingerprint:
        raise FeaturesNotFoundError(
            f"{run_dir}/features were built for data {manifest.get('fingerprint')}, not {dataset.fingerprint}; "
            "rebuild them with `ur4rec features text`"
        )
    if not manifest.get("text"):
        raise FeaturesNotFoundError(f"{run_dir}/features/manifest.json has no text features; "
                                    f"run `ur4rec features text --run-dir {run_dir}`")
    try:
        arrays = load_arrays(Path(manifest["text"]["path"]), TEXT_ARRAYS)
        if manifest.get("image"):
            arrays.update(load_arrays(Path(manifest["image"]["path"]), IMAGE_ARRAYS))
    except FeaturesNotFoundError as error:  # the arrays live in the feature cache, outside the run directory
        raise FeaturesNotFoundError(
            f"{error}: {run_dir}/features/manifest.json points into the feature cache, which no longer holds "
            f"them. Rebuild them with `ur4rec features text --config {run_dir}/config.yaml --run-dir {run_dir} "
            "--force` (and `features image` if the run had images); each stage's checkpoint.json records the "
            "features' fingerprint, so loading checks they came out the same") from None
    expected = {"item_text": dataset.n_items + 1, "item_text_mask": dataset.n_items + 1,
                "user_text": dataset.n_users, "user_text_mask": dataset.n_users,
                "item_image": dataset.n_items + 1, "item_image_mask": dataset.n_items + 1}
    for name, array in arrays.items():
        if len(array) != expected[name]:
            raise FeaturesNotFoundError(f"{name}.npy has {len(array)} rows, expected {expected[name]} for "
                                        f"{dataset.name}; rebuild with --force")
    return FeatureSet(**arrays)


def describe_entry(entry: dict) -> str:
    """One line for the command line: encoder, dim, coverage, where it lives."""
    coverage = ", ".join(f"{name} {value:.1%}" for name, value in entry["coverage"].items())
    return f"{entry['kind']}: {entry['encoder']} ({entry['dim']}-d), coverage {coverage}\n  stored in {entry['path']}"
