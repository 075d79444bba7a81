"""Leakage audit: does a user's text name that user's validation or test item?

A preference paragraph is a training input, so it must not carry the answer (DESIGN
section 2). Template texts are built from the train part and cannot; texts from an LLM or
from elsewhere can, for instance when the model "recommends" the very film the user
watched next. For every user text the audit looks for the titles of the user's held-out
items (``target('valid')`` and ``target('test')``) under the matching rule of
:mod:`ur4rec.text.titles`, with one more rule against false alarms: a match that lies inside
a longer title of another catalogue item (``The Godfather`` inside ``The Godfather: Part
II``) names that other item, not the held-out one. A held-out item whose title is also the
title of an item in the user's train part is not looked for: the text may name it from the
train part (ML-100K lists some films twice under two ids; a synthetic user may revisit an
item), so naming it reveals nothing held out. Such items are counted.

:func:`apply_leak_policy` then warns about, drops or redacts the texts that leak
(``text.leak_policy``).
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ur4rec.data.dataset import SequenceDataset
from ur4rec.text.titles import normalise_typography, title_patterns, title_variants

LEAK_POLICIES = ("warn", "drop", "redact")
REDACTED = "[redacted]"
AUDIT_COLUMNS = ["user_id", "names_valid_item", "names_test_item", "matched_titles"]

logger = logging.getLogger(__name__)


@dataclass
class AuditRow:
    user_id: str  # raw user id
    names_valid_item: bool
    names_test_item: bool
    matched_titles: list[str] = field(default_factory=list)  # held-out titles as the dataset spells them
    spans: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of each mention in the text

    @property
    def leaks(self) -> bool:
        return self.names_valid_item or self.names_test_item


@dataclass
class LeakAudit:
    rows: dict[str, AuditRow]  # raw user id -> row, one per audited user text
    unauditable: int = 0  # held-out items whose title is too generic to look for (see titles.py)
    in_train: int = 0  # held-out items not looked for because a train item has the same title

    def counts(self) -> dict[str, int]:
        rows = self.rows.values()
        return {
            "user_texts": len(self.rows),
            "names_valid_item": sum(row.names_valid_item for row in rows),
            "names_test_item": sum(row.names_test_item for row in rows),
            "names_either": sum(row.leaks for row in rows),
            "unauditable_held_out_titles": self.unauditable,
            "held_out_titles_also_in_train": self.in_train,
        }


class TitleMatcher:
    """Finds an item's title in a text; patterns are compiled per item on first use."""

    def __init__(self, dataset: SequenceDataset) -> None:
        self.titles = [meta.title for meta in dataset.item_meta]
        self._patterns: dict[int, list[re.Pattern]] = {}
        self._longer: dict[int, list[re.Pattern]] = {}
        self._variants: list[tuple[int, str]] | None = None

    def patterns(self, item: int) -> list[re.Pattern]:
        if item not in self._patterns:
            self._patterns[item] = title_patterns(self.titles[item])
        return self._patterns[item]

    def find(self, item: int, text: str) -> list[tuple[int, int]]:
        """Spans of ``text`` that name ``item``; ``text`` must be typography-normalised."""
        spans = {match.span() for pattern in self.patterns(item) for match in pattern.finditer(text)}
        spans = {span for span in spans if not self._inside_longer_title(item, text, span)}
        # Keep maximal spans: "The Godfather" and "Godfather" at the same place are one mention.
        return sorted(s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans))

    def _inside_longer_title(self, item: int, text: str, span: tuple[int, int]) -> bool:
        for pattern in self._longer_titles(item):
            for match in pattern.finditer(text):
                if match.start() <= span[0] and span[1] <= match.end() and match.end() - match.start() > span[1] - span[0]:
                    return True
        return False

    def _longer_titles(self, item: int) -> list[re.Pattern]:
        """Patterns of other items' title variants that contain a variant of ``item``'s title."""
        if item not in self._longer:
            if self._variants is None:
                self._variants = [
                    (other, normalise_typography(variant))
                    for other in range(1, len(self.titles)) for variant in title_variants(self.titles[other])
                ]
            own = self.patterns(item)
            self._longer[item] = [
                pattern
                for other, variant in self._variants
                if other != item and _strictly_contains(variant, own)
                for pattern in title_patterns(variant)
            ]
        return self._longer[item]


def _strictly_contains(variant: str, patterns: list[re.Pattern]) -> bool:
    """Whether one of ``patterns`` matches a proper part of ``variant``."""
    for pattern in patterns:
        match = pattern.search(variant)
        if match and match.group() != variant:
            return True
    return False


def audit_user_texts(user_texts: dict[str, str], dataset: SequenceDataset) -> LeakAudit:
    """One :class:`AuditRow` per user text (keyed by raw user id) against that user's held-out items."""
    matcher = TitleMatcher(dataset)
    user_index = {str(raw_id): user for user, raw_id in enumerate(dataset.user_raw_ids)}
    valid, test = dataset.target("valid"), dataset.target("test")
    rows: dict[str, AuditRow] = {}
    unauditable = in_train = 0
    for raw_id, text in user_texts.items():
        if raw_id not in user_index:
            continue
        user = user_index[raw_id]
        normalised = normalise_typography(text)
        found: dict[str, list[tuple[int, int]]] = {}
        train_titles = {matcher.titles[item] for item in dataset.train_sequence(user)}
        for item in (valid[user], test[user]):
            if matcher.titles[item] in train_titles:
                in_train += 1
                continue
            if not matcher.patterns(item):
                unauditable += 1
            spans = matcher.find(item, normalised)
            if spans:
                found[matcher.titles[item]] = spans
        rows[raw_id] = AuditRow(
            user_id=raw_id,
            names_valid_item=matcher.titles[valid[user]] in found,
            names_test_item=matcher.titles[test[user]] in found,
            matched_titles=list(found),
            spans=sorted({span for spans in found.values() for span in spans}),
        )
    return LeakAudit(rows, unauditable, in_train)


def write_audit_csv(audit: LeakAudit, path: Path) -> None:
    """``user_id,names_valid_item,names_test_item,matched_titles`` (flags 0/1, titles joined by ' | ')."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(AUDIT_COLUMNS)
        for row in audit.rows.values():
            writer.writerow([row.user_id, int(row.names_valid_item), int(row.names_test_item),
                             " | ".join(row.matched_titles)])


def apply_leak_policy(user_texts: dict[str, str], audit: LeakAudit, policy: str) -> dict[str, str]:
    """The user texts to train on under ``policy``: warn (keep all, log the count), drop (remove
    leaking texts) or redact (replace each held-out title mention by ``[redacted]``)."""
    if policy not in LEAK_POLICIES:
        raise ValueError(f"text.leak_policy: unknown policy {policy!r}; expected one of {', '.join(LEAK_POLICIES)}")
    leaking = {user_id: row for user_id, row in audit.rows.items() if row.leaks and user_id in user_texts}
    if not leaking:
        return dict(user_texts)
    counts = audit.counts()
    summary = (f"{len(leaking)} of {len(user_texts)} user texts name a held-out item "
               f"(validation: {counts['names_valid_item']}, test: {counts['names_test_item']})")
    if policy == "warn":
        logger.warning("%s; text.leak_policy=warn keeps them, so evaluation may be optimistic", summary)
        return dict(user_texts)
    if policy == "drop":
        logger.warning("%s; text.leak_policy=drop removes them", summary)
        return {user_id: text for user_id, text in user_texts.items() if user_id not in leaking}
    logger.warning("%s; text.leak_policy=redact replaces the titles by %s", summary, REDACTED)
    redacted = dict(user_texts)
    for user_id, row in leaking.items():
        text = redacted[user_id]
        for start, end in reversed(_merge(row.spans)):
            text = text[:start] + REDACTED + text[end:]
        redacted[user_id] = text
    return redacted


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping spans covering the same characters."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged
