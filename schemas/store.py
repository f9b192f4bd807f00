"""Numpy-level reading and writing of cache parts as Zarr v3 groups (no torch here).

Each part is written once, whole: every array is a single shard (the sharding codec) cut into
inner chunks of about ``INNER_CHUNK_BYTES``, so the writer never rewrites a shard and the reader
decodes only the inner chunks a sample touches.  Codecs are pinned here, never taken from the
ambient ``zarr.config``.
"""

from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from schemas.layout import array_specs
from schemas.manifest import (
    ArrayRecord,
    CacheError,
    CacheManifest,
    group_path,
    read_manifest,
)

INNER_CHUNK_BYTES = 1 << 20


def _codecs_for(name: str) -> list:
    if name == "aux_hidden":
        # bf16 bit patterns: byte-shuffle + fast zstd gains ~1.25x at several hundred MB/s.
        return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2)]
    return [ZstdCodec(level=3)]


def _inner_rows(row_bytes: int, n_rows: int) -> int:
    rows = max(64, min(4096, INNER_CHUNK_BYTES // max(row_bytes, 1)))
    rows = 1 << (rows.bit_length() - 1)  # a power of two keeps chunk boundaries predictable
    return max(1, min(rows, max(n_rows, 1)))


def crc32_of(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_part_group(cache_dir: Path, name: str, arrays: dict[str, np.ndarray], vocab_size: int) -> dict[str, ArrayRecord]:
    """Write one part's arrays into ``parts/<name>.zarr`` and return their checksummed records.

    An existing, unsealed group of the same name (left by a killed run) is replaced.
    """
    path = group_path(cache_dir, name)
    if path.exists():
        shutil.rmtree(path)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    records: dict[str, ArrayRecord] = {}
    for spec in array_specs(vocab_size):
        data = np.ascontiguousarray(arrays[spec.name], dtype=spec.storage_dtype)
        row_bytes = int(data.itemsize * (int(np.prod(data.shape[1:])) if data.ndim > 1 else 1))
        rows = _inner_rows(row_bytes, data.shape[0])
        chunks = (rows,) + data.shape[1:]
        shard_rows = max(rows, -(-data.shape[0] // rows) * rows)
        array = group.create_array(
            name=spec.name,
            shape=data.shape,
            dtype=spec.storage_dtype,
            chunks=chunks,
            shards=(shard_rows,) + data.shape[1:],
            compressors=_codecs_for(spec.name),
            fill_value=0,
            attributes={"logical_dtype": spec.logical_dtype, "description": spec.description},
        )
        if data.size:
            array[...] = data
        records[spec.name] = ArrayRecord(
            shape=tuple(int(s) for s in data.shape),
            crc32=crc32_of(data),
            stored_bytes=_dir_bytes(path / spec.name),
        )
    return records


@dataclass(frozen=True)
class SampleLocation:
    part: int
    local_index: int
    start: int
    stop: int


class CacheReader:
    """Random access to the samples of a complete cache, without scanning it.

    Opening reads the manifest and each part's small ``sample_offsets`` array; the large arrays
    are opened lazily and read by row range.  Instances pickle (Zarr arrays do), so DataLoader
    workers can share one.
    """

    def __init__(self, cache_dir: str | Path, manifest: CacheManifest | None = None):
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest or read_manifest(self.cache_dir)
        self._groups: dict[int, zarr.Group] = {}
        offsets, parts, local = [], [], []
        for index, part in enumerate(self.manifest.parts):
            group = self._group(index)
            part_offsets = np.asarray(group["sample_offsets"][...], dtype=np.int64)
            if len(part_offsets) != part["n_samples"] + 1 or part_offsets[-1] != part["n_tokens"]:
                raise CacheError(
                    f"{group_path(self.cache_dir, part['name'])}: sample_offsets disagree with the manifest "
                    f"({len(part_offsets) - 1} samples / {part_offsets[-1]} tokens, manifest says "
                    f"{part['n_samples']} / {part['n_tokens']})"
                )
            offsets.append(part_offsets)
            parts.append(np.full(part["n_samples"], index, dtype=np.int64))
            local.append(np.arange(part["n_samples"], dtype=np.int64))
        self._offsets = offsets
        self._part_of = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        self._local = np.concatenate(local) if local else np.zeros(0, np.int64)
        self.lengths = np.concatenate([np.diff(o) for o in offsets]) if offsets else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._part_of)

    def _group(self, index: int) -> zarr.Group:
        group = self._groups.get(index)
        if group is None:
            path = group_path(self.cache_dir, self.manifest.parts[index]["name"])
            try:
                group = zarr.open_group(str(path), mode="r", zarr_format=3)
            except FileNotFoundError as err:
                raise CacheError(f"{path}: part listed in the manifest is missing") from err
            self._groups[index] = group
        return group

    def locate(self, sample: int) -> SampleLocation:
        part, local = int(self._part_of[sample]), int(self._local[sample])
        offsets = self._offsets[part]
        return SampleLocation(part, local, int(offsets[local]), int(offsets[local + 1]))

    def read_sample(self, sample: int, names: tuple[str, ...] = ("input_ids", "loss_mask", "aux_hidden", "topk_ids", "topk_logprobs")) -> dict[str, np.ndarray]:
        """The raw stored rows of one sample (bf16 planes stay uint16 bit patterns)."""
        loc = self.locate(sample)
        group = self._group(loc.part)
        try:
            return {name: group[name][loc.start : loc.stop] for name in names}
        except Exception as err:  # zarr raises several codec/IO error types
            raise CacheError(
                f"{group_path(self.cache_dir, self.manifest.parts[loc.part]['name'])}: cannot read sample "
                f"{loc.local_index} ({err})"
            ) from err

    def record_index(self, sample: int) -> int:
        loc = self.locate(sample)
        return int(self._group(loc.part)["record_index"][loc.local_index])
