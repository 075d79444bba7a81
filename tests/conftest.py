import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ur4rec.config import Config  # noqa: E402
from ur4rec.data import load_dataset  # noqa: E402

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def smoke_config() -> Config:
    config = Config.load(os.path.join(ROOT, "configs", "smoke.yaml"))
    return config.override(["train.progress=false"])


@pytest.fixture
def synthetic(smoke_config):
    return load_dataset(smoke_config.data)


@pytest.fixture(scope="module")
def setup():
    """(config, dataset, features) of the tiny synthetic multimodal run (tests/tiny_run.py)."""
    from tiny_run import random_features, tiny_config

    config = tiny_config()
    dataset = load_dataset(config.data)
    return config, dataset, random_features(dataset)
