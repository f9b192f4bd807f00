"""A description of a cache for `talon inspect`, read from its manifest and seals only."""

from __future__ import annotations

from pathlib import Path

from schemas.layout import TARGET_HEAD_FILE
from schemas.manifest import part_seal_path, read_manifest, read_seal


def describe_cache(cache: Path) -> dict:
    manifest = read_manifest(cache)
    seals = [read_seal(part_seal_path(cache, entry)) for entry in manifest.parts]
    tokens = max(manifest.n_tokens, 1)
    per_array: dict[str, int] = {}
    for seal in seals:
        for name, record in seal.arrays.items():
            per_array[name] = per_array.get(name, 0) + record.stored_bytes
    head = Path(cache) / TARGET_HEAD_FILE
    return {
        "cache": str(cache),
        "schema_version": manifest.schema_version,
        "target": {k: v for k, v in manifest.target.to_dict().items() if k != "config"},
        "layer_ids": list(manifest.settings.layer_ids),
        "layer_convention": manifest.layer_convention,
        "top_k": manifest.settings.top_k,
        "max_length": manifest.settings.max_length,
        "feature_dtype": manifest.settings.feature_dtype,
        "teacher": manifest.settings.teacher,
        "aux_compression": manifest.settings.aux_compression,
        "workers": manifest.settings.num_shards,
        "settings": manifest.settings.to_dict(),
        "samples": manifest.n_samples,
        "tokens": manifest.n_tokens,
        "assistant_tokens": manifest.n_assistant_tokens,
        "stored_bytes": manifest.stored_bytes,
        "bytes_per_token": manifest.bytes_per_token,
        "target_head_bytes": head.stat().st_size if head.is_file() else 0,
        "arrays": {
            name: {**dtypes, "stored_bytes": per_array.get(name, 0), "bytes_per_token": per_array.get(name, 0) / tokens}
            for name, dtypes in manifest.arrays.items()
        },
        "source_stats": manifest.source_stats,
        "dropped": manifest.dropped,
        "nonfinite_records": list(manifest.nonfinite_records),
        "parts": list(manifest.parts),
    }
