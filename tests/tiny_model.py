"""A tiny UR4Rec model on random data, shared by the model and expert tests: 30 items, 12 users,
windows of 8, random unit features with a chosen share of each modality present."""

import types

import numpy as np
import torch

from ur4rec.config import Config
from ur4rec.models.memory import build_memory, combined_item_features
from ur4rec.models.ur4rec_model import UR4Rec

N_ITEMS, N_USERS, T = 30, 12, 8


def unit(array):
    return (array / np.linalg.norm(array, axis=1, keepdims=True)).astype(np.float32)


def make_features(text=1.0, image=0.8, users=0.75, seed=0):
    """Random FeatureSet-like object: each item/user has a modality with the given probability."""
    rng = np.random.default_rng(seed)
    V = N_ITEMS + 1
    features = types.SimpleNamespace(
        item_text=unit(rng.normal(size=(V, 384))), item_text_mask=np.r_[False, rng.random(N_ITEMS) < text],
        user_text=unit(rng.normal(size=(N_USERS, 384))), user_text_mask=rng.random(N_USERS) < users,
        item_image=unit(rng.normal(size=(V, 512))) if image else None,
        item_image_mask=np.r_[False, rng.random(N_ITEMS) < image] if image else None,
    )
    features.item_text[0] = 0
    return features


def no_modality():
    features = make_features(text=0.0, image=0.0, users=0.0)
    features.item_text[:] = 0
    return features


def make_sequences(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, N_ITEMS + 1, size=int(rng.integers(3, 25))) for _ in range(N_USERS)]


def make_config(*overrides):
    return Config().override(["model.hidden_size=16", "model.num_layers=2", "model.num_heads=2", "model.dropout=0.0",
                              f"data.max_len={T}", "moe.short_term_size=4", "moe.long_term_capacity=6",
                              "moe.retrieval_top_k=5", "moe.gate_init=0.5", *overrides])


def make_model(features=None, *overrides, sequences=None, seed=0):
    config = make_config(*overrides)
    features = features if features is not None else make_features()
    sequences = sequences if sequences is not None else make_sequences()
    memory = build_memory(sequences, combined_item_features(features), config.moe.long_term_capacity,
                          config.moe.novelty_threshold)
    torch.manual_seed(seed)
    model = UR4Rec(config, N_ITEMS, N_USERS, features, memory, sequences)
    with torch.no_grad():  # trained-looking embeddings and a non-trivial router
        model.item_embedding.weight[1:].normal_(0, 0.5)
        for parameter in model.router.parameters() if model.expert_names else []:
            parameter.normal_(0, 0.5)
        if hasattr(model, "similarity"):
            model.similarity.weight.copy_(torch.linspace(1.0, 2.0, len(model.similarity.sources)))
    return model


def batch(seed=0, B=6):
    generator = torch.Generator().manual_seed(seed)
    users = torch.randint(0, N_USERS, (B,), generator=generator)
    ids = torch.randint(1, N_ITEMS + 1, (B, T), generator=generator)
    ids[0, :5] = 0  # a short, left-padded history
    return users, ids
