"""Manifests of a feature cache: what was extracted, from which target, and what is sealed.

Three kinds of record, all plain JSON written atomically (see :mod:`schemas.jsonio`):

* :class:`ExtractSpec` (``extract.json``) is written before the first part.  A resumed run must
  present the same spec, so a cache can never mix features from two targets or two settings.
* :class:`PartSeal` (``parts/part-NNNNNN.json``) is written after its Zarr group is complete.  A
  part without a seal does not exist as far as every reader is concerned.
* :class:`WorkerRecord` (``worker.json``) is written by a worker once all its parts are sealed.
* :class:`CacheManifest` (``manifest.json``) is written last, by the merge of all workers' parts
  (see :mod:`stage_extract.workers`).  A cache without it is incomplete.

Every part is addressed by its manifest entry: ``name`` (unique in the cache, e.g.
``part-000003`` or ``worker-1-of-2/part-000003``) and ``path`` (the Zarr group relative to the
cache root; its seal is the same path with ``.json``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from schemas.checksum import CHECKSUMS, LEGACY_CHECKSUM
from schemas.jsonio import read_json, write_json_atomic
from schemas.layout import (
    DEFAULT_AUX_COMPRESSION,
    DEFAULT_BATCHING,
    EXTRACT_SPEC_FILE,
    LAYER_CONVENTION,
    LEGACY_AUX_COMPRESSION,
    LEGACY_BATCHING,
    MANIFEST_FILE,
    PARTS_DIR,
    READABLE_SCHEMA_VERSIONS,
    WORKER_FILE,
    WORKERS_DIR,
    resolve_aux_compression,
    resolve_batching,
)

# The target-config fields that define the feature space a draft is trained in.
IDENTITY_CONFIG_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
)

# Fields of TargetIdentity compared when a cache, a target and a draft must agree, in the order
# they are reported.  `source` is deliberately absent: the same model may live at two paths.
MATCH_FIELDS = (
    "hidden_size",
    "vocab_size",
    "num_hidden_layers",
    "config_hash",
    "tokenizer_hash",
    "chat_template_hash",
    "weights_fingerprint",
)


class CacheError(RuntimeError):
    """A cache is missing, incomplete, damaged, or does not belong to the requested target."""


def config_hash(config: dict[str, Any]) -> str:
    """sha256 over the identity fields of a target config, canonical JSON, stable across runs."""
    picked = {key: config.get(key) for key in IDENTITY_CONFIG_FIELDS}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class TargetIdentity:
    """Who the features came from.  ``config`` is the full HF config, so training can build the
    draft without loading the target."""

    source: str
    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
    config_hash: str
    tokenizer_hash: str
    chat_template_hash: str
    weights_fingerprint: str
    config: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TargetIdentity":
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})

    def mismatches(self, other: "TargetIdentity") -> list[str]:
        """Human-readable lines for every identity field that differs (empty when they match)."""
        lines = []
        for key in MATCH_FIELDS:
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                lines.append(f"{key}: cache has {mine!r}, target has {theirs!r}")
        return lines


def require_same_target(cache_target: TargetIdentity, other: TargetIdentity, *, where: str) -> None:
    """Raise :class:`CacheError` naming every differing field if ``other`` is not the cache's target."""
    diffs = cache_target.mismatches(other)
    if diffs:
        raise CacheError(
            f"{where} was extracted from a different target than {other.source!r}:\n  "
            + "\n  ".join(diffs)
            + "\nRe-extract the cache with this target, or train with the target it was made from "
            f"({cache_target.source!r})."
        )


@dataclass(frozen=True)
class ExtractSettings:
    """Everything about an extraction run that changes the bytes written."""

    data: str
    max_length: int
    top_k: int
    layer_ids: tuple[int, ...]
    max_samples: int | None
    part_tokens: int
    batch_tokens: int
    skip_bad_records: bool
    compute_dtype: str
    device_type: str
    feature_dtype: str = "bf16"
    teacher: str = "topk"
    num_shards: int = 1
    aux_compression: str = DEFAULT_AUX_COMPRESSION  # codec of the feature planes; stored resolved
    batching: str = DEFAULT_BATCHING  # layout of the target's forwards (schemas.layout.BATCHINGS); stored resolved

    def __post_init__(self) -> None:
        object.__setattr__(self, "aux_compression", resolve_aux_compression(self.aux_compression, self.feature_dtype))
        object.__setattr__(self, "batching", resolve_batching(self.batching))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layer_ids"] = list(self.layer_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExtractSettings":
        values = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        values["layer_ids"] = tuple(values["layer_ids"])
        # written before the setting existed: those caches used the blosc-zstd chain
        values.setdefault("aux_compression", LEGACY_AUX_COMPRESSION)
        values.setdefault("batching", LEGACY_BATCHING)  # and padded batches
        return cls(**values)


@dataclass(frozen=True)
class ExtractSpec:
    schema_version: int
    target: TargetIdentity
    settings: ExtractSettings
    layer_convention: str = LAYER_CONVENTION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "target": self.target.to_dict(),
            "settings": self.settings.to_dict(),
            "layer_convention": self.layer_convention,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExtractSpec":
        return cls(
            schema_version=int(data["schema_version"]),
            target=TargetIdentity.from_dict(data["target"]),
            settings=ExtractSettings.from_dict(data["settings"]),
            layer_convention=data.get("layer_convention", LAYER_CONVENTION),
        )

    def differences(self, other: "ExtractSpec") -> list[str]:
        lines = [f"target {line}" for line in self.target.mismatches(other.target)]
        mine, theirs = self.settings.to_dict(), other.settings.to_dict()
        lines += [
            f"{key}: existing {mine[key]!r}, requested {theirs[key]!r}"
            for key in mine
            if mine[key] != theirs.get(key)
        ]
        return lines


@dataclass(frozen=True)
class ArrayRecord:
    """One array of a sealed part as written.

    ``crc32`` is a CRC-32 of the whole array's bytes, by the polynomial ``checksum`` names
    (:mod:`schemas.checksum`: ``crc32c`` for new parts; ``crc32``, zlib's, for parts written
    before, whose records have no ``checksum`` key).  For per-token arrays ``sample_crc32[i]`` is
    the running value after sample ``i``'s rows (so ``sample_crc32[-1] == crc32``): sample ``i``
    is intact iff ``crc(rows_i, sample_crc32[i-1]) == sample_crc32[i]``, which lets validation
    name the damaged sample at the cost of one checksum pass at write time.
    """

    shape: tuple[int, ...]
    crc32: int
    stored_bytes: int
    dtype: str = ""
    sample_crc32: tuple[int, ...] = ()
    checksum: str = LEGACY_CHECKSUM

    def __post_init__(self) -> None:
        if self.checksum not in CHECKSUMS:
            raise ValueError(f"unknown checksum {self.checksum!r} (this version knows {', '.join(CHECKSUMS)})")

    def to_dict(self) -> dict[str, Any]:
        data = {"shape": list(self.shape), "crc32": self.crc32, "stored_bytes": self.stored_bytes}
        if self.dtype:
            data["dtype"] = self.dtype
        if self.sample_crc32:
            data["sample_crc32"] = list(self.sample_crc32)
        if self.checksum != LEGACY_CHECKSUM:
            data["checksum"] = self.checksum
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArrayRecord":
        return cls(
            shape=tuple(int(s) for s in data["shape"]),
            crc32=int(data["crc32"]),
            stored_bytes=int(data["stored_bytes"]),
            dtype=str(data.get("dtype", "")),
            sample_crc32=tuple(int(c) for c in data.get("sample_crc32", ())),
            checksum=str(data.get("checksum", LEGACY_CHECKSUM)),
        )


@dataclass(frozen=True)
class PartSeal:
    """The seal of one part: written only after every array of the part is on disk."""

    index: int
    name: str
    n_samples: int
    n_tokens: int
    n_assistant_tokens: int
    first_record: int
    last_record: int
    records_consumed: int
    dropped: dict[str, int]
    nonfinite_records: tuple[int, ...]
    source_stats: dict[str, int]
    arrays: dict[str, ArrayRecord]
    assistant_token_counts: dict[int, int]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["nonfinite_records"] = list(self.nonfinite_records)
        data["arrays"] = {k: v.to_dict() for k, v in self.arrays.items()}
        data["assistant_token_counts"] = {str(k): v for k, v in self.assistant_token_counts.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PartSeal":
        values = dict(data)
        values["nonfinite_records"] = tuple(data["nonfinite_records"])
        values["arrays"] = {k: ArrayRecord.from_dict(v) for k, v in data["arrays"].items()}
        values["assistant_token_counts"] = {int(k): int(v) for k, v in data["assistant_token_counts"].items()}
        return cls(**values)


def seal_path(cache_dir: Path, name: str) -> Path:
    return Path(cache_dir) / PARTS_DIR / f"{name}.json"


def group_path(cache_dir: Path, name: str) -> Path:
    return Path(cache_dir) / PARTS_DIR / f"{name}.zarr"


def write_seal(cache_dir: Path, seal: PartSeal) -> None:
    write_json_atomic(seal_path(cache_dir, seal.name), seal.to_dict())


def read_record(path: Path, parse, what: str):
    """Parse one JSON record of the cache, turning a missing or damaged file into a
    :class:`CacheError` that names the file and what it should have held."""
    try:
        return parse(read_json(path))
    except FileNotFoundError as err:
        raise CacheError(f"{path}: {what} is missing") from err
    except (ValueError, KeyError, TypeError) as err:
        raise CacheError(f"{path}: {what} is damaged ({err})") from err


def read_seal(path: Path) -> PartSeal:
    return read_record(path, PartSeal.from_dict, "the part's seal")


def read_sealed_parts(worker_dir: Path) -> list[PartSeal]:
    """Every sealed part of one worker directory (the cache root for a single worker), in index
    order.  Refuses gaps: a worker seals its parts strictly in order.  Temp files of an
    interrupted atomic write start with a dot and are not seals."""
    seals = sorted(Path(worker_dir, PARTS_DIR).glob("part-*.json"))
    parts = [read_seal(path) for path in seals]
    for expected, part in enumerate(parts):
        if part.index != expected:
            raise CacheError(f"{worker_dir}: part {expected} is missing its seal but {part.name} has one")
    return parts


@dataclass(frozen=True)
class WorkerRecord:
    """``worker.json``: written by a worker after its last part is sealed."""

    shard_index: int
    num_shards: int
    n_parts: int
    n_samples: int
    n_tokens: int
    source_stats: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorkerRecord":
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})


def worker_file(worker_dir: Path) -> Path:
    return Path(worker_dir) / WORKER_FILE


def part_group_path(cache_dir: str | Path, entry: dict[str, Any]) -> Path:
    """The Zarr group of a manifest part entry (v1 entries have no ``path``: ``parts/<name>.zarr``)."""
    return Path(cache_dir) / entry.get("path", f"{PARTS_DIR}/{entry['name']}.zarr")


def part_seal_path(cache_dir: str | Path, entry: dict[str, Any]) -> Path:
    return part_group_path(cache_dir, entry).with_suffix(".json")


@dataclass(frozen=True)
class CacheManifest:
    """The cache-level manifest: written last, so its presence means the cache is complete."""

    schema_version: int
    target: TargetIdentity
    settings: ExtractSettings
    layer_convention: str
    parts: tuple[dict[str, Any], ...]
    n_samples: int
    n_tokens: int
    n_assistant_tokens: int
    stored_bytes: int
    source_stats: dict[str, int]
    dropped: dict[str, int]
    nonfinite_records: tuple[int, ...]
    assistant_token_counts: dict[int, int]
    arrays: dict[str, dict[str, str]]
    talon_version: str = "0.1.0"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = self.target.to_dict()
        data["settings"] = self.settings.to_dict()
        data["parts"] = list(self.parts)
        data["nonfinite_records"] = list(self.nonfinite_records)
        data["assistant_token_counts"] = {str(k): v for k, v in self.assistant_token_counts.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CacheManifest":
        values = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        values["target"] = TargetIdentity.from_dict(data["target"])
        values["settings"] = ExtractSettings.from_dict(data["settings"])
        values["parts"] = tuple(data["parts"])
        values["nonfinite_records"] = tuple(data["nonfinite_records"])
        values["assistant_token_counts"] = {int(k): int(v) for k, v in data["assistant_token_counts"].items()}
        return cls(**values)

    @property
    def bytes_per_token(self) -> float:
        return self.stored_bytes / max(self.n_tokens, 1)


@dataclass(frozen=True)
class PartLocation:
    """Where a sealed part sits in the cache: its unique name, its group path relative to the
    cache root, and the worker that wrote it."""

    name: str
    path: str
    worker: int = 0


def local_location(seal: PartSeal, worker_relpath: str = "", worker: int = 0) -> PartLocation:
    prefix = f"{worker_relpath}/" if worker_relpath else ""
    name = f"{worker_relpath.rsplit('/', 1)[-1]}/{seal.name}" if worker_relpath else seal.name
    return PartLocation(name=name, path=f"{prefix}{PARTS_DIR}/{seal.name}.zarr", worker=worker)


def build_manifest(
    spec: ExtractSpec,
    seals: list[PartSeal],
    arrays: dict[str, dict[str, str]],
    *,
    locations: list[PartLocation] | None = None,
    source_stats: dict[str, int] | None = None,
) -> CacheManifest:
    """The cache manifest over ``seals`` in global order (``locations`` default to the
    single-worker layout; ``source_stats`` to the last seal's)."""
    locations = locations if locations is not None else [local_location(s) for s in seals]
    if len(locations) != len(seals):
        raise ValueError("build_manifest needs one location per seal")
    counts: dict[int, int] = {}
    dropped: dict[str, int] = {}
    nonfinite: list[int] = []
    for seal in seals:
        for token, count in seal.assistant_token_counts.items():
            counts[token] = counts.get(token, 0) + count
        for reason, count in seal.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
        nonfinite.extend(seal.nonfinite_records)
    return CacheManifest(
        schema_version=spec.schema_version,
        target=spec.target,
        settings=spec.settings,
        layer_convention=spec.layer_convention,
        parts=tuple(
            {"name": loc.name, "path": loc.path, "worker": loc.worker, "n_samples": s.n_samples, "n_tokens": s.n_tokens}
            for loc, s in zip(locations, seals)
        ),
        n_samples=sum(s.n_samples for s in seals),
        n_tokens=sum(s.n_tokens for s in seals),
        n_assistant_tokens=sum(s.n_assistant_tokens for s in seals),
        stored_bytes=sum(a.stored_bytes for s in seals for a in s.arrays.values()),
        source_stats=dict(source_stats if source_stats is not None else (seals[-1].source_stats if seals else {})),
        dropped=dropped,
        nonfinite_records=tuple(nonfinite),
        assistant_token_counts=dict(sorted(counts.items())),
        arrays=arrays,
    )


def write_manifest(cache_dir: Path, manifest: CacheManifest) -> None:
    write_json_atomic(Path(cache_dir) / MANIFEST_FILE, manifest.to_dict())


def read_manifest(cache_dir: str | Path) -> CacheManifest:
    """Open a complete cache's manifest, or explain exactly why it cannot be used."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise CacheError(f"no feature cache at {cache_dir}: the directory does not exist")
    path = cache_dir / MANIFEST_FILE
    if not path.is_file():
        workers = cache_dir / WORKERS_DIR
        if workers.is_dir():
            done = sorted(p.parent.name for p in workers.glob(f"*/{WORKER_FILE}"))
            started = sorted(p.name for p in workers.iterdir() if p.is_dir())
            raise CacheError(
                f"{cache_dir} is an incomplete multi-worker cache (no {MANIFEST_FILE}): "
                f"{len(done)} of the {len(started)} started workers finished ({', '.join(done) or 'none'}). "
                "Rerun the missing `talon extract --shard-index I --num-shards N` workers (each resumes), "
                "then `talon merge` if the last worker did not merge."
            )
        if (cache_dir / EXTRACT_SPEC_FILE).is_file():
            raise CacheError(
                f"{cache_dir} is an incomplete cache (no {MANIFEST_FILE}): its extraction was interrupted. "
                "Rerun the same `talon extract` command to resume it."
            )
        raise CacheError(f"{cache_dir} is not a Talon feature cache (no {MANIFEST_FILE})")
    try:
        data = read_json(path)
    except ValueError as err:
        raise CacheError(f"{path} is damaged ({err}); rerun `talon merge {cache_dir}` to rewrite it") from err
    version = data.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise CacheError(
            f"{path}: schema version {version!r}, this Talon reads versions "
            f"{', '.join(str(v) for v in READABLE_SCHEMA_VERSIONS)}"
        )
    return CacheManifest.from_dict(data)
