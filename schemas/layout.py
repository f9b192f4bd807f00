"""The on-disk layout of a Talon feature cache: array names, dtypes and file names.

A cache extracted by one worker is a directory::

    CACHE/
      extract.json                 run spec (settings + target identity), written first
      target_head.safetensors      the target's input embedding (plus final norm + LM head when the
                                   cache stores final hidden states), written once, atomically
      parts/part-000000.zarr/      one Zarr v3 group per sealed part of consecutive samples
      parts/part-000000.json       the part's seal: counts, record range, checksums (written after the group)
      worker.json                  the worker's completion record (every part sealed)
      manifest.json                the cache manifest, written last and atomically

With ``N > 1`` workers (``--num-shards N``), worker ``I`` owns the records with
``record_index % N == I`` and writes its ``extract.json``, ``parts/`` and ``worker.json`` under
``CACHE/workers/worker-I-of-N/`` instead of the cache root; the cache-level ``extract.json``,
``target_head.safetensors`` and ``manifest.json`` stay at the root.  The single-worker cache is
the ``N = 1`` case of the same rule (its worker directory *is* the root), so one code path reads
and writes both.  The manifest lists every part with its path relative to the cache root, workers
in index order and parts in index order within a worker: that is the global sample order.

Every per-token array is token-major and unpadded: sample ``i`` of a part owns rows
``sample_offsets[i]:sample_offsets[i+1]``.  Zarr v3 has no bfloat16, so bf16 tensors are stored
as their uint16 bit patterns and :data:`ArraySpec.logical_dtype` records what they mean.  With
``feature_dtype="fp8"`` the aux states are float8 e4m3fn bit patterns (uint8) with one float32
scale per token and aux layer (``aux_scale``, ``x = fp8 * scale``, ``scale = amax / 448``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Version 2 added fp8 aux states, the final-hidden teacher, multi-worker caches (parts with
# paths) and per-sample checksums.  Version 3 checksums parts with CRC32C instead of zlib's CRC-32
# (a Talon that reads only 1 and 2 would take every new checksum for damage, so it refuses
# version 3 instead); a version 2 cache resumed by this version stays version 2, zlib's CRC-32
# included.  Version 1 caches (bf16, top-k, parts/ only) are still read.
SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)

EXTRACT_SPEC_FILE = "extract.json"
MANIFEST_FILE = "manifest.json"
WORKER_FILE = "worker.json"
TARGET_HEAD_FILE = "target_head.safetensors"
PARTS_DIR = "parts"
WORKERS_DIR = "workers"

LAYER_CONVENTION = "output-of-decoder-layer, 0-based (equals HF output_hidden_states[i + 1])"
FINAL_HIDDEN_CONVENTION = "input of the final RMSNorm (pre-norm output of the last decoder layer)"

FEATURE_DTYPES = ("bf16", "fp8")
TEACHERS = ("topk", "final-hidden", "both")
# Compression of the feature planes (aux_hidden, final_hidden); the other arrays always use zstd.
# Each array's zarr.json names its codec, so readers need no setting.  "auto" is lz4 for bf16
# aux states (about twice zstd's speed for ~5 % more bytes) and zstd for fp8 codes (lz4 gains
# nothing on them); see BENCHMARKS.md "Part writer".  "blosc-zstd" is what caches written before
# the option existed use (an extract.json without the field means it).
AUX_COMPRESSIONS = ("auto", "lz4", "zstd", "none", "blosc-zstd")
DEFAULT_AUX_COMPRESSION = "auto"
LEGACY_AUX_COMPRESSION = "blosc-zstd"
# How the HF backend lays samples out for the target's forward.  "packed" concatenates a batch's
# samples into one row with per-sample positions and attention (no padding, no cross-sample
# attention); "padded" right-pads length-sorted samples to the batch's longest.  Both compute the
# same features up to kernel rounding; the choice is recorded so that a resumed cache keeps the
# numerics it was started with ("auto": the cache's own, else packed).  An extract.json without
# the field was written padded.
BATCHINGS = ("auto", "packed", "padded")
DEFAULT_BATCHING = "packed"
LEGACY_BATCHING = "padded"
N_AUX_LAYERS = 3
FP8_MAX = 448.0  # largest finite float8 e4m3fn value


@dataclass(frozen=True)
class ArraySpec:
    """One array inside a part: its storage dtype, what the bits mean, and its row width."""

    name: str
    storage_dtype: str
    logical_dtype: str
    per_token: bool
    description: str


def part_name(index: int) -> str:
    return f"part-{index:06d}"


def worker_name(index: int, count: int) -> str:
    return f"worker-{index}-of-{count}"


def worker_dir_relpath(index: int, count: int) -> str:
    """Where worker ``index`` of ``count`` writes, relative to the cache root ("" for one worker)."""
    return "" if count == 1 else f"{WORKERS_DIR}/{worker_name(index, count)}"


def token_id_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every token id of the vocab."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def resolve_aux_compression(aux_compression: str, feature_dtype: str) -> str:
    """The concrete codec name ``aux_compression`` stands for with this feature dtype."""
    if aux_compression not in AUX_COMPRESSIONS:
        raise ValueError(f"aux compression {aux_compression!r} is not one of {', '.join(AUX_COMPRESSIONS)}")
    if aux_compression == "auto":
        return "lz4" if feature_dtype == "bf16" else "zstd"
    return aux_compression


def resolve_batching(batching: str) -> str:
    """The concrete batching ``batching`` stands for in a new cache (resuming one, ``auto`` keeps
    the cache's own: :func:`stage_extract.cache_dir.resumed_settings`)."""
    if batching not in BATCHINGS:
        raise ValueError(f"batching {batching!r} is not one of {', '.join(BATCHINGS)}")
    return DEFAULT_BATCHING if batching == "auto" else batching


def has_topk(teacher: str) -> bool:
    return teacher in ("topk", "both")


def has_final_hidden(teacher: str) -> bool:
    return teacher in ("final-hidden", "both")


def check_feature_settings(feature_dtype: str, teacher: str) -> None:
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype {feature_dtype!r} is not one of {', '.join(FEATURE_DTYPES)}")
    if teacher not in TEACHERS:
        raise ValueError(f"teacher {teacher!r} is not one of {', '.join(TEACHERS)}")


def array_specs(vocab_size: int, feature_dtype: str = "bf16", teacher: str = "topk") -> tuple[ArraySpec, ...]:
    """The arrays of every part of a cache with these settings, in write order."""
    check_feature_settings(feature_dtype, teacher)
    ids = token_id_dtype(vocab_size)
    specs = [
        ArraySpec("input_ids", ids, ids, True, "token ids of the rendered conversation"),
        ArraySpec("loss_mask", "uint8", "bool", True, "1 on assistant tokens (prefix-diff of the chat template)"),
    ]
    if feature_dtype == "bf16":
        specs.append(ArraySpec("aux_hidden", "uint16", "bfloat16", True, "outputs of the 3 aux layers, concatenated low|mid|high"))
    else:
        specs.append(ArraySpec("aux_hidden", "uint8", "float8_e4m3fn", True, "outputs of the 3 aux layers, low|mid|high, fp8 e4m3fn divided by aux_scale"))
        specs.append(ArraySpec("aux_scale", "float32", "float32", True, "per-token, per-aux-layer fp8 scale (amax / 448)"))
    if has_topk(teacher):
        specs.append(ArraySpec("topk_ids", ids, ids, True, "the target's top-k next-token ids at each position"))
        specs.append(ArraySpec("topk_logprobs", "float32", "float32", True, "their log-probs, normalised over the full vocab"))
    if has_final_hidden(teacher):
        specs.append(ArraySpec("final_hidden", "uint16", "bfloat16", True, FINAL_HIDDEN_CONVENTION))
    specs.append(ArraySpec("sample_offsets", "int64", "int64", False, "row offsets of the samples, length n_samples + 1"))
    specs.append(ArraySpec("record_index", "int64", "int64", False, "index of each sample's record in the source data"))
    return tuple(specs)


def row_widths(hidden_size: int, top_k: int, feature_dtype: str = "bf16", teacher: str = "topk") -> dict[str, int]:
    """Elements per token row of each per-token array (1 for the 1-D ones)."""
    widths = {"input_ids": 1, "loss_mask": 1, "aux_hidden": N_AUX_LAYERS * hidden_size}
    if feature_dtype == "fp8":
        widths["aux_scale"] = N_AUX_LAYERS
    if has_topk(teacher):
        widths["topk_ids"] = top_k
        widths["topk_logprobs"] = top_k
    if has_final_hidden(teacher):
        widths["final_hidden"] = hidden_size
    return widths


def raw_bytes_per_token(
    hidden_size: int, vocab_size: int, top_k: int, feature_dtype: str = "bf16", teacher: str = "topk"
) -> dict[str, int]:
    """Uncompressed bytes per token of each per-token array: the upper bound a store reaches
    when its codecs gain nothing (real bf16 hidden states compress by only ~1.2-1.3x)."""
    import numpy as np

    widths = row_widths(hidden_size, top_k, feature_dtype, teacher)
    sizes = {spec.name: np.dtype(spec.storage_dtype).itemsize for spec in array_specs(vocab_size, feature_dtype, teacher)}
    return {name: widths[name] * sizes[name] for name in widths}
