"""`talon validate`, `talon merge` and `talon estimate`: commands about a cache as a whole.

Registered by the CLI as ``app.command("validate")(validate_command)`` and so on; each prints
text, or one JSON object with ``--json``, and exits 2 with ``error: ...`` on stderr when it
cannot do its job (``validate`` also exits 1 when it finds damage).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli_common import JsonFlag, emit, fail







def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def validate_command(
    cache: Annotated[Path, typer.Argument(help="Feature cache directory.")],
    quick: Annotated[bool, typer.Option("--quick", help="Only the cheap checks training runs on open (seals, shapes, dtypes, offsets, sizes); skip decoding and checksums.")] = False,
    as_json: JsonFlag = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Check every part against its seal and the manifest (counts, offsets, shapes, dtypes, sizes,
    and the CRC32C checksums, zlib CRC-32 in caches before schema 3, recorded at write time) and name
    the part, array and sample of any damage.  Exits 1 when damage is found."""
    from schemas.manifest import CacheError
    from schemas.validate import validate_cache

    try:
        report = validate_cache(cache, deep=not quick, progress=progress and sys.stderr.isatty())
    except (CacheError, ValueError, OSError) as err:
        fail(err)
    summary = report.to_dict()
    lines = [
        f"cache: {report.cache}  ({'deep' if report.deep else 'quick'} check)",
        f"parts: {report.n_parts}  samples: {report.n_samples}  tokens: {report.n_tokens}  decoded: {_human_bytes(report.checked_bytes)}",
    ]
    if report.ok:
        lines.append("ok: no damage found")
    else:
        lines.append(f"DAMAGED: {len(report.damage)} problem(s) in parts {', '.join(report.damaged_parts) or '(cache-level)'}")
        lines += [f"  {d.describe()}" for d in report.damage]
        if report.damaged_parts:
            lines.append(f"train on the rest with: --skip-parts {','.join(report.damaged_parts)}")
    emit(summary, as_json, lines)
    if not report.ok:
        raise typer.Exit(code=1)


def merge_command(
    cache: Annotated[Path, typer.Argument(help="Feature cache directory written by `talon extract --num-shards N` workers.")],
    as_json: JsonFlag = False,
) -> None:
    """Write the cache manifest over the parts of all workers once each has finished (the last
    worker to finish does this itself; run it by hand if that worker died after its last seal)."""
    from schemas.manifest import CacheError
    from stage_extract.workers import merge_cache

    try:
        manifest = merge_cache(cache, require_complete=True)
    except (CacheError, ValueError, OSError) as err:
        fail(err)
    assert manifest is not None
    summary = {
        "cache": str(cache),
        "workers": manifest.settings.num_shards,
        "parts": len(manifest.parts),
        "samples": manifest.n_samples,
        "tokens": manifest.n_tokens,
        "stored_bytes": manifest.stored_bytes,
        "bytes_per_token": round(manifest.bytes_per_token, 1),
    }
    emit(summary, as_json, [
        f"merged {summary['workers']} worker(s) into {cache}/manifest.json",
        f"parts: {summary['parts']}  samples: {summary['samples']}  tokens: {summary['tokens']}  "
        f"bytes/token: {summary['bytes_per_token']}",
    ])


def estimate_command(
    target: Annotated[Optional[str], typer.Option(help="Target whose config.json gives hidden size and vocab, and whose tokenizer counts tokens: 'smollm2' or a local HF folder.")] = "smollm2",
    data: Annotated[Optional[str], typer.Option(help="Chat data to count tokens in ('sharegpt' or a .jsonl/.json file); omit to report bytes per token only.")] = None,
    hidden_size: Annotated[Optional[int], typer.Option(help="Target hidden size (overrides the target's config).")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Target vocab size (overrides the target's config).")] = None,
    top_k: Annotated[int, typer.Option(help="Top-k log-probs kept per position (as `talon extract --top-k`).")] = 64,
    feature_dtype: Annotated[str, typer.Option(help="Aux-state storage: bf16 or fp8 (as `talon extract --feature-dtype`).")] = "bf16",
    teacher: Annotated[str, typer.Option(help="Teacher planes: topk, final-hidden or both (as `talon extract --teacher`).")] = "topk",
    aux_compression: Annotated[str, typer.Option(help="Codec of the feature planes: auto, lz4, zstd, none or blosc-zstd (as `talon extract --aux-compression`).")] = "auto",
    max_length: Annotated[int, typer.Option(help="Truncation length used when counting tokens (as `talon extract --max-length`).")] = 2048,
    max_samples: Annotated[Optional[int], typer.Option(help="Count only the first N usable conversations (as `talon extract --max-samples`).")] = None,
    sample_records: Annotated[int, typer.Option(help="Tokenise this many records and extrapolate their mean length to the rest.")] = 200,
    tokens: Annotated[Optional[int], typer.Option(help="Project for this many tokens instead of counting them in --data.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Print bytes per token of each cache array and the projected cache size for the given
    target, data and settings, before anything is extracted."""
    from stage_extract.estimate import estimate_cache, estimate_tokens, target_shape

    try:
        shape = target_shape(target, hidden_size, vocab_size)
        counted = None
        if data is not None and tokens is None:
            if target is None:
                raise ValueError("--data needs --target for its tokenizer and chat template")
            counted = estimate_tokens(data, target, max_length=max_length, max_samples=max_samples, sample_records=sample_records)
        result = estimate_cache(shape, top_k=top_k, feature_dtype=feature_dtype, teacher=teacher, tokens=counted,
                                tokens_override=tokens, aux_compression=aux_compression)
    except (ValueError, FileNotFoundError, OSError) as err:
        fail(err)
    lines = [
        f"target: hidden {shape.hidden_size}, vocab {shape.vocab_size} ({shape.source})",
        f"settings: top-k {top_k}, feature dtype {feature_dtype}, teacher {teacher}, "
        f"aux compression {result['settings']['aux_compression']}",
    ]
    lines += [
        f"  {name:14s} {a['raw_bytes_per_token']:>8,d} B/token raw  ~{a['expected_bytes_per_token']:>10,.1f} expected"
        for name, a in result["arrays"].items()
    ]
    lines.append(
        f"per token: {result['raw_bytes_per_token']:,} B raw ({result['raw_kib_per_token']} KiB), "
        f"~{result['expected_bytes_per_token']:,} B expected ({result['expected_kib_per_token']} KiB)"
    )
    if counted is not None:
        lines.append(
            f"data: {counted.records:,} records, {counted.kept_fraction:.1%} usable of {counted.sampled} sampled, "
            f"{counted.mean_tokens:,.0f} tokens each"
        )
    if result["projected_tokens"]:
        lines.append(
            f"projected: {result['projected_tokens']:,} tokens -> {_human_bytes(result['projected_raw_bytes'])} raw, "
            f"~{_human_bytes(result['projected_expected_bytes'])} expected (target head {_human_bytes(result['target_head_bytes'])} included)"
        )
    emit(result, as_json, lines)
