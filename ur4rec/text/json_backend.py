"""The ``json`` backend: import texts generated elsewhere, ``{raw_id: text}`` per file.

The folder (``text.folder``) holds ``user_preferences.json`` and ``item_descriptions.json``,
keyed by the dataset's RAW user and item ids (strings, as in the dataset files). An id
missing from a file simply has no text (its feature row is masked). Because a file keyed by
some other numbering would import silently wrong texts, two checks run on loading: no id in
common with the dataset is an error, and when fewer than half of the item descriptions name
their own item's title a warning says the ids may not be the dataset's.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

from ur4rec.data.dataset import SequenceDataset
from ur4rec.rundir import read_json
from ur4rec.text.generator import TextBackendNotFoundError, TextGenerationError, TextGenerator
from ur4rec.text.prompts import TextRequest
from ur4rec.text.titles import normalise_typography, title_patterns

USER_FILE = "user_preferences.json"
ITEM_FILE = "item_descriptions.json"
MIN_TITLE_AGREEMENT = 0.5

logger = logging.getLogger(__name__)


def read_text_file(path: Path) -> dict[str, str]:
    """A ``{id: text}`` JSON file, validated; null texts are skipped."""
    if not path.exists():
        raise TextBackendNotFoundError(f"{path} does not exist; the json backend needs {USER_FILE} and {ITEM_FILE}")
    raw = read_json(path, "an object {id: text}", TextGenerationError)
    texts = {}
    for key, value in raw.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise TextGenerationError(f"{path}: the text for id {key!r} is of type {type(value).__name__}, not a string")
        if value.strip():
            texts[str(key)] = value.strip()
    return texts


class JsonTextGenerator(TextGenerator):
    backend = "json"

    def __init__(self, folder: str | Path | None, dataset: SequenceDataset | None = None) -> None:
        if not folder:
            raise TextGenerationError("text.backend is json but text.folder is not set; set it to the folder of "
                                      f"{USER_FILE} and {ITEM_FILE}")
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise TextBackendNotFoundError(f"text.folder {str(self.folder)!r} is not a folder")
        self.users = read_text_file(self.folder / USER_FILE)
        self.items = read_text_file(self.folder / ITEM_FILE)
        digest = hashlib.sha256()
        for name in (USER_FILE, ITEM_FILE):
            digest.update((self.folder / name).read_bytes())
        self.settings = digest.hexdigest()[:20]
        if dataset is not None:
            check_ids(self.users, dataset.user_raw_ids, self.folder / USER_FILE, dataset.name, "user")
            check_ids(self.items, dataset.item_raw_ids[1:], self.folder / ITEM_FILE, dataset.name, "item")
            agreement = item_title_agreement(self.items, dataset)
            if agreement < MIN_TITLE_AGREEMENT and len(self.items) >= 20:
                logger.warning("%s: only %.0f%% of item descriptions name their own item's title; are the ids "
                               "%s's raw item ids?", self.folder / ITEM_FILE, 100 * agreement, dataset.name)

    def prompt(self, request: TextRequest) -> str:
        return f"{request.kind}:{request.raw_id}"

    def generate(self, request: TextRequest) -> str | None:
        return (self.users if request.kind == "user" else self.items).get(request.raw_id)


def check_ids(texts: dict[str, str], dataset_ids: Iterable, path: Path, dataset_name: str, kind: str) -> None:
    """No id in common is an error; ids the dataset does not know are counted in a warning."""
    known = {str(raw_id) for raw_id in dataset_ids}
    unknown = [key for key in texts if key not in known]
    if texts and len(unknown) == len(texts):
        raise TextGenerationError(
            f"{path}: none of its {len(texts)} ids is a {kind} id of dataset {dataset_name} "
            f"(file ids look like {unknown[:3]}, dataset ids like {sorted(known)[:3]}); keys must be raw ids"
        )
    if unknown:
        logger.warning("%s: %d of %d ids are not %s ids of %s and are ignored (e.g. %s)",
                       path, len(unknown), len(texts), kind, dataset_name, unknown[:3])


def item_title_agreement(item_texts: dict[str, str], dataset: SequenceDataset) -> float:
    """Fraction of auditable items whose description names the item's own title."""
    index = {str(raw_id): item for item, raw_id in enumerate(dataset.item_raw_ids) if item > 0}
    named = checked = 0
    for raw_id, text in item_texts.items():
        if raw_id not in index:
            continue
        patterns = title_patterns(dataset.item_meta[index[raw_id]].title)
        if patterns:
            checked += 1
            normalised = normalise_typography(text)
            named += any(pattern.search(normalised) for pattern in patterns)
    return named / checked if checked else 1.0
