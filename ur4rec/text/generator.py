"""The ``TextGenerator`` interface that every backend implements.

A generator turns a :class:`~ur4rec.text.prompts.TextRequest` into a text. Its cache key is
``(backend, prompt hash)``: ``backend`` names the backend and model (``openai:gpt-4o-mini``),
and the hash covers the prompt and every setting that changes the output (temperature, the
template's version, the content of imported files), so a cached text is reused exactly when
generating again would give the same text.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

from ur4rec.text.prompts import TextRequest


class TextGenerationError(ValueError):
    """A backend could not produce a text; the message says which backend and why."""


class TextBackendNotFoundError(FileNotFoundError, ValueError):
    """A backend's local input (model folder, JSON file) does not exist."""


class TextGenerator(ABC):
    backend: str = "abstract"  # backend and model, the first half of the cache key
    settings: str = ""  # everything besides the prompt that changes the output

    @abstractmethod
    def prompt(self, request: TextRequest) -> str:
        """What the backend generates from; hashed into the cache key."""

    @abstractmethod
    def generate(self, request: TextRequest) -> str | None:
        """The text for ``request``, or None when this backend has none (e.g. an id absent from imported JSON)."""

    def prompt_hash(self, request: TextRequest) -> str:
        payload = f"{request.kind}\x00{self.settings}\x00{self.prompt(request)}"
        return hashlib.sha256(payload.encode()).hexdigest()[:20]
