"""`talon estimate`: bytes per token and the projected cache size, before anything runs.

Nothing heavy is loaded: the target's shape comes from its ``config.json`` (or flags), the token
count from tokenising the first records with the target's chat template and extrapolating over
the record count of the source (every record is parsed, none is run through a model).  Sizes
are given twice: *raw* (uncompressed, an upper bound the store never exceeds by more than its
few metadata bytes) and *expected* (raw divided by the compression ratios measured on real
SmolLM2/ShareGPT caches, :data:`TYPICAL_COMPRESSION` and :data:`FEATURE_COMPRESSION` (by
``--aux-compression``); random or synthetic features compress less).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from schemas.layout import DEFAULT_AUX_COMPRESSION, check_feature_settings, has_final_hidden, raw_bytes_per_token, resolve_aux_compression

# raw / stored, measured with bench/fp8_error.py on SmolLM2 features of 27 ShareGPT chats
# (12,860 tokens, top-64; zarr 3.1.6 with the codecs of schemas.store).  Random-weight features
# compress less (bf16 aux states of a random 8B-shaped model: ~1.28x, fp8: ~1.22x with
# blosc-zstd, in bench/cache_density.py).  The feature planes are in FEATURE_COMPRESSION.
TYPICAL_COMPRESSION = {
    ("aux_scale", "fp8"): 1.16,
    ("topk_ids", "bf16"): 1.14,
    ("topk_logprobs", "bf16"): 1.17,
    ("input_ids", "bf16"): 1.57,
    ("loss_mask", "bf16"): 8.0,
}
# The feature planes (aux_hidden, final_hidden) by --aux-compression: measured on the inner
# chunks of 6,360 tokens of real SmolLM2 aux states over ShareGPT (lz4 gains nothing on fp8 codes).
FEATURE_COMPRESSION = {
    ("blosc-zstd", "bf16"): 1.23, ("blosc-zstd", "fp8"): 1.17,
    ("zstd", "bf16"): 1.23, ("zstd", "fp8"): 1.17,
    ("lz4", "bf16"): 1.18, ("lz4", "fp8"): 1.0,
    ("none", "bf16"): 1.0, ("none", "fp8"): 1.0,
}


@dataclass(frozen=True)
class TargetShape:
    hidden_size: int
    vocab_size: int
    num_hidden_layers: int | None = None
    source: str = "flags"


def target_shape(target: str | None, hidden_size: int | None, vocab_size: int | None) -> TargetShape:
    """The target's shape from its config.json (flags override; with both flags no target is read)."""
    if hidden_size is not None and vocab_size is not None:
        return TargetShape(hidden_size, vocab_size)
    if target is None:
        raise ValueError("give --target, or both --hidden-size and --vocab-size")
    from stage_extract.target import resolve_target

    path = Path(resolve_target(target)) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --target must be 'smollm2' or a local HF folder")
    config = json.loads(path.read_text())
    return TargetShape(
        hidden_size=int(hidden_size or config["hidden_size"]),
        vocab_size=int(vocab_size or config["vocab_size"]),
        num_hidden_layers=config.get("num_hidden_layers"),
        source=str(path.parent),
    )


@dataclass
class TokenEstimate:
    records: int  # usable records the extraction would consume
    sampled: int  # records tokenised
    mean_tokens: float  # tokens per kept sample
    kept_fraction: float  # of sampled records, those with an assistant token after truncation
    tokens: int  # projected total tokens


def estimate_tokens(data: str, tokenizer_source: str, *, max_length: int, max_samples: int | None, sample_records: int) -> TokenEstimate:
    from transformers import AutoTokenizer

    from stage_extract.chat import tokenize_conversation
    from stage_extract.records import iter_chat_records
    from stage_extract.target import resolve_target

    tokenizer = AutoTokenizer.from_pretrained(resolve_target(tokenizer_source))
    lengths, kept, sampled, records = [], 0, 0, 0
    for record in iter_chat_records(data, skip_bad_records=True, limit=max_samples):
        records += 1
        if sampled < sample_records:
            sampled += 1
            tokens = tokenize_conversation(tokenizer, record.messages, max_length=max_length)
            if tokens is not None:
                kept += 1
                lengths.append(len(tokens.input_ids))
    mean = float(np.mean(lengths)) if lengths else 0.0
    fraction = kept / sampled if sampled else 0.0
    return TokenEstimate(records, sampled, round(mean, 1), round(fraction, 4), int(round(records * fraction * mean)))


def estimate_cache(
    shape: TargetShape,
    *,
    top_k: int,
    feature_dtype: str,
    teacher: str,
    tokens: TokenEstimate | None,
    tokens_override: int | None = None,
    aux_compression: str = DEFAULT_AUX_COMPRESSION,
) -> dict:
    """Per-array bytes per token (raw and expected) and the projected totals."""
    check_feature_settings(feature_dtype, teacher)
    codec = resolve_aux_compression(aux_compression, feature_dtype)
    raw = raw_bytes_per_token(shape.hidden_size, shape.vocab_size, top_k, feature_dtype, teacher)
    expected = {}
    for name, size in raw.items():
        if name in ("aux_hidden", "final_hidden"):  # final_hidden is bf16 bits whatever the aux dtype
            ratio = FEATURE_COMPRESSION[(codec, feature_dtype if name == "aux_hidden" else "bf16")]
        else:
            ratio = TYPICAL_COMPRESSION.get((name, feature_dtype)) or TYPICAL_COMPRESSION.get((name, "bf16"), 1.0)
        expected[name] = size / ratio
    total_tokens = tokens_override if tokens_override is not None else (tokens.tokens if tokens else 0)
    head_bytes = shape.vocab_size * shape.hidden_size * 2  # embed_tokens (bf16 when extracted on GPU)
    if has_final_hidden(teacher):
        head_bytes += shape.vocab_size * shape.hidden_size * 2 + shape.hidden_size * 4
    raw_total, expected_total = sum(raw.values()), sum(expected.values())
    return {
        "target": asdict(shape),
        "settings": {"top_k": top_k, "feature_dtype": feature_dtype, "teacher": teacher, "aux_compression": codec},
        "tokens": asdict(tokens) if tokens else None,
        "projected_tokens": total_tokens,
        "arrays": {name: {"raw_bytes_per_token": raw[name], "expected_bytes_per_token": round(expected[name], 1)} for name in raw},
        "raw_bytes_per_token": raw_total,
        "expected_bytes_per_token": round(expected_total, 1),
        "raw_kib_per_token": round(raw_total / 1024, 2),
        "expected_kib_per_token": round(expected_total / 1024, 2),
        "target_head_bytes": head_bytes,
        "projected_raw_bytes": int(raw_total * total_tokens + head_bytes),
        "projected_expected_bytes": int(expected_total * total_tokens + head_bytes),
    }
