"""A tiny synthetic multimodal setup shared by the stage and run-flow tests (the ``setup`` fixture
in conftest.py): a config that trains in a second and random unit features with missing entries."""

import types

import numpy as np

from ur4rec.config import Config


def tiny_config(*overrides) -> Config:
    return Config().override([
        "data.name=synthetic", "data.synthetic_users=40", "data.synthetic_items=40", "data.synthetic_length=12",
        "data.max_len=8", "model.hidden_size=16", "model.num_layers=1", "model.num_heads=2", "model.dropout=0.1",
        "train.epochs=2", "train.batch_size=32", "train.learning_rate=0.01", "train.progress=false",
        "train.threads=1", "eval.num_sampled_negatives=5", "moe.short_term_size=4", "moe.long_term_capacity=4",
        "moe.retrieval_top_k=4", "moe.num_negatives=8", "moe.attention_sample_users=5", *overrides])


def random_features(dataset, seed=0):
    rng = np.random.default_rng(seed)
    V, U = dataset.n_items + 1, dataset.n_users

    def unit(shape):
        array = rng.normal(size=shape)
        return (array / np.linalg.norm(array, axis=1, keepdims=True)).astype(np.float32)

    features = types.SimpleNamespace(
        item_text=unit((V, 384)), item_text_mask=np.r_[False, rng.random(V - 1) < 0.9],
        user_text=unit((U, 384)), user_text_mask=rng.random(U) < 0.8,
        item_image=unit((V, 512)), item_image_mask=np.r_[False, rng.random(V - 1) < 0.7])
    features.item_text[0] = 0
    features.item_image[0] = 0
    return features


def replace_weights(stage_dir, state):
    """Overwrite ``stage_dir/model.safetensors`` with ``state`` and record its hash in checkpoint.json,
    as a consistent (if altered) checkpoint: for tests of what loading checks beyond the hash."""
    import hashlib
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    weights, info_path = Path(stage_dir) / "model.safetensors", Path(stage_dir) / "checkpoint.json"
    save_file(state, str(weights))
    info = json.loads(info_path.read_text())
    info["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    info_path.write_text(json.dumps(info))


def save_stage1(setup, folder):
    """A finished Stage 1: SASRec weights named like UR4Rec's item_embedding/backbone groups, and a
    metrics.json (Stages 2-3 refuse an unfinished previous stage)."""
    import torch

    from ur4rec.models.sasrec import SASRec
    from ur4rec.training.checkpoint import save_checkpoint

    config, dataset, _ = setup

    torch.manual_seed(1)
    sasrec = SASRec(config.model, dataset.n_items, config.data.max_len)
    save_checkpoint(folder, sasrec, {"stage": 1, "data_fingerprint": dataset.fingerprint, "config": config.to_dict(),
                                     "n_items": dataset.n_items})
    (folder / "metrics.json").write_text("{}")
    return sasrec


class CountingEncoder:
    """Deterministic fake text encoder (sha256 of each text) that counts its calls; the real one
    is tested in test_features.py."""

    identity = "sentence-transformers/all-MiniLM-L6-v2"
    dim = 8
    calls = 0

    def encode(self, texts, progress=False):
        import hashlib

        from ur4rec.features import semantic

        CountingEncoder.calls += 1
        digests = [np.frombuffer(hashlib.sha256(text.encode()).digest()[: self.dim], dtype=np.uint8) for text in texts]
        return semantic.normalise_rows(np.array(digests, dtype=np.float32).reshape(len(texts), self.dim) + 1)


class MeanColourEncoder:
    """Fake image encoder: an image's mean colour; the real one is tested in test_features.py."""

    identity = "ViT-S-32-alt/random"
    dim = 3

    def encode(self, images):
        from ur4rec.features import semantic

        return semantic.normalise_rows(np.array([np.asarray(image, dtype=np.float32).mean(axis=(0, 1))
                                                 for image in images]))
