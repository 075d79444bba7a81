"""The generation cache: one JSONL file, one line per generated text, safe to interrupt.

Each line is ``{"kind", "raw_id", "backend", "prompt_hash", "text"}``; the key is
``(backend, prompt_hash)``. A record is appended and flushed as soon as it is generated, so
a crash loses at most the record being written. On opening, a last line cut short by the
crash (no newline at the end, or not valid JSON) is removed before anything is appended;
any other malformed line is an error naming the line, because it means the file was edited
or damaged, not interrupted. A key already present is never generated or written again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from ur4rec.rundir import write_text_whole

RECORD_FIELDS = ("kind", "raw_id", "backend", "prompt_hash", "text")


class CacheFormatError(ValueError):
    """A malformed line in the middle of a generation cache file."""


class GenerationCache:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.texts: dict[tuple[str, str], str] = {}
        self.truncated_bytes = 0  # size of a cut-off last line removed on opening
        self._handle: TextIO | None = None
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        keep = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
        # Split on "\n" only: texts may hold other line separators (U+2028) that JSON leaves raw.
        lines = data[:keep].decode("utf-8").split("\n")[:-1]
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = (record["backend"], record["prompt_hash"])
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                if number == len(lines):
                    # A last line that parses badly despite its newline: an interrupted write too.
                    keep -= len(line.encode("utf-8")) + 1
                    break
                raise CacheFormatError(
                    f"{self.path}, line {number}: not a generation record ({error}); "
                    "remove the line or delete the file to regenerate"
                ) from error
            self.texts[key] = text
        if keep < len(data):
            self.truncated_bytes = len(data) - keep
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.texts

    def get(self, key: tuple[str, str]) -> str | None:
        return self.texts.get(key)

    def append(self, kind: str, raw_id: str, key: tuple[str, str], text: str) -> None:
        """Write one record and flush it; a key already present is ignored."""
        if key in self.texts:
            return
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")
        record = dict(zip(RECORD_FIELDS, (kind, raw_id, key[0], key[1], text)))
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        self.texts[key] = text

    def forget_backend(self, backend: str) -> int:
        """Remove every record of ``backend`` (for ``--force``); returns how many."""
        self.close()
        kept_lines, removed = [], 0
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").split("\n"):
                if line.strip() and json.loads(line)["backend"] == backend:
                    removed += 1
                elif line.strip():
                    kept_lines.append(line)
            # whole or not at all: a stop while writing must not lose the other backends' records
            write_text_whole(self.path, "".join(line + "\n" for line in kept_lines), encoding="utf-8")
        self.texts = {key: text for key, text in self.texts.items() if key[0] != backend}
        return removed

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> GenerationCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
