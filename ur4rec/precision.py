"""Which floating-point precision training and the encoders run in.

bf16 autocast halves the cost of a step only where the hardware computes in bf16: CPUs with
AVX512-BF16 or AMX, and CUDA GPUs that support it. Elsewhere PyTorch emulates it, and a CPU
without those instructions (measured: an AVX2-only AMD EPYC) ran a Stage-1 epoch on ML-100K
7x slower in bf16 than in fp32 (32 s vs 4.4 s). ``auto`` therefore picks bf16 only where it
is native; ``bf16`` and ``fp32`` force one or the other.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device: str) -> bool:
    """True where ``device`` computes bf16 in hardware."""
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            return False
        if torch.device(device).index is None:
            return torch.cuda.is_bf16_supported()
        with torch.cuda.device(torch.device(device)):  # ask the GPU named, not the current one
            return torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def check_device(device: str, field: str = "device") -> str:
    """``device`` if torch can run on it here; otherwise a ValueError naming the config key."""
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise ValueError(f"{field} {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {error}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{field} is {device!r} but torch finds no CUDA device here; use cpu")
    try:  # what training needs of it: a tensor and a random generator (mps, xpu, ... without their backend fail here)
        torch.empty(0, device=device)
        torch.Generator(device=device)
    except Exception as error:  # noqa: BLE001 - backends fail with RuntimeError, AssertionError, NotImplementedError, ...
        message = (str(error).splitlines() or [type(error).__name__])[0].split(". ")[0][:200]  # torch's first sentence
        raise ValueError(f"{field} is {device!r} but torch cannot use it here ({message}); use cpu") from None
    return device


def resolve_precision(precision: str, device: str, field: str = "precision") -> str:
    """``auto``, ``bf16`` or ``fp32`` -> ``bf16`` or ``fp32`` on ``device``; ``field`` names the
    config key in the error for anything else."""
    if precision not in PRECISIONS:
        raise ValueError(f"{field} must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``precision`` resolves to bf16, else nothing."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
