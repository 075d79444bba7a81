"""Item titles as people write them, and the patterns that find them in free text.

MovieLens stores titles library-style: ``Godfather, The``, ``Postino, Il``, and sometimes an
alternative title in parentheses, ``Seven (Se7en)``. A text written by a person or an LLM
says ``The Godfather``, ``Il Postino`` or ``Se7en``, often without the article
(``Godfather: Part II``). :func:`natural_title` gives the readable form for templates;
:func:`title_variants` and :func:`title_patterns` give every form the leakage audit looks for.

Matching rule (what counts as "this text names that title"):

* A variant of two or more words matches case-insensitively, on word boundaries, with any
  run of white space between words and the colon or comma after a word optional
  (``usual suspects`` finds ``The Usual Suspects``, ``The Godfather Part II`` finds
  ``The Godfather: Part II``).
* A variant whose core (the words after a leading article) is one word only matches when
  that word is capitalised as in the title: ``Heat`` names the 1995 film, "films with heat
  and tension" does not. Titles such as ``Speed``, ``Contact`` or ``Fear`` would otherwise
  flag ordinary prose.
* A one-word core shorter than 4 characters (``M``, ``Ed``, ``Ran``, ``187``, ``The Net``)
  is never matched: too generic to tell a title from a word. :func:`title_patterns` returns
  no pattern for it, and the audit counts such titles as unauditable.
* Text and titles are compared after mapping typographic quotes and dashes to ASCII,
  character for character, so match positions are positions in the original text.
"""

from __future__ import annotations

import re

ARTICLES = ("The", "A", "An", "Il", "La", "Le", "Les", "L'", "Das", "Der", "Die", "El", "Los", "Las", "Lo")
MIN_ONE_WORD_LENGTH = 4

# One character for one character, so spans found in the normalised text fit the original.
_TYPOGRAPHY = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u00a0": " ",
})
_ALTERNATIVE = re.compile(r"^(?P<main>.*?)\s*\((?P<alternative>[^()]*)\)\s*$")
_TRAILING_ARTICLE = re.compile(r"^(?P<body>.+),\s*(?P<article>" + "|".join(re.escape(a) for a in ARTICLES) + r")$")


def normalise_typography(text: str) -> str:
    """Typographic quotes and dashes as ASCII; same length as ``text``."""
    return text.translate(_TYPOGRAPHY)


def natural_title(title: str) -> str:
    """``Godfather, The`` -> ``The Godfather``; ``Postino, Il`` -> ``Il Postino``."""
    match = _ALTERNATIVE.match(title)
    if match and not match.group("alternative").strip().isdigit():
        return f"{_move_article(match.group('main'))} ({_move_article(match.group('alternative'))})"
    return _move_article(title)


def _move_article(title: str) -> str:
    match = _TRAILING_ARTICLE.match(title.strip())
    if not match:
        return title.strip()
    article = match.group("article")
    separator = "" if article.endswith("'") else " "
    return f"{article}{separator}{match.group('body')}"


def _strip_article(title: str) -> str:
    for article in ARTICLES:
        if article.endswith("'") and title.startswith(article):
            return title[len(article):]
        if title.startswith(article + " "):
            return title[len(article) + 1:]
    return title


def title_variants(title: str) -> list[str]:
    """Every form of ``title`` a text may use: as stored, article in front, article dropped,
    and the same for each alternative title in parentheses (``Seven (Se7en)`` gives ``Se7en``;
    ``Seven Samurai (The Magnificent Seven) (Shichinin no samurai)`` gives all three titles)."""
    title = normalise_typography(title).strip()
    main, alternatives = title, []
    while match := _ALTERNATIVE.match(main):  # peel the parenthesised groups off the end, one by one
        alternative = re.sub(r"^(a\.k\.a\.|aka)\s+", "", match.group("alternative").strip(), flags=re.IGNORECASE)
        if alternative and not alternative.isdigit():
            alternatives.insert(0, alternative)
        main = match.group("main").strip()
    parts = [main, *alternatives]
    variants: list[str] = []
    for part in parts:
        front = _move_article(part)
        for variant in (part, front, _strip_article(front)):
            if variant and variant not in variants:
                variants.append(variant)
    return variants


def variant_pattern(variant: str) -> re.Pattern | None:
    """The regex for one variant under the matching rule above; None when too generic."""
    trailing = _TRAILING_ARTICLE.match(variant)
    core = trailing.group("body") if trailing else _strip_article(variant)
    words = core.split()
    if not words:
        return None
    if len(words) == 1:
        if len(words[0]) < MIN_ONE_WORD_LENGTH:
            return None
        # Articles in any case, the title word exactly as capitalised in the title.
        if trailing:
            body = re.escape(core) + r",\s*(?i:" + re.escape(trailing.group("article")) + ")"
        else:
            article = variant[: len(variant) - len(core)].strip()
            glue = "" if article.endswith("'") else r"\s+"
            body = (f"(?i:{re.escape(article)}){glue}" if article else "") + re.escape(core)
        return re.compile(r"(?<!\w)" + body + r"(?!\w)")
    body = r"\s+".join(_word_pattern(word) for word in variant.split())
    return re.compile(r"(?<!\w)" + body + r"(?!\w)", re.IGNORECASE)


def _word_pattern(word: str) -> str:
    """A title word; a colon, comma or semicolon after it is optional ("Godfather Part II")."""
    if len(word) > 1 and word[-1] in ":,;":
        return re.escape(word[:-1]) + f"(?:{re.escape(word[-1])})?"
    return re.escape(word)


def title_patterns(title: str) -> list[re.Pattern]:
    """Compiled patterns for every variant of ``title``; empty when the title is too generic."""
    patterns = [variant_pattern(variant) for variant in title_variants(title)]
    return [pattern for pattern in patterns if pattern is not None]
