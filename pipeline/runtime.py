"""Where the work runs: device and compute dtype, decided once per command."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is available")
    return torch.device(name)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs; fp32 on CPUs, where bf16 matmuls are about 3x slower."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
