"""Preparing a cache directory for a new or resumed extraction.

A rerun of the same command continues where the last one stopped: sealed parts are kept,
an unsealed part (its Zarr group without a seal) is removed and recomputed, and the spec
written by the first run must match the new one exactly.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from schemas.jsonio import read_json, write_json_atomic
from schemas.layout import EXTRACT_SPEC_FILE, MANIFEST_FILE, PARTS_DIR
from schemas.manifest import CacheError, ExtractSpec, PartSeal, read_sealed_parts


@dataclass(frozen=True)
class ResumeState:
    seals: list[PartSeal]
    complete: bool

    @property
    def last_record(self) -> int:
        return self.seals[-1].last_record if self.seals else -1

    @property
    def next_part(self) -> int:
        return len(self.seals)


def prepare_cache_dir(cache_dir: Path, spec: ExtractSpec) -> ResumeState:
    cache_dir = Path(cache_dir)
    spec_path = cache_dir / EXTRACT_SPEC_FILE
    if spec_path.is_file():
        existing = ExtractSpec.from_dict(read_json(spec_path))
        diffs = existing.differences(spec)
        if diffs:
            raise CacheError(
                f"{cache_dir} already holds an extraction with other settings; use another --out, or the "
                "same settings to resume it. Differences:\n  " + "\n  ".join(diffs)
            )
    else:
        if cache_dir.exists() and any(cache_dir.iterdir()):
            raise CacheError(f"{cache_dir} exists and is not a Talon cache; refusing to write into it")
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(spec_path, spec.to_dict())
    seals = read_sealed_parts(cache_dir)
    sealed_names = {seal.name for seal in seals}
    for group in Path(cache_dir, PARTS_DIR).glob("part-*.zarr"):
        if group.name.removesuffix(".zarr") not in sealed_names:
            shutil.rmtree(group)  # a killed run's half-written part; it is recomputed
    return ResumeState(seals=seals, complete=(cache_dir / MANIFEST_FILE).is_file())
