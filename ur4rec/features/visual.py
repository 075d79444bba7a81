"""Visual features: open_clip image embeddings of item pictures (posters).

Images live in one folder, named ``<raw item id>.<ext>`` in any format PIL reads. An item
without an image, or whose file cannot be decoded, gets a zero row and ``mask = False``;
one warning counts both kinds, because a few bad posters must not stop a feature build.

``features.image_pretrained`` is None (random weights: only for tests, the features mean
nothing), a local checkpoint file (``.pt``, ``.bin``, ``.safetensors``), or an open_clip tag
such as ``openai``. A tag downloads from the Hugging Face hub, so when the hub is unusable
the build fails at once and says to pass a local file (see hub.py). open_clip is imported
only here, when a model is loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ur4rec.features.hub import EncoderUnavailableError, hub_unavailable_reason
from ur4rec.features.semantic import autocast, check_precision, normalise_rows

logger = logging.getLogger(__name__)


class ImageFolderNotFoundError(FileNotFoundError, ValueError):
    """``features.image_folder`` or a ``pretrained`` file does not exist."""


@dataclass
class ImageEncoding:
    vectors: np.ndarray  # (n_items + 1, D) float32, zero rows where masked
    mask: np.ndarray  # (n_items + 1,) bool, row 0 False
    missing: int  # items without an image file
    unreadable: list[str]  # files that PIL could not decode


class ImageEncoder:
    """A loaded open_clip model: ``encode(images) -> (N, D)`` unit vectors."""

    def __init__(self, model, preprocess, identity: str, device: str, precision: str = "fp32") -> None:
        self.model = model
        self.preprocess = preprocess
        self.identity = identity
        self.device = device
        self.precision = check_precision(precision, device)
        self.dim = int(model.visual.output_dim)

    def encode(self, images: list) -> np.ndarray:
        import torch

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)  # (B, 3, H, W)
        with torch.inference_mode(), autocast(self.precision, self.device):
            vectors = self.model.encode_image(pixels).float().cpu().numpy()  # (B, D)
        return normalise_rows(vectors)


def pretrained_identity(pretrained: str | None) -> str:
    """How the weights are named in the feature store: random, a tag, or file path + size + mtime."""
    if pretrained is None:
        return "random"
    path = Path(pretrained).expanduser()
    if path.is_file():
        stat = path.stat()
        return json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return pretrained


def load_image_encoder(
    model_name: str, pretrained: str | None, device: str = "cpu", precision: str = "fp32"
) -> ImageEncoder:
    weights = _resolve_pretrained(pretrained)
    import open_clip

    if model_name.startswith("hf-hub:"):
        reason = hub_unavailable_reason()
        if reason:
            raise EncoderUnavailableError(f"features.image_model {model_name!r} comes from the Hugging Face hub, "
                                          f"and {reason}; use a built-in open_clip model name")
    elif model_name not in open_clip.list_models():
        raise EncoderUnavailableError(
            f"features.image_model {model_name!r} is not an open_clip model; see open_clip.list_models()"
        )
    if weights is None:
        logger.warning("features.image_pretrained is not set: %s has random weights and its image features "
                       "carry no visual meaning (fine for tests only)", model_name)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights, device=device)
    except (RuntimeError, OSError, ValueError) as error:
        raise EncoderUnavailableError(
            f"open_clip could not build {model_name!r} with pretrained={weights!r}: {error}. Without the Hugging "
            "Face hub, give features.image_pretrained as the local checkpoint file (.pt, .bin or .safetensors)"
        ) from error
    return ImageEncoder(model.eval(), preprocess, f"{model_name}/{pretrained_identity(pretrained)}", device, precision)


def _resolve_pretrained(pretrained: str | None) -> str | None:
    """A local file's path, or a tag once we know the hub can serve it; fails at once otherwise."""
    if pretrained is None:
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    if path.suffix in (".pt", ".pth", ".bin", ".safetensors") or pretrained.startswith((".", "/", "~")):
        raise ImageFolderNotFoundError(f"features.image_pretrained {pretrained!r}: no such checkpoint file")
    reason = hub_unavailable_reason()
    if reason and not _hub_library_offline():
        # huggingface_hub would retry for about 47 s before failing: say what to do now instead.
        raise EncoderUnavailableError(
            f"features.image_pretrained {pretrained!r} is an open_clip tag whose weights come from the Hugging "
            f"Face hub, and {reason}. Download the checkpoint where there is internet and give "
            "features.image_pretrained as the local checkpoint file (.pt, .bin or .safetensors)"
        )
    return pretrained


def _hub_library_offline() -> bool:
    """Whether huggingface_hub itself is in offline mode (it reads HF_HUB_OFFLINE once, at import):
    then a tag whose weights are in the local cache loads, and one that is not fails at once."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def find_images(folder: Path, raw_item_ids: list[str]) -> dict[str, Path]:
    """raw item id -> image file; with several files for one id, the first by name wins."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ImageFolderNotFoundError(f"features.image_folder {str(folder)!r} is not a folder")
    wanted = set(raw_item_ids)
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.stem in wanted and path.stem not in found:
            found[path.stem] = path
    return found


def read_image(path: Path):
    """The image as RGB, or None when PIL cannot decode it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    # PIL reports damaged files as OSError (UnidentifiedImageError, truncated data), ValueError,
    # DecompressionBombError, and for some broken PNG chunks as SyntaxError.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def encode_item_images(
    encoder: ImageEncoder, raw_item_ids: list[str], images: dict[str, Path], batch_size: int, progress: bool = True
) -> ImageEncoding:
    """Rows 1..n for ``raw_item_ids`` (row 0 is padding); missing or unreadable images are masked."""
    n_rows = len(raw_item_ids) + 1
    vectors = np.zeros((n_rows, encoder.dim), dtype=np.float32)
    mask = np.zeros(n_rows, dtype=bool)
    unreadable: list[str] = []
    rows = [(row, images[raw_id]) for row, raw_id in enumerate(raw_item_ids, start=1) if raw_id in images]
    bar = tqdm(range(0, len(rows), batch_size), desc=f"images ({encoder.identity.split('/')[0]})", unit="batch",
               disable=not progress)
    for start in bar:
        batch_rows, batch_images = [], []
        for row, path in rows[start:start + batch_size]:
            image = read_image(path)
            if image is None:
                unreadable.append(path.name)
            else:
                batch_rows.append(row)
                batch_images.append(image)
        if batch_rows:
            vectors[batch_rows] = encoder.encode(batch_images)
            mask[batch_rows] = True
    missing = len(raw_item_ids) - len(rows)
    if missing or unreadable:
        logger.warning("%d of %d items have no image and %d image files could not be read%s; their image "
                       "rows are masked", missing, len(raw_item_ids), len(unreadable),
                       f" ({', '.join(unreadable[:5])}{', ...' if len(unreadable) > 5 else ''})" if unreadable else "")
    return ImageEncoding(vectors, mask, missing, unreadable)
