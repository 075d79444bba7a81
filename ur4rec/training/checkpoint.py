"""Checkpoints: weights in safetensors beside a JSON that is enough to rebuild the model.

``RUN/stageN/model.safetensors`` holds a plain state_dict (no pickles: loadable anywhere,
and ``torch.load(..., weights_only=True)`` is never needed). ``checkpoint.json`` holds the
resolved config, stage, epoch, best validation metric, data fingerprint and package
versions. :func:`load_model` rebuilds the model from the JSON and loads the weights
strictly: a missing or unexpected key is an error.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import ur4rec
from ur4rec.config import Config
from ur4rec.models.sasrec import SASRec
from ur4rec.rundir import write_json


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or from another dataset."""


def versions() -> dict[str, str]:
    return {
        "ur4rec": ur4rec.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def save_checkpoint(stage_dir: Path, model: torch.nn.Module, info: dict) -> None:
    """Write weights then JSON, each through a temporary file, so a crash never leaves half."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    temporary = stage_dir / "model.safetensors.tmp"
    save_file(state, str(temporary))
    temporary.replace(stage_dir / "model.safetensors")
    payload = {**info, "versions": versions()}
    write_json(stage_dir / "checkpoint.json", payload)


def read_checkpoint_info(stage_dir: Path) -> dict:
    path = Path(stage_dir) / "checkpoint.json"
    if not path.exists():
        raise CheckpointError(f"no checkpoint in {stage_dir}: {path.name} is missing (was the stage trained?)")
    return json.loads(path.read_text())


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
    weights = stage_dir / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing")
    config = Config.from_dict(info["config"], source=str(stage_dir / "checkpoint.json"))
    model = build_model(config, info["n_items"])
    missing, unexpected = _strict_keys(model, load_file(str(weights)))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: missing keys {missing}, unexpected keys {unexpected}")
    return model, info


def _strict_keys(model: torch.nn.Module, state: dict) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if not missing and not unexpected:
        model.load_state_dict(state, strict=True)
    return missing, unexpected
