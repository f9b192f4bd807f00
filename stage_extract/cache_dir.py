"""Preparing a cache (and this worker's directory in it) for a new or resumed extraction.

A rerun of the same command continues where the last one stopped: sealed parts are kept, an
unsealed part (its Zarr group without a seal: the run was killed while writing it, or between
the group and the seal) is removed and recomputed, and temp files of interrupted atomic writes
(seals, ``worker.json``, the manifest, ``target_head.safetensors``) are removed.  The spec
written by the first run must match the new one exactly, at the root and in the worker's
directory, so a cache never mixes targets, settings or worker counts.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from schemas.jsonio import read_json, write_json_atomic
from schemas.layout import EXTRACT_SPEC_FILE, MANIFEST_FILE, PARTS_DIR
from schemas.manifest import CacheError, ExtractSpec, PartSeal, read_sealed_parts, worker_file
from stage_extract.workers import Shard
from stage_extract.writer import CacheWriteError, describe_write_error


@dataclass(frozen=True)
class ResumeState:
    worker_dir: Path
    seals: list[PartSeal]
    complete: bool  # this worker finished (its worker.json exists)
    merged: bool  # the cache manifest exists
    schema_version: int  # the cache's (an older cache resumed keeps its own)

    @property
    def last_record(self) -> int:
        return self.seals[-1].last_record if self.seals else -1

    @property
    def next_part(self) -> int:
        return len(self.seals)


def is_temp_file(path: Path) -> bool:
    """A temp file of an interrupted atomic write (``.name.XXXX.tmp``, or the legacy
    ``target_head.tmp``)."""
    return path.is_file() and (path.name.startswith(".") and path.name.endswith(".tmp") or path.name == "target_head.tmp")


def remove_temp_files(folder: Path) -> None:
    if folder.is_dir():
        for path in folder.iterdir():
            if is_temp_file(path):
                path.unlink(missing_ok=True)


def _ensure_spec(folder: Path, spec: ExtractSpec, what: str) -> ExtractSpec:
    """The spec ``folder`` holds: written from ``spec`` if it has none, else its own, which must
    not differ from ``spec`` in target or settings (its schema version may be older)."""
    path = folder / EXTRACT_SPEC_FILE
    if path.is_file():
        existing = ExtractSpec.from_dict(read_json(path))
        diffs = existing.differences(spec)
        if diffs:
            raise CacheError(
                f"{what} {folder} already holds an extraction with other settings; use another --out, or the "
                "same settings to resume it. Differences:\n  " + "\n  ".join(diffs)
            )
        return existing
    write_json_atomic(path, spec.to_dict())
    return spec


def resumed_setting(cache_dir: Path, name: str, requested: str) -> str:
    """``auto`` continues an existing cache with the value of setting ``name`` it was started with.

    Defaults change between releases (the aux codec, the forward's batching); resuming a cache
    with the plain command line must not be refused, nor mix numerics, only because of that.
    Caches written before such a setting existed read as its legacy value (see
    :meth:`ExtractSettings.from_dict`).
    """
    path = Path(cache_dir) / EXTRACT_SPEC_FILE
    if requested != "auto" or not path.is_file():
        return requested
    return getattr(ExtractSpec.from_dict(read_json(path)).settings, name)


def prepare_cache_dir(cache_dir: Path, spec: ExtractSpec, shard: Shard | None = None) -> ResumeState:
    shard = shard or Shard()
    cache_dir = Path(cache_dir)
    worker_dir = shard.worker_dir(cache_dir)
    try:
        if not (cache_dir / EXTRACT_SPEC_FILE).is_file() and cache_dir.exists():
            if not cache_dir.is_dir():
                raise CacheError(f"{cache_dir} exists and is not a directory")
            # Another worker of the same run may be creating the cache right now: its temp files
            # and workers/ folder are fine, anything else is not ours to overwrite.
            foreign = [p.name for p in cache_dir.iterdir() if not is_temp_file(p) and p.name != "workers"]
            if foreign:
                raise CacheError(f"{cache_dir} exists and is not a Talon cache; refusing to write into it")
        cache_dir.mkdir(parents=True, exist_ok=True)
        spec = _ensure_spec(cache_dir, spec, "the cache")  # an older cache, resumed or joined, keeps its version
        if worker_dir != cache_dir:
            worker_dir.mkdir(parents=True, exist_ok=True)
            spec = _ensure_spec(worker_dir, spec, "the worker directory")
        # Temp files under the root are removed only by a single worker: with several, another
        # worker's rename may still be pending.  A worker's own directory is its alone.
        if shard.count == 1:
            remove_temp_files(cache_dir)
        remove_temp_files(worker_dir)
        remove_temp_files(worker_dir / PARTS_DIR)
    except OSError as err:
        raise CacheWriteError(describe_write_error(err, cache_dir, "preparing the cache")) from err
    seals = read_sealed_parts(worker_dir)
    sealed_names = {seal.name for seal in seals}
    for group in Path(worker_dir, PARTS_DIR).glob("part-*.zarr"):
        if group.name.removesuffix(".zarr") not in sealed_names:
            shutil.rmtree(group)  # a killed run's half-written part; it is recomputed
    return ResumeState(
        worker_dir=worker_dir,
        seals=seals,
        complete=worker_file(worker_dir).is_file(),
        merged=(cache_dir / MANIFEST_FILE).is_file(),
        schema_version=spec.schema_version,
    )
