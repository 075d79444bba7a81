"""Checkpoints: weights in safetensors beside a JSON that is enough to rebuild the model.

``RUN/stageN/model.safetensors`` holds a plain state_dict (no pickles: loadable anywhere,
and ``torch.load(..., weights_only=True)`` is never needed). ``checkpoint.json`` holds the
resolved config, stage, epoch, best validation metric, data fingerprint and package
versions. :func:`load_model` rebuilds the model from the JSON and loads the weights
strictly: a missing or unexpected key is an error.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

import ur4rec
from ur4rec.config import Config
from ur4rec.models.sasrec import SASRec
from ur4rec.rundir import read_json, write_json


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or from another dataset."""


def versions() -> dict[str, str]:
    found = {
        "ur4rec": ur4rec.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    commit = source_commit()
    if commit:
        found["ur4rec_commit"] = commit
    return found


@functools.lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The git commit of the ur4rec code in use (``+modified`` when ur4rec/ has uncommitted
    changes), or None outside a git checkout: what reproduces a checkpoint exactly, since a
    later fix to the model can change what the same weights score."""
    package = Path(ur4rec.__file__).resolve().parent
    try:
        # the package's own files must be tracked: an installed copy inside some other repository's
        # tree (a virtual environment in a project folder) is not that repository's code
        tracked = subprocess.run(["git", "-C", str(package), "ls-files", "--error-unmatch", "__init__.py"],
                                 capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if tracked.returncode != 0 or head.returncode != 0:
            return None
        changes = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "--", "."],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+modified" if changes.stdout.strip() else "")


def save_checkpoint(stage_dir: Path, model: torch.nn.Module, info: dict) -> None:
    """Write weights then JSON, each through a temporary file and a rename. The JSON records the
    weights' sha256, so a crash between the two renames (new weights, old JSON) is caught on load."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    temporary = stage_dir / "model.safetensors.tmp"
    temporary.write_bytes(save(state))  # safetensors' save_file makes the file readable by its owner only
    digest = _sha256(temporary)
    temporary.replace(stage_dir / "model.safetensors")
    payload = {**info, "weights_sha256": digest, "versions": versions()}
    write_json(stage_dir / "checkpoint.json", payload)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_checkpoint_info(stage_dir: Path) -> dict:
    path = Path(stage_dir) / "checkpoint.json"
    if not path.exists():
        raise CheckpointError(f"no checkpoint in {stage_dir}: {path.name} is missing (was the stage trained?)")
    info = read_json(path, "a checkpoint description", CheckpointError)
    required = ("stage", "config", "n_items", "data_fingerprint")
    if info.get("stage") in (2, 3):  # a multimodal stage is rebuilt for its users, with its features
        required += ("n_users", "features_fingerprint")
    missing = [key for key in required if key not in info]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {', '.join(missing)}")
    if type(info["stage"]) is not int or info["stage"] not in (1, 2, 3):
        raise CheckpointError(f"{path}: field stage is {info['stage']!r}, not 1, 2 or 3")
    for key in ("n_items", "n_users"):  # the model's table sizes
        if key in info and (type(info[key]) is not int or info[key] < 1):
            raise CheckpointError(f"{path}: field {key} is {info[key]!r}, not a count")
    if not isinstance(info["config"], dict):
        raise CheckpointError(f"{path}: field config is not a mapping")
    for section, values in info["config"].items():
        if not isinstance(values, dict):
            raise CheckpointError(f"{path}: field config: section {section} is not a mapping")
    return info


def read_weights(stage_dir: Path, info: dict | None = None) -> dict[str, torch.Tensor]:
    """``stage_dir/model.safetensors`` as a state_dict. With ``info`` (its checkpoint.json), the file
    must be the one that JSON was written with (checkpoints made before the hash was kept are not checked)."""
    path = Path(stage_dir) / "model.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    expected = (info or {}).get("weights_sha256")
    if expected is not None and _sha256(path) != expected:
        raise CheckpointError(f"{path} is not the file {path.parent / 'checkpoint.json'} was written with "
                              "(its sha256 differs): the run was interrupted while saving, or a file was replaced")
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error


def build_model(config: Config, n_items: int) -> SASRec:
    return SASRec(config.model, n_items=n_items, max_len=config.data.max_len)


def load_model(stage_dir: Path, fingerprint: str | None = None) -> tuple[SASRec, dict]:
    """Rebuild the model of ``stage_dir`` from its checkpoint.json and load its weights strictly."""
    stage_dir = Path(stage_dir)
    info = read_checkpoint_info(stage_dir)
    if fingerprint is not None and info.get("data_fingerprint") != fingerprint:
        raise CheckpointError(
            f"{stage_dir} was trained on data {info.get('data_fingerprint')}, not on {fingerprint}"
        )
    state = read_weights(stage_dir, info)
    config = Config.from_dict(info["config"], source=str(stage_dir / "checkpoint.json"))
    model = build_model(config, info["n_items"])
    load_strictly(model, state, stage_dir / "model.safetensors")
    return model, info


def load_strictly(model: torch.nn.Module, state: dict, path: Path) -> None:
    """Every key and shape of ``model`` from ``state``, or a :class:`CheckpointError` naming what differs."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(key for key in set(expected) & set(state) if expected[key].shape != state[key].shape)
    if missing or unexpected or reshaped:
        raise CheckpointError(f"{path}: missing keys {missing}, unexpected keys {unexpected}, "
                              f"shapes unlike checkpoint.json's model {reshaped}")
    model.load_state_dict(state, strict=True)
