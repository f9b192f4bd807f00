"""Checking a cache against its seals and manifest, and naming whatever is damaged.

Two depths, one function (:func:`validate_cache`):

* **cheap** (``deep=False``, run whenever training opens a cache; reads only JSON, Zarr
  metadata, file sizes and the two small per-sample arrays): every manifest part has its seal
  and group; counts agree between manifest, seal and arrays; shapes, widths and storage dtypes
  match the cache's settings; ``sample_offsets`` start at 0, never decrease and end at the token
  count; ``record_index`` increases inside the part's record range and belongs to the part's
  worker; the bytes on disk are exactly the bytes written; ``target_head.safetensors`` holds
  what the settings need.
* **deep** (``deep=True``, ``talon validate``): additionally decodes every array and compares
  the CRC recorded at write time, sample by sample, so the report names the first damaged
  sample (its part, array, index in the part, global index and record).

Damage is reported, not raised: :meth:`ValidationReport.require_ok` turns it into a
:class:`~schemas.manifest.CacheError` unless the damaged parts are explicitly skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm

from schemas.layout import TARGET_HEAD_FILE, array_specs, has_final_hidden, row_widths
from schemas.checksum import checksum
from schemas.manifest import ArrayRecord, CacheError, CacheManifest, PartSeal, part_group_path, part_seal_path, read_manifest, read_seal
from schemas.store import dir_bytes

DEEP_BLOCK_BYTES = 64 << 20  # decode at most this much of an array at a time


@dataclass(frozen=True)
class Damage:
    """One problem found in a cache.  ``part`` is the manifest part name (None for cache-level
    problems); ``sample`` is the index inside the part, ``global_sample`` the reader's index."""

    part: str | None
    array: str | None
    problem: str
    sample: int | None = None
    global_sample: int | None = None
    record_index: int | None = None

    def describe(self) -> str:
        where = [f"part {self.part}" if self.part else "cache"]
        if self.array:
            where.append(f"array {self.array}")
        if self.sample is not None:
            where.append(f"sample {self.sample} (global {self.global_sample}, record {self.record_index})")
        return f"{', '.join(where)}: {self.problem}"


@dataclass
class ValidationReport:
    cache: str
    deep: bool
    n_parts: int = 0
    n_samples: int = 0
    n_tokens: int = 0
    checked_bytes: int = 0
    damage: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage

    @property
    def damaged_parts(self) -> list[str]:
        return sorted({d.part for d in self.damage if d.part is not None})

    def require_ok(self, skip_parts: set[str] | None = None) -> None:
        """Raise :class:`CacheError` for any damage outside ``skip_parts``; cache-level damage
        (no part named) can never be skipped."""
        skip = set(skip_parts or ())
        remaining = [d for d in self.damage if d.part is None or d.part not in skip]
        if remaining:
            parts = sorted({d.part for d in remaining if d.part})
            hint = (
                f"\nTo train on the rest, skip the damaged parts: --skip-parts {','.join(parts)}"
                if parts and all(d.part for d in remaining)
                else ""
            )
            raise CacheError(
                f"{self.cache} is damaged ({len(remaining)} problem(s)):\n  "
                + "\n  ".join(d.describe() for d in remaining[:20])
                + hint
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache": self.cache,
            "deep": self.deep,
            "ok": self.ok,
            "parts": self.n_parts,
            "samples": self.n_samples,
            "tokens": self.n_tokens,
            "checked_bytes": self.checked_bytes,
            "damaged_parts": self.damaged_parts,
            "damage": [asdict(d) for d in self.damage],
        }


def _check_target_head(cache_dir: Path, manifest: CacheManifest, report: ValidationReport) -> None:
    path = cache_dir / TARGET_HEAD_FILE
    needed = {"embed_tokens.weight"}
    if has_final_hidden(manifest.settings.teacher):
        needed |= {"norm.weight", "lm_head.weight"}
    if not path.is_file():
        report.damage.append(Damage(None, None, f"{TARGET_HEAD_FILE} is missing"))
        return
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            present = set(handle.keys())
    except Exception as err:  # safetensors raises its own error types for a bad header
        report.damage.append(Damage(None, None, f"{TARGET_HEAD_FILE} is unreadable ({err})"))
        return
    missing = sorted(needed - present)
    if missing:
        report.damage.append(Damage(None, None, f"{TARGET_HEAD_FILE} lacks {', '.join(missing)}"))


class _PartCheck:
    """The checks of one part; appends to ``report`` and stops at the first structural problem."""

    def __init__(self, cache_dir: Path, manifest: CacheManifest, index: int, first_sample: int, report: ValidationReport):
        self.cache_dir = cache_dir
        self.manifest = manifest
        self.entry = manifest.parts[index]
        self.name = self.entry["name"]
        self.first_sample = first_sample
        self.report = report
        self.offsets: np.ndarray | None = None
        self.records: np.ndarray | None = None

    def fail(self, array: str | None, problem: str, sample: int | None = None) -> None:
        record = None
        if sample is not None and self.records is not None and sample < len(self.records):
            record = int(self.records[sample])
        self.report.damage.append(Damage(
            self.name, array, problem, sample,
            None if sample is None else self.first_sample + sample, record,
        ))

    def cheap(self) -> tuple[PartSeal, zarr.Group] | None:
        settings = self.manifest.settings
        try:
            seal = read_seal(part_seal_path(self.cache_dir, self.entry))
        except CacheError as err:
            self.fail(None, str(err))
            return None
        if (seal.n_samples, seal.n_tokens) != (self.entry["n_samples"], self.entry["n_tokens"]):
            self.fail(None, f"seal says {seal.n_samples} samples / {seal.n_tokens} tokens, manifest "
                            f"{self.entry['n_samples']} / {self.entry['n_tokens']}")
            return None
        path = part_group_path(self.cache_dir, self.entry)
        try:
            group = zarr.open_group(str(path), mode="r", zarr_format=3)
        except Exception as err:  # missing directory, damaged zarr.json
            self.fail(None, f"cannot open {path} ({err})")
            return None
        specs = array_specs(self.manifest.target.vocab_size, settings.feature_dtype, settings.teacher)
        expected = {spec.name for spec in specs}
        if set(seal.arrays) != expected:
            self.fail(None, f"seal lists arrays {sorted(seal.arrays)}, settings need {sorted(expected)}")
            return None
        widths = row_widths(self.manifest.target.hidden_size, settings.top_k, settings.feature_dtype, settings.teacher)
        for spec in specs:
            record = seal.arrays[spec.name]
            try:
                array = group[spec.name]
            except KeyError:
                self.fail(spec.name, "array is missing")
                return None
            if tuple(array.shape) != record.shape:
                self.fail(spec.name, f"shape {tuple(array.shape)} on disk, {record.shape} in the seal")
                return None
            if str(array.dtype) != spec.storage_dtype or (record.dtype and record.dtype != spec.storage_dtype):
                self.fail(spec.name, f"dtype {array.dtype} on disk, {spec.storage_dtype} expected")
                return None
            if spec.per_token:
                width = widths[spec.name]
                want = (seal.n_tokens,) if width == 1 and spec.name in ("input_ids", "loss_mask") else (seal.n_tokens, width)
                if record.shape != want:
                    self.fail(spec.name, f"shape {record.shape}, expected {want} for {seal.n_tokens} tokens")
                    return None
                if record.sample_crc32 and len(record.sample_crc32) != seal.n_samples:
                    self.fail(spec.name, f"{len(record.sample_crc32)} sample checksums for {seal.n_samples} samples")
                    return None
            on_disk = dir_bytes(path / spec.name)
            if on_disk != record.stored_bytes:
                self.fail(spec.name, f"{on_disk} bytes on disk, {record.stored_bytes} written (truncated or replaced)")
                return None
        if seal.arrays["sample_offsets"].shape != (seal.n_samples + 1,) or seal.arrays["record_index"].shape != (seal.n_samples,):
            self.fail(None, "sample_offsets / record_index lengths do not match the sample count")
            return None
        try:
            offsets = np.asarray(group["sample_offsets"][...], dtype=np.int64)
            records = np.asarray(group["record_index"][...], dtype=np.int64)
        except Exception as err:
            self.fail("sample_offsets", f"cannot decode ({err})")
            return None
        self.records = records
        if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != seal.n_tokens:
            self.fail("sample_offsets", f"must run from 0 to {seal.n_tokens}")
            return None
        bad = np.flatnonzero(np.diff(offsets) < 0)
        if len(bad):
            self.fail("sample_offsets", "offsets decrease", sample=int(bad[0]))
            return None
        self.offsets = offsets
        if len(records):
            if np.any(np.diff(records) <= 0):
                self.fail("record_index", "record indices do not increase", sample=int(np.flatnonzero(np.diff(records) <= 0)[0]) + 1)
                return None
            if records[0] < seal.first_record or records[-1] > seal.last_record:
                self.fail("record_index", f"records outside the sealed range {seal.first_record}..{seal.last_record}")
                return None
            shards = max(int(settings.num_shards), 1)
            worker = int(self.entry.get("worker", 0))
            foreign = np.flatnonzero(records % shards != worker)
            if len(foreign):
                self.fail("record_index", f"record not owned by worker {worker} of {shards}", sample=int(foreign[0]))
                return None
        return seal, group

    def deep(self, seal: PartSeal, group: zarr.Group) -> None:
        assert self.offsets is not None
        for name, record in seal.arrays.items():
            array = group[name]
            if not record.sample_crc32:
                self._deep_whole(name, array, record)
                continue
            self._deep_samples(name, array, record)

    def _deep_whole(self, name: str, array: zarr.Array, record: ArrayRecord) -> None:
        try:
            data = np.ascontiguousarray(array[...])
        except Exception as err:
            self.fail(name, f"cannot decode ({err})")
            return
        self.report.checked_bytes += data.nbytes
        if checksum(data, 0, record.checksum) != record.crc32:
            self.fail(name, "checksum mismatch")

    def _deep_samples(self, name: str, array: zarr.Array, record: ArrayRecord) -> None:
        offsets = self.offsets
        row_bytes = max(1, int(np.dtype(array.dtype).itemsize * int(np.prod(array.shape[1:], dtype=np.int64))))
        sample, n = 0, len(record.sample_crc32)
        while sample < n:
            stop = sample + 1
            while stop < n and (offsets[stop + 1] - offsets[sample]) * row_bytes <= DEEP_BLOCK_BYTES:
                stop += 1
            bad = self._check_block(array, record, sample, stop)
            if bad is not None:
                self.fail(name, bad[1], sample=bad[0])
                return
            sample = stop

    def _check_block(self, array: zarr.Array, record: ArrayRecord, first: int, stop: int) -> tuple[int, str] | None:
        offsets = self.offsets
        try:
            block = np.ascontiguousarray(array[int(offsets[first]) : int(offsets[stop])])
        except Exception:
            # Decoding failed somewhere in the block: find the first sample that cannot be read.
            for sample in range(first, stop):
                try:
                    rows = np.ascontiguousarray(array[int(offsets[sample]) : int(offsets[sample + 1])])
                except Exception as err:
                    return sample, f"cannot decode ({err})"
                if not self._sample_intact(rows, sample, record):
                    return sample, "checksum mismatch"
            return first, "cannot decode the block"
        self.report.checked_bytes += block.nbytes
        base = int(offsets[first])
        for sample in range(first, stop):
            rows = block[int(offsets[sample]) - base : int(offsets[sample + 1]) - base]
            if not self._sample_intact(rows, sample, record):
                return sample, "checksum mismatch"
        return None

    @staticmethod
    def _sample_intact(rows: np.ndarray, sample: int, record: ArrayRecord) -> bool:
        start = record.sample_crc32[sample - 1] if sample > 0 else 0
        return checksum(rows, start, record.checksum) == record.sample_crc32[sample]


def validate_cache(cache_dir: str | Path, *, deep: bool, progress: bool = False) -> ValidationReport:
    """Check every part of the cache at ``cache_dir``; see the module docstring for what each
    depth covers.  Raises :class:`CacheError` only when there is no readable manifest."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    report = ValidationReport(cache=str(cache_dir), deep=deep, n_parts=len(manifest.parts))
    _check_target_head(cache_dir, manifest, report)
    names = [entry["name"] for entry in manifest.parts]
    if len(set(names)) != len(names):
        report.damage.append(Damage(None, None, "the manifest lists a part name twice"))
    if sum(p["n_samples"] for p in manifest.parts) != manifest.n_samples or sum(p["n_tokens"] for p in manifest.parts) != manifest.n_tokens:
        report.damage.append(Damage(None, None, "the manifest's totals disagree with its parts"))
    first_sample = 0
    last_record: dict[int, int] = {}
    for index in tqdm(range(len(manifest.parts)), desc="validate", unit="part", disable=not progress):
        check = _PartCheck(cache_dir, manifest, index, first_sample, report)
        opened = check.cheap()
        worker = int(manifest.parts[index].get("worker", 0))
        if check.records is not None and len(check.records):
            if check.records[0] <= last_record.get(worker, -1):
                check.fail("record_index", f"records overlap an earlier part of worker {worker}", sample=0)
            last_record[worker] = int(check.records[-1])
        if opened is not None and deep:
            check.deep(*opened)
        first_sample += manifest.parts[index]["n_samples"]
    report.n_samples = manifest.n_samples
    report.n_tokens = manifest.n_tokens
    return report
