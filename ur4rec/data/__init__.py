"""Datasets: readers, the synthetic generator, and the leave-one-out split."""

from __future__ import annotations

from ur4rec.config import DataConfig
from ur4rec.data.dataset import SPLIT_RULE, SequenceDataset, build_dataset
from ur4rec.data.movielens import DataFormatError, DatasetNotFoundError, ItemMeta, load_movielens
from ur4rec.data.synthetic import make_synthetic

__all__ = [
    "SPLIT_RULE", "DataFormatError", "DatasetNotFoundError", "ItemMeta", "SequenceDataset",
    "build_dataset", "load_dataset", "load_movielens", "make_synthetic",
]


def load_dataset(config: DataConfig) -> SequenceDataset:
    """The dataset named by ``config``, split and fingerprinted."""
    if config.name == "synthetic":
        raw = make_synthetic(
            config.synthetic_users, config.synthetic_items, config.synthetic_length,
            config.synthetic_noise, seed=config.synthetic_seed,
        )
    elif config.name in ("ml-100k", "ml-1m"):
        raw = load_movielens(config.name, config.path)
    else:
        raise ValueError(f"data.name: unknown dataset {config.name!r}; expected ml-100k, ml-1m or synthetic")
    return build_dataset(raw, config.min_interactions)
