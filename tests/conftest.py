"""Shared fixtures: the real SmolLM2 (converted once), a tiny random Llama that shares its
tokenizer, a small chat file, and a tiny cache extracted from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CONVERSATIONS = [
    {"conversations": [{"from": "human", "value": "What is the capital of France?"},
                       {"from": "gpt", "value": "The capital of France is Paris."}]},
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Name three primary colours."},
                  {"role": "assistant", "content": "Red, yellow and blue."},
                  {"role": "user", "content": "And secondary ones?"},
                  {"role": "assistant", "content": "Green, orange and purple."}]},
    {"conversations": [{"from": "human", "value": "Write a haiku about the sea."},
                       {"from": "gpt", "value": "Grey waves fold and break,\nsalt wind combs the sleeping dunes,\ngulls stitch sky to foam."}]},
    {"messages": [{"role": "user", "content": "Count from one to ten in words."},
                  {"role": "assistant", "content": "one two three four five six seven eight nine ten"}]},
    {"conversations": [{"from": "human", "value": "Translate 'good morning' into German."},
                       {"from": "gpt", "value": "Guten Morgen."}]},
    {"conversations": [{"from": "human", "value": "Only a question, never answered."}]},
    {"messages": [{"role": "user", "content": "Explain recursion in one sentence."},
                  {"role": "assistant", "content": "Recursion is when a function solves a problem by calling itself on smaller pieces of it."}]},
    {"messages": [{"role": "user", "content": "What is 12 times 12?"},
                  {"role": "assistant", "content": "12 times 12 is 144."}]},
    {"conversations": [{"from": "human", "value": "Give me a tip for learning Python."},
                       {"from": "gpt", "value": "Write a small program every day and read other people's code."}]},
    {"messages": [{"role": "user", "content": "Spell 'necessary'."},
                  {"role": "assistant", "content": "N-E-C-E-S-S-A-R-Y."}]},
]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from stage_extract.target import resolve_target

    return Path(resolve_target("smollm2"))


@pytest.fixture(scope="session")
def tiny_target_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A random 8-layer Llama (hidden 64) with SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-target")
    torch.manual_seed(1234)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    # Keep the random target's predictions inside the ids < 2048, so a draft vocab of 4096
    # (frequent assistant tokens padded with the lowest unused ids) covers its argmax.
    with torch.no_grad():
        model.lm_head.weight[2048:] = 0
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(smollm2_dir)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    return path


def extract_config(out: Path, target: Path | str, data: Path | str, **overrides):
    from pipeline.config import ExtractConfig

    values = dict(out=out, target=str(target), data=str(data), max_length=64, top_k=8,
                  batch_tokens=256, part_tokens=120, device="cpu", progress=False)
    values.update(overrides)
    return ExtractConfig(**values)


@pytest.fixture(scope="session")
def tiny_cache(tiny_target_dir, chat_jsonl, tmp_path_factory) -> Path:
    from stage_extract.run import run_extract

    out = tmp_path_factory.mktemp("caches") / "tiny"
    run_extract(extract_config(out, tiny_target_dir, chat_jsonl))
    return out
