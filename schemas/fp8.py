"""float8 e4m3fn aux states, decoded with numpy only (``schemas`` never imports torch).

Extraction quantises each aux layer of each token to e4m3fn with one float32 scale
(``scale = amax / 448``, see :mod:`stage_extract.quant`).  Reading decodes the uint8 bit
patterns with a 256-entry lookup table, multiplies by the scale in float32, and rounds to bf16
bit patterns (round-to-nearest-even), so the trainer receives the same ``uint16`` bf16 planes it
receives from a bf16 cache.
"""

from __future__ import annotations

import numpy as np

from schemas.layout import FP8_MAX


def _e4m3fn_table() -> np.ndarray:
    """float32 value of every e4m3fn byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no
    infinities, and S.1111.111 is NaN."""
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent = (codes >> 3) & 0xF
    mantissa = codes & 0x7
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0)
    subnormal = (mantissa / 8.0) * np.exp2(-6.0)
    values = sign * np.where(exponent == 0, subnormal, normal)
    values[(exponent == 15) & (mantissa == 7)] = np.nan
    return values.astype(np.float32)


E4M3FN_TABLE = _e4m3fn_table()
assert float(np.nanmax(E4M3FN_TABLE)) == FP8_MAX


def bf16_bits_from_float32(values: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 bit patterns, nearest-even (what ``tensor.to(torch.bfloat16)`` does).

    Modifies nothing in ``values``; NaNs stay NaN (quiet, sign kept)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def dequantize_to_bf16_bits(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``codes`` [T, G*W] uint8 e4m3fn patterns and ``scales`` [T, G] float32 -> [T, G*W] uint16
    bf16 bit patterns of ``value * scale`` (G groups of W columns, one scale each)."""
    codes = np.asarray(codes)
    scales = np.asarray(scales, dtype=np.float32)
    if codes.ndim != 2 or scales.ndim != 2 or scales.shape[0] != codes.shape[0] or codes.shape[1] % max(scales.shape[1], 1):
        raise ValueError(f"fp8 codes {codes.shape} and scales {scales.shape} do not fit together")
    rows, groups = scales.shape
    # Decoding is elementwise in (code, scale): build each (token, group)'s 256-entry table of
    # final bf16 bits (T*G*256 values, small) and gather from it, one row at a time.  That is
    # ~5x faster than decoding, scaling and rounding every element (one pass instead of six).
    tables = bf16_bits_from_float32(E4M3FN_TABLE[None, None, :] * scales[:, :, None]).reshape(rows * groups, 256)
    flat = np.ascontiguousarray(codes).reshape(rows * groups, codes.shape[1] // max(groups, 1))
    out = np.empty(flat.shape, dtype=np.uint16)
    for i in range(rows * groups):
        np.take(tables[i], flat[i], out=out[i])
    return out.reshape(codes.shape)
