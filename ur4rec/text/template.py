"""The default backend: short texts from metadata alone, offline and deterministic.

A user's paragraph names their favourite genres (with the share of train items that carry
each), their favourite eras (decades) and three representative titles: the train items
that carry most of the user's top genres, the most recent first among equals. An item's
description is ``Title (year). Genres.``. Only the request's facts are used, so a user text
can only name items of that user's train part.
"""

from __future__ import annotations

from collections import Counter

from ur4rec.data.movielens import ItemMeta
from ur4rec.text.generator import TextGenerator
from ur4rec.text.prompts import TextRequest, describe_item, display_genres, title_with_year

TEMPLATE_VERSION = "template-v1"
TOP_GENRES = 3
TOP_ERAS = 2
REPRESENTATIVE_TITLES = 3


class TemplateGenerator(TextGenerator):
    backend = "template"
    settings = TEMPLATE_VERSION

    def prompt(self, request: TextRequest) -> str:  # the domain word is in user paragraphs
        return "\n".join([request.domain] + [f"{meta.title}|{meta.year}|{','.join(meta.genres)}"
                                              for meta in request.items])

    def generate(self, request: TextRequest) -> str:
        if request.kind == "item":
            return describe_item(request.items[0])
        return user_paragraph(request.items, request.domain)


def user_paragraph(items: list[ItemMeta], domain: str = "item") -> str:
    if not items:
        return f"This user has no {domain}s in their history yet."
    genre_counts = Counter(genre for meta in items for genre in display_genres(meta))
    top_genres = [genre for genre, _ in sorted(genre_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_GENRES]]
    decade_counts = Counter(meta.year // 10 * 10 for meta in items if meta.year)
    top_decades = [decade for decade, _ in sorted(decade_counts.items(), key=lambda kv: (-kv[1], -kv[0]))[:TOP_ERAS]]

    sentences = [f"Across {len(items)} {domain}s in their history"]
    if top_genres:
        shares = [f"{genre} ({100 * genre_counts[genre] / len(items):.0f}%)" for genre in top_genres]
        sentences[0] += f", this user favours {_join(shares)}"
    else:
        sentences[0] += ", this user shows no clear genre preference"
    if top_decades:
        sentences[0] += f", mostly from the {_join([f'{decade}s' for decade in top_decades])}"
    sentences[0] += "."
    titles = representative_titles(items, top_genres)
    sentences.append(f"Representative {domain}s: {_join(titles)}.")
    return " ".join(sentences)


def representative_titles(items: list[ItemMeta], top_genres: list[str]) -> list[str]:
    """Titles carrying most of the top genres; among equals the most recent comes first."""
    favourite = set(top_genres)
    ranked = sorted(
        range(len(items)),
        key=lambda index: (-len(favourite & set(display_genres(items[index]))), -index),
    )
    titles: list[str] = []
    for index in ranked:
        title = title_with_year(items[index])
        if title not in titles:
            titles.append(title)
        if len(titles) == REPRESENTATIVE_TITLES:
            break
    return titles


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
