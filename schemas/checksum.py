"""The checksums recorded for every array of a sealed part (:class:`schemas.manifest.ArrayRecord`).

Two CRC-32 polynomials, both chainable (``checksum(b, checksum(a)) == checksum(a + b)``), which
lets a part's per-token arrays record one running value per sample in a single pass:

* ``crc32c`` (Castagnoli, what Zarr's shard index uses too): computed with the CPU's CRC
  instructions by the ``crc32c`` package, ~9 GB/s a core with the GIL released.  What the parts
  of schema version 3 caches record.
* ``crc32`` (zlib's): ~1.4 GB/s a core, a fifth of a part writer's CPU time on SmolLM2's
  features.  What the parts of older caches record, also when such a cache is resumed.
"""

from __future__ import annotations

import zlib

import crc32c as _crc32c
import numpy as np

CHECKSUMS = ("crc32", "crc32c")
DEFAULT_CHECKSUM = "crc32c"
LEGACY_CHECKSUM = "crc32"  # what a record without a ``checksum`` key used


def checksum_for_schema(schema_version: int) -> str:
    """What the parts of a cache of this schema version record (see :mod:`schemas.layout`)."""
    return DEFAULT_CHECKSUM if schema_version >= 3 else LEGACY_CHECKSUM


def _bytes_of(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(np.uint8).reshape(-1)


def checksum(array: np.ndarray, start: int = 0, algorithm: str = DEFAULT_CHECKSUM) -> int:
    """The ``algorithm`` CRC of ``array``'s bytes, continuing from ``start`` (0: a fresh one)."""
    data = _bytes_of(array)
    if algorithm == "crc32c":
        return _crc32c.crc32c(data, start) & 0xFFFFFFFF
    if algorithm == "crc32":
        return zlib.crc32(data, start) & 0xFFFFFFFF
    raise ValueError(f"unknown checksum {algorithm!r}: this version knows {', '.join(CHECKSUMS)}")


def running_sample_checksums(array: np.ndarray, offsets: np.ndarray, algorithm: str = DEFAULT_CHECKSUM) -> tuple[int, ...]:
    """The running checksum after each sample's rows ``array[offsets[i]:offsets[i+1]]`` (one pass
    over the bytes); the last one is the whole array's."""
    values, running = [], 0
    for start, stop in zip(offsets[:-1], offsets[1:]):
        running = checksum(array[start:stop], running, algorithm)
        values.append(running)
    return tuple(values)


def crc32c_of_bytes(data: bytes) -> int:
    """CRC32C of raw bytes (a Zarr shard index's trailer)."""
    return _crc32c.crc32c(data) & 0xFFFFFFFF
