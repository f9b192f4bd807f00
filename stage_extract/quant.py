"""fp8 (e4m3fn) quantisation of aux states, on the extraction device, before the copy to host.

Each aux layer of each token gets its own float32 scale ``amax / 448`` (448 is the largest
finite e4m3fn value), so a token's largest entry maps to +-448 and nothing saturates; the codes
are stored as their uint8 bit patterns.  Real aux states have a few huge outlier channels
(|x| up to ~26k in SmolLM2 against a std of ~45), which is why the scale is per token and per
layer rather than per tensor.  Decoding (numpy, for the reader) lives in :mod:`schemas.fp8`.
"""

from __future__ import annotations

import torch

from schemas.layout import FP8_MAX


def quantize_fp8(values: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` [N, groups*W] (any float dtype) -> (codes [N, groups*W] uint8, scales [N, groups] float32).

    Computed in float32; an all-zero group gets scale 1 (its codes are all zero).  Non-finite
    inputs give non-finite scales, which the writer refuses like any non-finite feature."""
    rows, width = values.shape
    grouped = values.float().reshape(rows, groups, width // groups)
    amax = grouped.abs().amax(dim=-1)
    # ``amax == 0`` (not ``amax > 0``), so a NaN amax stays NaN and the token is refused.
    scales = torch.where(amax == 0, torch.ones_like(amax), amax / FP8_MAX)
    scaled = (grouped / scales.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX)
    codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8).reshape(rows, width)
    return codes, scales


def dequantize_fp8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8` in torch (e.g. on the GPU for a trainer that reads raw codes)."""
    rows, width = codes.shape
    groups = scales.shape[1]
    values = codes.view(torch.float8_e4m3fn).float().reshape(rows, groups, width // groups)
    return (values * scales.float().unsqueeze(-1)).reshape(rows, width).to(dtype)
