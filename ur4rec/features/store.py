"""The feature store: encoded arrays kept once per (dataset, encoder, inputs), shared by runs.

::

    $UR4REC_CACHE/features/<dataset fingerprint>/<kind>-<encoder>-<inputs hash>/
        <name>.npy ...        float32 arrays and boolean masks
        manifest.json         encoder, dim, coverage, created, fingerprint, inputs hash, seconds

``$UR4REC_CACHE`` defaults to ``~/.cache/ur4rec`` (the same root as downloaded datasets).
The folder name carries a hash of the encoder's identity and of what was encoded (the
texts, or the image files' names, sizes and times), so different texts or weights never
reuse each other's arrays. The manifest is
written last: a folder without one is an interrupted build and is rebuilt.

A run records which sets it used in ``RUN/features/manifest.json``: one entry per modality
(``text``, ``image``) with the set's manifest and its ``path``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from ur4rec.data.movielens import cache_dir
from ur4rec.rundir import read_json, write_json

MANIFEST = "manifest.json"


class FeaturesNotFoundError(FileNotFoundError, ValueError):
    """Features a command needs have not been built; the message says which and how to build them."""


def features_root() -> Path:
    return cache_dir() / "features"


def store_folder(fingerprint: str, kind: str, label: str, inputs_hash: str) -> Path:
    """``<kind>-<readable encoder label>-<hash of encoder identity and inputs>``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:60]
    return features_root() / fingerprint / f"{kind}-{slug}-{inputs_hash[:12]}"


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return read_json(path, "a feature-set manifest", FeaturesNotFoundError) if path.exists() else None


def save_set(folder: Path, arrays: dict[str, np.ndarray], manifest: dict) -> None:
    """Arrays first, the manifest last (it marks the set complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    write_json(folder / MANIFEST, manifest)


def load_arrays(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of a complete set: one whose manifest (written last) is there."""
    if not (Path(folder) / MANIFEST).exists():
        raise FeaturesNotFoundError(f"{folder} has no {MANIFEST}: its build was stopped before it finished, so its "
                                    "arrays may be incomplete")
    arrays = {}
    for name in names:
        path = Path(folder) / f"{name}.npy"
        if not path.exists():
            raise FeaturesNotFoundError(f"{path} is missing; rebuild the features with --force")
        try:
            arrays[name] = np.load(path)
        except (ValueError, OSError, EOFError) as error:  # cut short or overwritten
            raise FeaturesNotFoundError(f"{path} is not a readable array ({error})") from error
    return arrays


def run_manifest_path(run_dir: Path) -> Path:
    return Path(run_dir) / "features" / MANIFEST


def read_run_manifest(run_dir: Path) -> dict:
    path = run_manifest_path(run_dir)
    if not path.exists():
        raise FeaturesNotFoundError(
            f"{path} does not exist: no features were built for this run; run "
            f"`ur4rec features text --run-dir {run_dir}` (and `features image` for images) first"
        )
    return read_json(path, "a features manifest", FeaturesNotFoundError)


def update_run_manifest(run_dir: Path, fingerprint: str, kind: str, entry: dict | None) -> None:
    """Record (or, with None, clear) the set a run uses for one modality."""
    path = run_manifest_path(run_dir)
    manifest = read_json(path, "a features manifest", FeaturesNotFoundError) if path.exists() else {}
    if manifest.get("fingerprint") not in (None, fingerprint):
        manifest = {}  # features of another dataset: nothing in them applies any more
    manifest["fingerprint"] = fingerprint
    manifest[kind] = entry
    write_json(path, manifest)


def inputs_hash(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()
