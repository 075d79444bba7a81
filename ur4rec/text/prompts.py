"""What each text is generated from, and the prompts LLM backends send.

A :class:`TextRequest` carries the facts behind one text: for a user, the items of the TRAIN
part of their sequence (``dataset.train_sequence``) in time order, never the validation or
test item (DESIGN section 2: nothing derived from held-out items may reach training
inputs); for an item, its own metadata. Every backend sees only these facts.

LLM prompts list the user's most recent ``history_items`` train items (the prototype used
20) and ask for preferences without naming titles, which keeps generated paragraphs from
recommending, and so naming, a held-out item.
"""

from __future__ import annotations

from dataclasses import dataclass

from ur4rec.data.dataset import SequenceDataset
from ur4rec.data.movielens import ItemMeta
from ur4rec.text.titles import natural_title

SYSTEM_PROMPT = (
    "You write short, factual texts for a recommender system. Answer with the text only: "
    "no preamble, no lists, no markdown."
)


@dataclass
class TextRequest:
    kind: str  # "user" or "item"
    raw_id: str  # the dataset's raw user or item id
    items: list[ItemMeta]  # user: train items, oldest first; item: [its own metadata]
    domain: str = "item"  # what the items are, for prompts: "movie" for MovieLens


def build_requests(dataset: SequenceDataset) -> list[TextRequest]:
    """One request per user (from the train part only), then one per item."""
    domain = "movie" if dataset.name.startswith("ml-") else "item"
    requests = [
        TextRequest("user", str(dataset.user_raw_ids[user]),
                    [dataset.item_meta[item] for item in dataset.train_sequence(user)], domain)
        for user in range(dataset.n_users)
    ]
    requests += [
        TextRequest("item", str(dataset.item_raw_ids[item]), [dataset.item_meta[item]], domain)
        for item in range(1, dataset.n_items + 1)
    ]
    return requests


def display_genres(meta: ItemMeta) -> list[str]:
    """Genres worth showing: MovieLens's placeholder genre 'unknown' is left out."""
    return [genre for genre in meta.genres if genre.lower() != "unknown"]


def title_with_year(meta: ItemMeta) -> str:
    title = natural_title(meta.title)
    return f"{title} ({meta.year})" if meta.year else title


def describe_item(meta: ItemMeta) -> str:
    """``The Godfather (1972). Crime, Drama.``: the item text when no description exists."""
    genres = display_genres(meta)
    return f"{title_with_year(meta)}." + (f" {', '.join(genres)}." if genres else "")


def user_prompt(request: TextRequest, history_items: int) -> str:
    recent = request.items[-history_items:] if history_items > 0 else request.items
    lines = [f"{index}. {describe_item(meta)}" for index, meta in enumerate(recent, start=1)]
    return (
        f"A user of a {request.domain} recommender interacted with these {request.domain}s, "
        f"oldest first:\n" + "\n".join(lines) + "\n\n"
        f"In one paragraph of at most 80 words, describe this user's preferences: favourite "
        f"genres, eras, themes and tone. Do not name or recommend specific {request.domain}s."
    )


def item_prompt(request: TextRequest) -> str:
    meta = request.items[0]
    return (
        f"Describe this {request.domain} in two sentences for a recommender system: its story "
        f"or subject, tone, and the audience it suits.\n{request.domain.capitalize()}: {describe_item(meta)}"
    )
