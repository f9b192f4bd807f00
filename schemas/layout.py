"""The on-disk layout of a Talon feature cache: array names, dtypes and file names.

A cache is a directory::

    CACHE/
      extract.json                 run spec (settings + target identity), written first
      target_head.safetensors      the target's input embedding (the draft copies and freezes it)
      parts/part-000000.zarr/      one Zarr v3 group per sealed part of consecutive samples
      parts/part-000000.json       the part's seal: counts, record range, checksums (written after the group)
      manifest.json                the cache manifest, written last and atomically

Every per-token array is token-major and unpadded: sample ``i`` of a part owns rows
``sample_offsets[i]:sample_offsets[i+1]``.  Zarr v3 has no bfloat16, so bf16 tensors are stored
as their uint16 bit patterns and :data:`ArraySpec.logical_dtype` records what they mean.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1

EXTRACT_SPEC_FILE = "extract.json"
MANIFEST_FILE = "manifest.json"
TARGET_HEAD_FILE = "target_head.safetensors"
PARTS_DIR = "parts"

LAYER_CONVENTION = "output-of-decoder-layer, 0-based (equals HF output_hidden_states[i + 1])"


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


def token_id_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every token id of the vocab."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def array_specs(vocab_size: int) -> tuple[ArraySpec, ...]:
    ids = token_id_dtype(vocab_size)
    return (
        ArraySpec("input_ids", ids, ids, True, "token ids of the rendered conversation"),
        ArraySpec("loss_mask", "uint8", "bool", True, "1 on assistant tokens (prefix-diff of the chat template)"),
        ArraySpec("aux_hidden", "uint16", "bfloat16", True, "outputs of the 3 aux layers, concatenated low|mid|high"),
        ArraySpec("topk_ids", ids, ids, True, "the target's top-k next-token ids at each position"),
        ArraySpec("topk_logprobs", "float32", "float32", True, "their log-probs, normalised over the full vocab"),
        ArraySpec("sample_offsets", "int64", "int64", False, "row offsets of the samples, length n_samples + 1"),
        ArraySpec("record_index", "int64", "int64", False, "index of each sample's record in the source data"),
    )
