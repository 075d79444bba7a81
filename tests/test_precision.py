import pytest
import torch

from ur4rec.config import Config
from ur4rec.precision import native_bf16, resolve_precision
from ur4rec.training.trainer import autocast


def test_auto_picks_bf16_only_where_the_hardware_has_it(monkeypatch):
    assert resolve_precision("auto", "cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


def test_training_autocast_follows_the_resolved_precision(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with autocast(Config()):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(Config().override(["train.precision=bf16"])):
        assert torch.is_autocast_enabled("cpu")


def test_unknown_precision_names_the_field():
    with pytest.raises(ValueError, match="train.precision"):
        autocast(Config().override(["train.precision=fp16"]))


def test_auto_on_cuda_asks_the_device_for_bf16(monkeypatch):  # no GPU needed: the queries are patched
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_precision("auto", "cuda") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_precision("auto", "cuda") == "bf16"


def test_auto_on_a_numbered_gpu_asks_that_gpu(monkeypatch):  # no GPU needed: the queries are patched
    import contextlib

    current = [0]

    @contextlib.contextmanager
    def select(device):
        previous, current[0] = current[0], torch.device(device).index
        yield
        current[0] = previous

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", select)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: current[0] == 1)
    # before: cuda:1 was judged by the current GPU (cuda:0 here)
    assert resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("auto", "cuda:0") == "fp32"


@pytest.mark.parametrize("device", ["mps", "xpu", "meta"])
def test_a_device_whose_backend_torch_lacks_here_is_named(device):
    from ur4rec.precision import check_device

    if device == "mps" and torch.backends.mps.is_available() or device == "xpu" and torch.xpu.is_available():
        pytest.skip(f"{device} is usable here")
    # before: accepted, and training stopped in torch.Generator with an error naming no config key
    with pytest.raises(ValueError, match=f"train.device is '{device}' but torch cannot use it here"):
        check_device(device, "train.device")
