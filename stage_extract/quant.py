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
    """Inverse of :func:`quantize_fp8` in torch, on the tensors' device (the trainer reads raw
    codes and decodes them here after the host-to-device copy).

    ``codes`` [..., groups*W] uint8 and ``scales`` [..., groups] float32, any leading dims.  The
    product is formed in float32 and rounded once to ``dtype``, so for bf16 the result is
    bit-identical to the numpy reader's :func:`schemas.fp8.dequantize_to_bf16_bits`."""
    groups = scales.shape[-1]
    if codes.shape[:-1] != scales.shape[:-1] or codes.shape[-1] % max(groups, 1):
        raise ValueError(f"fp8 codes {tuple(codes.shape)} and scales {tuple(scales.shape)} do not fit together")
    values = codes.view(torch.float8_e4m3fn).float().unflatten(-1, (groups, -1))
    values.mul_(scales.float().unsqueeze(-1))  # in place: one float32 temporary, not two
    return values.flatten(-2).to(dtype)
