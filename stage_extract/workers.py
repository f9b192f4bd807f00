"""Multi-worker extraction: who owns which records, and the merge of the workers' parts.

Design (one code path for 1 and N workers):

* Worker ``I`` of ``N`` owns the records with ``record_index % N == I`` (``--shard-index I
  --num-shards N``; or torchrun's ``RANK`` / ``WORLD_SIZE`` when the flags are absent).  Every
  worker reads the whole source (records are cheap to parse; tokenising and the target forward
  happen only for owned records), so each sees the same record indices and source counters.
* It writes its parts and ``worker.json`` into its own directory (the cache root when ``N = 1``,
  ``workers/worker-I-of-N/`` otherwise), so workers never write the same file except the
  root's ``extract.json`` / ``target_head.safetensors`` (identical content, atomic renames).
* :func:`merge_cache` writes the cache manifest once every worker has its ``worker.json``.
  Each worker calls it when it finishes, so whichever finishes last merges; ``talon merge
  CACHE`` runs it by hand (after a crash of the last worker, or on a file system without
  close-to-open consistency).  The merge checks that all workers recorded the same target
  identity, layers and settings.  The global sample order is workers by index, then parts by
  index: deterministic for a given ``N``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from schemas.jsonio import read_json, write_json_atomic
from schemas.layout import EXTRACT_SPEC_FILE, array_specs, worker_dir_relpath, worker_name
from schemas.manifest import (
    CacheError,
    CacheManifest,
    ExtractSpec,
    PartSeal,
    WorkerRecord,
    build_manifest,
    local_location,
    read_record,
    read_sealed_parts,
    worker_file,
    write_manifest,
)


@dataclass(frozen=True)
class Shard:
    """This worker's share of the records."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is not in [0, {self.count})")

    def owns(self, record_index: int) -> bool:
        return record_index % self.count == self.index

    @property
    def name(self) -> str:
        return worker_name(self.index, self.count)

    @property
    def relpath(self) -> str:
        return worker_dir_relpath(self.index, self.count)

    def worker_dir(self, cache_dir: Path) -> Path:
        return Path(cache_dir) / self.relpath if self.relpath else Path(cache_dir)


def resolve_shard(shard_index: int | None, num_shards: int | None, environ: dict[str, str] | None = None) -> Shard:
    """The flags when given, else torchrun's ``RANK``/``WORLD_SIZE``, else the single worker."""
    if shard_index is not None and num_shards is not None:
        return Shard(shard_index, num_shards)
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        try:
            return Shard(int(env["RANK"]), int(env["WORLD_SIZE"]))
        except ValueError as err:
            raise ValueError(f"cannot use RANK={env['RANK']!r} / WORLD_SIZE={env['WORLD_SIZE']!r} as a shard: {err}") from err
    return Shard()


def read_spec(path: Path) -> ExtractSpec:
    return read_record(path, ExtractSpec.from_dict, "the extraction spec")


def write_worker_record(worker_dir: Path, shard: Shard, seals: list[PartSeal], source_stats: dict[str, int]) -> WorkerRecord:
    record = WorkerRecord(
        shard_index=shard.index,
        num_shards=shard.count,
        n_parts=len(seals),
        n_samples=sum(s.n_samples for s in seals),
        n_tokens=sum(s.n_tokens for s in seals),
        source_stats=dict(source_stats),
    )
    write_json_atomic(worker_file(worker_dir), record.to_dict())
    return record


def worker_status(cache_dir: Path) -> tuple[ExtractSpec, list[Shard], list[Shard]]:
    """(the cache spec, finished workers, unfinished workers)."""
    spec = read_spec(Path(cache_dir) / EXTRACT_SPEC_FILE)
    shards = [Shard(i, spec.settings.num_shards) for i in range(spec.settings.num_shards)]
    done = [s for s in shards if worker_file(s.worker_dir(cache_dir)).is_file()]
    return spec, done, [s for s in shards if s not in done]


def merge_cache(cache_dir: str | Path, *, require_complete: bool = True) -> CacheManifest | None:
    """Write ``manifest.json`` over every worker's sealed parts.

    Returns None (or raises :class:`CacheError` when ``require_complete``) while a worker has
    not finished; refuses workers whose spec differs from the cache's.  Idempotent: merging
    twice writes the same manifest."""
    cache_dir = Path(cache_dir)
    spec, done, missing = worker_status(cache_dir)
    if missing:
        if require_complete:
            raise CacheError(
                f"{cache_dir}: cannot merge, {len(missing)} of {spec.settings.num_shards} workers have not finished: "
                + ", ".join(s.name for s in missing)
                + ". Run them (`talon extract ... --shard-index I --num-shards N`; each resumes)."
            )
        return None
    seals: list[PartSeal] = []
    locations = []
    source_stats: dict[str, int] | None = None
    for shard in done:
        worker_dir = shard.worker_dir(cache_dir)
        if shard.relpath:
            diffs = read_spec(worker_dir / EXTRACT_SPEC_FILE).differences(spec)
            if diffs:
                raise CacheError(
                    f"{worker_dir} was extracted with other settings than {cache_dir / EXTRACT_SPEC_FILE}; "
                    "the workers of one cache must share target, layers and settings:\n  " + "\n  ".join(diffs)
                )
        record = WorkerRecord.from_dict(read_json(worker_file(worker_dir)))
        worker_seals = read_sealed_parts(worker_dir)
        if len(worker_seals) != record.n_parts:
            raise CacheError(f"{worker_dir}: {len(worker_seals)} sealed parts, but its worker.json records {record.n_parts}")
        if source_stats is None:
            source_stats = record.source_stats
        seals.extend(worker_seals)
        locations.extend(local_location(seal, shard.relpath, shard.index) for seal in worker_seals)
    arrays = {
        s.name: {"storage": s.storage_dtype, "logical": s.logical_dtype}
        for s in array_specs(spec.target.vocab_size, spec.settings.feature_dtype, spec.settings.teacher)
    }
    manifest = build_manifest(spec, seals, arrays, locations=locations, source_stats=source_stats or {})
    if manifest.n_samples == 0:
        raise ValueError(f"no usable samples in {spec.settings.data!r}: {manifest.source_stats} {manifest.dropped}")
    write_manifest(cache_dir, manifest)
    return manifest
