"""Numpy-level reading and writing of cache parts as Zarr v3 groups (no torch here).

Each part is written once, whole: every array is a single shard (the sharding codec) cut into
inner chunks of about ``INNER_CHUNK_BYTES``, so the writer never rewrites a shard and the reader
decodes only the inner chunks a sample touches.  Codecs are pinned here, never taken from the
ambient ``zarr.config``; the feature planes' codec is the cache's ``aux_compression`` setting.
:func:`write_part_group` writes every file itself, byte for byte what zarr would write: the
metadata from templates zarr makes once per array kind, the shards with their chunks compressed
on a shared thread pool.

Checksums are computed from the bytes handed to Zarr, in one pass per array: a running CRC
(:mod:`schemas.checksum`; ``checksum_name`` of :func:`write_part_group`) recorded after every
sample (see :class:`schemas.manifest.ArrayRecord`), whose last value is the whole array's.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import tempfile
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from numcodecs import get_codec
from packaging.version import Version
from zarr.codecs import BloscCodec, ZstdCodec

from schemas.checksum import DEFAULT_CHECKSUM, checksum, crc32c_of_bytes, running_sample_checksums
from schemas.file_sink import DEFAULT_WRITE_MODE, FileSink, check_write_mode
from schemas.fp8 import dequantize_to_bf16_bits
from schemas.shard import EMPTY_CHUNK, ShardArray
from schemas.layout import AUX_COMPRESSIONS, DEFAULT_AUX_COMPRESSION, LEGACY_AUX_COMPRESSION, array_specs, resolve_aux_compression
from schemas.manifest import (
    ArrayRecord,
    CacheError,
    CacheManifest,
    PartSeal,
    group_path,
    part_group_path,
    part_seal_path,
    read_manifest,
    read_seal,
)

INNER_CHUNK_BYTES = 1 << 20
ENCODE_TASK_BYTES = 8 << 20  # inner chunks per pool task: fewer GIL round trips per byte
WRITE_BATCH_BYTES = 16 << 20  # encoded chunks per write call
SAMPLE_FIELDS = ("input_ids", "loss_mask", "aux_hidden", "topk_ids", "topk_logprobs", "final_hidden")
FEATURE_ARRAYS = ("aux_hidden", "final_hidden")  # the planes --aux-compression applies to


def _feature_codecs(aux_compression: str, itemsize: int) -> tuple[list, dict | None]:
    """Zarr compressors of a feature plane (aux_hidden, final_hidden) and the numcodecs config
    that encodes the same bytes (None: stored raw).  ``aux_compression`` is resolved (not auto)."""
    if aux_compression == "blosc-zstd":
        # The codec of caches written before the option existed (typesize 2 even for fp8 codes,
        # kept so such caches resume byte-identically): byte-shuffle + fast zstd, ~1.25x.
        return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2)], _blosc_config("zstd", 1, 1, 2)
    if aux_compression == "zstd":
        # Plain zstd level 1: the same ~1.23x on bf16 bits (1.17x on fp8 codes), ~1.3x faster
        # than the blosc chain.
        return [ZstdCodec(level=1)], {"id": "zstd", "level": 1, "checksum": False}
    if aux_compression == "lz4":
        # blosc lz4 with bit-shuffle: ~1.18x on bf16 bits at about twice zstd's speed (encode and
        # decode); nothing on fp8 codes.
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=itemsize)], _blosc_config("lz4", 5, 2, itemsize)
    if aux_compression == "none":
        return [], None
    raise ValueError(f"aux compression {aux_compression!r} is not one of {', '.join(AUX_COMPRESSIONS)}")


def _blosc_config(cname: str, clevel: int, shuffle: int, typesize: int) -> dict:
    config = {"id": "blosc", "cname": cname, "clevel": clevel, "shuffle": shuffle, "blocksize": 0}
    # zarr's BloscCodec hands numcodecs the typesize from numcodecs 0.16 on (older ones ignore it)
    if Version(numcodecs.__version__) >= Version("0.16.0"):
        config["typesize"] = typesize
    return config


def _codecs_for(name: str, aux_compression: str = LEGACY_AUX_COMPRESSION, itemsize: int = 2) -> tuple[list, dict | None]:
    if name in FEATURE_ARRAYS:
        return _feature_codecs(aux_compression, itemsize)
    return [ZstdCodec(level=3)], {"id": "zstd", "level": 3, "checksum": False}


def _inner_rows(row_bytes: int, n_rows: int) -> int:
    rows = max(64, min(4096, INNER_CHUNK_BYTES // max(row_bytes, 1)))
    rows = 1 << (rows.bit_length() - 1)  # a power of two keeps chunk boundaries predictable
    return max(1, min(rows, max(n_rows, 1)))


def fsync_tree(path: Path) -> None:
    """Flush every file and directory under ``path`` (and ``path``'s entry in its parent) to the
    disk, so that a seal written afterwards never outlives the bytes it describes, even across a
    power loss (a killed process alone loses nothing: its writes are in the page cache)."""
    path = Path(path)
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for directory in [root for root, _, _ in os.walk(path)] + [str(path.parent)]:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def default_encode_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


_ENCODE_POOLS: dict[int, ThreadPoolExecutor] = {}
_ENCODE_POOLS_LOCK = threading.Lock()


def encode_pool(threads: int | None = None) -> ThreadPoolExecutor:
    """The process-wide pool (one per size) that compresses inner chunks and checksums arrays for
    :func:`write_part_group`.  numcodecs and zlib release the GIL on these buffers, so it scales
    with cores even beside a Python-bound main thread; its threads are never the main thread,
    which keeps blosc on its single-threaded path (blosc's own threads would reorder blocks, so
    the bytes would depend on timing).  Several part writers share it."""
    threads = max(1, int(threads or default_encode_threads()))
    with _ENCODE_POOLS_LOCK:
        pool = _ENCODE_POOLS.get(threads)
        if pool is None:
            pool = _ENCODE_POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="talon-encode")
        return pool


def _storage_array(values: np.ndarray, storage_dtype: str) -> np.ndarray:
    """``values`` as a C-contiguous array of the storage dtype.  A signed/unsigned integer pair
    of one width is reinterpreted in place (the same bits ``astype`` would produce)."""
    target = np.dtype(storage_dtype)
    values = np.asarray(values)
    if values.dtype != target and values.dtype.kind in "iu" and target.kind in "iu" and values.dtype.itemsize == target.itemsize:
        return np.ascontiguousarray(values).view(target)
    return np.ascontiguousarray(values, dtype=target)


def _all_zero(raw: np.ndarray) -> bool:
    if raw[:64].any():  # real features almost always end the test here
        return False
    return not (raw.view(np.uint64) if raw.nbytes % 8 == 0 else raw).any()


def _encode_chunks(codec, data: np.ndarray, starts: range, rows: int) -> list:
    """Inner chunks ``data[start:start+rows]`` (the last one padded with the fill value 0) as
    zarr stores them: None for a chunk whose every byte equals the fill value (zarr's default
    ``write_empty_chunks=False`` leaves such chunks out of the shard), else the encoded bytes."""
    out = []
    for start in starts:
        block = data[start : start + rows]
        if len(block) < rows:
            padded = np.zeros((rows,) + data.shape[1:], dtype=data.dtype)
            padded[: len(block)] = block
            block = padded
        raw = block.reshape(-1).view(np.uint8)
        out.append(None if _all_zero(raw) else codec.encode(raw) if codec is not None else raw)
    return out


def _write_shard(path: Path, tasks: list, n_chunks: int, write_mode: str = DEFAULT_WRITE_MODE) -> int:
    """Write a ``sharding_indexed`` shard: the present inner chunks in order (zarr's morton order
    is plain row order for a column of chunks), then the ``(offset, nbytes)`` uint64 index with
    its CRC32C; returns the file's size.  No file (size 0) when every chunk is absent, as zarr
    does.  ``tasks`` are futures of :func:`_encode_chunks`, in chunk order.  The chunks (~1 MB
    each) reach the file :data:`WRITE_BATCH_BYTES` at a time, in one ``writev`` call
    (``write_mode``: see :mod:`schemas.file_sink`): on an H200 host's disk, three threads
    writing parts in 16 MiB writes reached 1,771 MB/s against 1,532 in 0.75 MB writes
    (``bench/disk_speed.py --write-mb``; one thread: 1,247 against 1,221)."""
    index = np.full((n_chunks, 2), EMPTY_CHUNK, dtype="<u8")
    offset, written, position, sink = 0, 0, 0, None  # bytes indexed, bytes in the file, chunks seen
    batch: list[memoryview] = []
    try:
        for task in tasks:
            for encoded in task.result():
                if encoded is not None:
                    view = memoryview(encoded).cast("B")
                    index[position] = (offset, view.nbytes)
                    offset += view.nbytes
                    batch.append(view)
                position += 1
            if offset - written >= WRITE_BATCH_BYTES:
                sink = sink or _create_file(path, write_mode)
                sink.write(batch)
                batch, written = [], offset
        if sink is None and not batch:
            return 0  # every chunk absent
        raw = index.tobytes()
        batch.append(memoryview(raw + crc32c_of_bytes(raw).to_bytes(4, "little")))
        sink = sink or _create_file(path, write_mode)
        sink.write(batch)
        sink, finished = None, sink
        finished.close()
        return finished.size
    finally:
        if sink is not None:
            sink.discard()


def _create_file(path: Path, write_mode: str) -> FileSink:
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileSink(path, write_mode)


@functools.lru_cache(maxsize=None)
def _metadata_template(name: str, storage_dtype: str, row_shape: tuple[int, ...], aux_compression: str,
                       itemsize: int, attributes: tuple[tuple[str, str], ...]) -> dict:
    """The ``zarr.json`` zarr writes for an array of this kind (its shape and chunk shapes are
    patched in per part by :func:`_array_metadata`).  Made once per process and kind, by zarr
    itself in a scratch directory: creating arrays through zarr's event loop, with the GIL and
    the loop shared by every writer thread, cost ~0.1 s a part on a busy 16-core host."""
    with tempfile.TemporaryDirectory(prefix="talon-zarr-meta-") as scratch:
        group = zarr.open_group(scratch, mode="w", zarr_format=3)
        compressors, _ = _codecs_for(name, aux_compression, itemsize)
        one = (1,) + row_shape
        group.create_array(name=name, shape=one, dtype=storage_dtype, chunks=one, shards=one,
                           compressors=compressors or None, fill_value=0, attributes=dict(attributes))
        return json.loads((Path(scratch) / name / "zarr.json").read_text())


@functools.lru_cache(maxsize=None)
def _group_metadata() -> bytes:
    with tempfile.TemporaryDirectory(prefix="talon-zarr-meta-") as scratch:
        zarr.open_group(scratch, mode="w", zarr_format=3)
        return (Path(scratch) / "zarr.json").read_bytes()


def _json_bytes(metadata: dict) -> bytes:
    """Serialised as zarr serialises its metadata (so the files equal zarr's, byte for byte)."""
    return json.dumps(metadata, allow_nan=True, indent=zarr.config.get("json_indent")).encode()


def _array_metadata(template: dict, shape: tuple[int, ...], shard_shape: tuple[int, ...], inner_shape: tuple[int, ...]) -> bytes:
    metadata = copy.deepcopy(template)
    metadata["shape"] = list(shape)
    metadata["chunk_grid"]["configuration"]["chunk_shape"] = list(shard_shape)
    (sharding,) = metadata["codecs"]
    sharding["configuration"]["chunk_shape"] = list(inner_shape)
    return _json_bytes(metadata)


def write_part_group(
    worker_dir: Path,
    name: str,
    arrays: dict[str, np.ndarray],
    vocab_size: int,
    feature_dtype: str = "bf16",
    teacher: str = "topk",
    aux_compression: str = DEFAULT_AUX_COMPRESSION,
    pool: Executor | None = None,
    direct: bool = True,
    sync: bool = True,
    checksum_name: str = DEFAULT_CHECKSUM,
    write_mode: str = DEFAULT_WRITE_MODE,
) -> dict[str, ArrayRecord]:
    """Write one part's arrays into ``<worker_dir>/parts/<name>.zarr`` and return their
    checksummed records.  An existing, unsealed group of the same name (left by a killed run)
    is replaced.

    The metadata is zarr's own (:func:`_metadata_template`) and the single shard of each array
    is written here directly (the layout :mod:`schemas.shard` reads), its inner chunks
    compressed and the checksums computed on ``pool`` (default :func:`encode_pool`), all arrays
    at once.  Every file equals, byte for byte, what zarr's ``create_array`` and
    ``array[...] = data`` write (``direct=False``, kept for tests), which costs ~4x more here:
    per-chunk fill-value scans, a padded copy and a concatenated copy of the whole shard, and one
    chunk at a time through zarr's event loop.  Returns once the group is on the disk
    (:func:`fsync_tree`), or with ``sync=False`` once it is written (the caller flushes it
    before sealing the part)."""
    check_write_mode(write_mode)
    path = group_path(worker_dir, name)
    if path.exists():
        shutil.rmtree(path)
    if direct:
        path.mkdir(parents=True)
        (path / "zarr.json").write_bytes(_group_metadata())
    else:
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
    pool = pool if pool is not None else encode_pool()
    aux_compression = resolve_aux_compression(aux_compression, feature_dtype)
    offsets = np.asarray(arrays["sample_offsets"], dtype=np.int64)
    planned = []
    for spec in array_specs(vocab_size, feature_dtype, teacher):
        data = _storage_array(arrays[spec.name], spec.storage_dtype)
        row_bytes = int(data.itemsize * (int(np.prod(data.shape[1:])) if data.ndim > 1 else 1))
        rows = _inner_rows(row_bytes, data.shape[0])
        chunks = (rows,) + data.shape[1:]
        shard_rows = max(rows, -(-data.shape[0] // rows) * rows)
        compressors, codec_config = _codecs_for(spec.name, aux_compression, data.itemsize)
        attributes = {"logical_dtype": spec.logical_dtype, "description": spec.description}
        if direct:
            template = _metadata_template(spec.name, spec.storage_dtype, tuple(data.shape[1:]), aux_compression,
                                          data.itemsize, tuple(attributes.items()))
            (path / spec.name).mkdir()
            metadata = _array_metadata(template, data.shape, (shard_rows,) + data.shape[1:], chunks)
            (path / spec.name / "zarr.json").write_bytes(metadata)
        else:
            array = group.create_array(name=spec.name, shape=data.shape, dtype=spec.storage_dtype, chunks=chunks,
                                       shards=(shard_rows,) + data.shape[1:], compressors=compressors or None,
                                       fill_value=0, attributes=attributes)
        # the longest task (a whole-array checksum) first, then the chunks
        crcs = pool.submit(running_sample_checksums, data, offsets, checksum_name) if spec.per_token else None
        encoded = []
        if data.size and direct:
            codec = get_codec(dict(codec_config)) if codec_config else None
            step = rows * max(1, ENCODE_TASK_BYTES // (rows * row_bytes))  # a few chunks per task
            encoded = [pool.submit(_encode_chunks, codec, data, range(first, min(first + step, shard_rows), rows), rows)
                       for first in range(0, shard_rows, step)]
        elif data.size:
            array[...] = data
        planned.append((spec, data, crcs, encoded, shard_rows // rows, len(metadata) if direct else None))
    records: dict[str, ArrayRecord] = {}
    for spec, data, crcs, encoded, n_chunks, metadata_bytes in planned:
        shard_bytes = 0
        if encoded:
            shard_bytes = _write_shard(path / spec.name / "/".join(["c"] + ["0"] * data.ndim), encoded, n_chunks, write_mode)
        sample_crcs = crcs.result() if crcs is not None else ()
        records[spec.name] = ArrayRecord(
            shape=tuple(int(s) for s in data.shape),
            crc32=sample_crcs[-1] if sample_crcs else checksum(data, 0, checksum_name),
            checksum=checksum_name,
            # counted, not listed from the disk (each call there may wait for the GIL)
            stored_bytes=metadata_bytes + shard_bytes if direct else dir_bytes(path / spec.name),
            dtype=spec.storage_dtype,
            sample_crc32=sample_crcs,
        )
    if sync:
        fsync_tree(path)  # durable before the caller seals the part
    return records


@dataclass(frozen=True)
class SampleLocation:
    part: int
    local_index: int
    start: int
    stop: int


def resolve_part_names(manifest: CacheManifest, names: set[str] | frozenset[str] | None) -> set[int]:
    """Indices of the manifest parts named in ``names`` (by name or relative group path).
    Unknown names are refused, so a typo never silently trains on a damaged part."""
    if not names:
        return set()
    index: dict[str, int] = {}
    for i, entry in enumerate(manifest.parts):
        index[entry["name"]] = i
        path = entry.get("path", f"parts/{entry['name']}.zarr")
        index[path] = i
        index[path.removesuffix(".zarr")] = i
    unknown = sorted(n for n in names if n not in index)
    if unknown:
        raise CacheError(
            f"unknown part(s) {', '.join(unknown)}; the cache's parts are named like "
            f"{manifest.parts[0]['name'] if manifest.parts else '(none)'} (see `talon validate`)"
        )
    return {index[n] for n in names}


def manifest_without_parts(cache_dir: Path, manifest: CacheManifest, skip: set[int]) -> CacheManifest:
    """The manifest as if the parts ``skip`` (indices) were never written: totals and token
    counts are rebuilt from the remaining parts' seals."""
    if not skip:
        return manifest
    keep = [entry for i, entry in enumerate(manifest.parts) if i not in skip]
    seals = [read_seal(part_seal_path(cache_dir, entry)) for entry in keep]
    counts: dict[int, int] = {}
    for seal in seals:
        for token, count in seal.assistant_token_counts.items():
            counts[token] = counts.get(token, 0) + count
    return replace(
        manifest,
        parts=tuple(keep),
        n_samples=sum(s.n_samples for s in seals),
        n_tokens=sum(s.n_tokens for s in seals),
        n_assistant_tokens=sum(s.n_assistant_tokens for s in seals),
        stored_bytes=sum(a.stored_bytes for s in seals for a in s.arrays.values()),
        assistant_token_counts=dict(sorted(counts.items())),
    )


class CacheReader:
    """Random access to the samples of a complete cache, without scanning it.

    Opening reads the manifest and each part's small ``sample_offsets`` array; the large arrays
    are opened lazily (once) and read by row range.  Instances pickle (Zarr arrays do), so
    DataLoader workers can share one.

    ``skip_parts`` (names or relative paths, as reported by ``talon validate``) removes those
    parts: their samples are not served and :attr:`manifest` is rebuilt without them.

    fp8 caches are decoded transparently: ``aux_hidden`` is always returned as uint16 bf16 bit
    patterns unless ``raw=True`` is passed to the read methods (then the uint8 codes and
    ``aux_scale`` come back as stored).

    Row ranges are read directly from the shard files (:mod:`schemas.shard`), decoding inner
    chunks on ``read_threads`` threads; ``direct_reads=False`` goes through zarr instead (same
    bytes, one core).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        manifest: CacheManifest | None = None,
        skip_parts: set[str] | None = None,
        *,
        direct_reads: bool = True,
        read_threads: int | None = None,
    ):
        self.cache_dir = Path(cache_dir)
        self.direct_reads = direct_reads
        self.read_threads = read_threads or max(1, min(8, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0  # the process that made _pool: a forked child (a DataLoader worker) makes its own
        self._shards: dict[tuple[int, str], ShardArray | None] = {}
        full = manifest or read_manifest(self.cache_dir)
        self.full_manifest = full
        self.skipped_parts = tuple(sorted(full.parts[i]["name"] for i in resolve_part_names(full, skip_parts)))
        self.manifest = manifest_without_parts(self.cache_dir, full, resolve_part_names(full, skip_parts))
        self.feature_dtype = self.manifest.settings.feature_dtype
        self.teacher = self.manifest.settings.teacher
        stored = {spec.name for spec in array_specs(self.manifest.target.vocab_size, self.feature_dtype, self.teacher)}
        self.sample_fields = tuple(name for name in SAMPLE_FIELDS if name in stored)
        self._groups: dict[int, zarr.Group] = {}
        self._arrays: dict[tuple[int, str], zarr.Array] = {}
        offsets, parts, local = [], [], []
        for index, part in enumerate(self.manifest.parts):
            part_offsets = np.asarray(self._array(index, "sample_offsets")[...], dtype=np.int64)
            if len(part_offsets) != part["n_samples"] + 1 or part_offsets[-1] != part["n_tokens"]:
                raise CacheError(
                    f"{part_group_path(self.cache_dir, part)}: sample_offsets disagree with the manifest "
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

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool"] = None  # thread pools do not pickle; each process makes its own
        return state

    def _executor(self) -> ThreadPoolExecutor | None:
        if self.read_threads <= 1:
            return None
        if self._pool is None or self._pool_pid != os.getpid():
            # After a fork the inherited pool's threads do not exist in the child: tasks sent to
            # it would never run.  The parent's pool is left alone (it is the parent's).
            self._pool = ThreadPoolExecutor(max_workers=self.read_threads, thread_name_prefix="talon-read")
            self._pool_pid = os.getpid()
        return self._pool

    def _dequantize(self, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """fp8 codes -> bf16 bits on the calling thread.  (Splitting the per-row decode loop over
        the read pool measured slower on a 16-core H100 host: the loop is GIL-bound.  That caps
        this path at ~10-18k tok/s of 8B-shaped features, so ``talon train`` reads ``raw=True``
        and decodes on its device with :func:`stage_extract.quant.dequantize_fp8`, which gives
        these same bits; this path serves inspect, validate and other decoded-value callers.)"""
        return dequantize_to_bf16_bits(codes, scales)

    def _shard(self, index: int, name: str) -> ShardArray | None:
        key = (index, name)
        if key not in self._shards:
            self._shards[key] = ShardArray.open(self.part_path(index) / name) if self.direct_reads else None
        return self._shards[key]

    def _rows(self, index: int, name: str, rows: slice) -> np.ndarray:
        shard = self._shard(index, name)
        if shard is None:
            return self._array(index, name)[rows]
        start, stop, _ = rows.indices(shard.shape[0])
        return shard.read_rows(start, stop, self._executor())

    def part_path(self, index: int) -> Path:
        return part_group_path(self.cache_dir, self.manifest.parts[index])

    def _group(self, index: int) -> zarr.Group:
        group = self._groups.get(index)
        if group is None:
            path = self.part_path(index)
            try:
                group = zarr.open_group(str(path), mode="r", zarr_format=3)
            except FileNotFoundError as err:
                raise CacheError(f"{path}: part listed in the manifest is missing") from err
            self._groups[index] = group
        return group

    def _array(self, index: int, name: str) -> zarr.Array:
        array = self._arrays.get((index, name))
        if array is None:
            try:
                array = self._group(index)[name]
            except KeyError as err:
                raise CacheError(f"{self.part_path(index)}: array {name!r} is missing") from err
            self._arrays[(index, name)] = array
        return array

    def part_offsets(self, index: int) -> np.ndarray:
        """``sample_offsets`` of part ``index`` (rows of its samples)."""
        return self._offsets[index]

    @property
    def sample_parts(self) -> np.ndarray:
        """The part index of every sample (int64 [n_samples]), for planning reads by part."""
        return self._part_of

    def locate(self, sample: int) -> SampleLocation:
        part, local = int(self._part_of[sample]), int(self._local[sample])
        offsets = self._offsets[part]
        return SampleLocation(part, local, int(offsets[local]), int(offsets[local + 1]))

    def _read_rows(self, part: int, names: tuple[str, ...], rows: slice, raw: bool, what: str) -> dict[str, np.ndarray]:
        wanted = list(names)
        decode = not raw and self.feature_dtype == "fp8" and "aux_hidden" in wanted
        if self.feature_dtype == "fp8" and "aux_hidden" in wanted and "aux_scale" not in wanted:
            wanted.append("aux_scale")  # needed to decode, and returned with the raw codes
        try:
            out = {name: self._rows(part, name, rows) for name in wanted}
        except CacheError:
            raise
        except Exception as err:  # zarr raises several codec/IO error types
            raise CacheError(f"{self.part_path(part)}: cannot read {what} ({err})") from err
        if decode:
            out["aux_hidden"] = self._dequantize(out["aux_hidden"], out["aux_scale"])
            if "aux_scale" not in names:
                del out["aux_scale"]
        return out

    def read_sample(self, sample: int, names: tuple[str, ...] | None = None, *, raw: bool = False) -> dict[str, np.ndarray]:
        """The stored rows of one sample (bf16 planes as uint16 bit patterns).

        ``names`` defaults to :attr:`sample_fields` (the per-token features this cache has)."""
        loc = self.locate(sample)
        return self._read_rows(loc.part, names or self.sample_fields, slice(loc.start, loc.stop), raw, f"sample {loc.local_index}")

    def read_part(self, index: int, names: tuple[str, ...] | None = None, *, raw: bool = False) -> dict[str, np.ndarray]:
        """Every row of part ``index`` (sequential, whole-shard decoding); sample ``i`` of the
        part owns rows ``part_offsets(index)[i]:part_offsets(index)[i+1]``."""
        return self._read_rows(index, names or self.sample_fields, slice(None), raw, "the part")

    def record_index(self, sample: int) -> int:
        loc = self.locate(sample)
        return int(self._array(loc.part, "record_index")[loc.local_index])

    def seal(self, index: int) -> PartSeal:
        return read_seal(part_seal_path(self.cache_dir, self.manifest.parts[index]))
