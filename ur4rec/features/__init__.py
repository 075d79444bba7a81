"""Precomputed multimodal features: semantic (sentence-transformers) and visual (open_clip).

Models read a :class:`FeatureSet` of arrays and masks; they never run an encoder.
:func:`build_features` makes one for a run (texts, leakage audit, encoders, feature store),
:func:`load_features` reads it back, and :mod:`ur4rec.features.quality` measures it.
Encoder libraries are imported only when something is encoded.
"""

from __future__ import annotations

from ur4rec.features.build import (
    FeatureSet,
    build_features,
    build_image_features,
    build_text_features,
    describe_entry,
    load_features,
)
from ur4rec.features.hub import EncoderUnavailableError
from ur4rec.features.store import FeaturesNotFoundError, features_root

__all__ = [
    "EncoderUnavailableError", "FeatureSet", "FeaturesNotFoundError", "build_features", "build_image_features",
    "build_text_features", "describe_entry", "features_root", "load_features",
]
