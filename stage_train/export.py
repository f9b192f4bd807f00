"""The servable draft: ``config.json`` + ``model.safetensors`` in the layout SGLang and vLLM load.

Tensor names are the SpecForge/EAGLE ones (``fc.weight``, ``midlayer.*``, ``norm.weight``,
``lm_head.weight``, ``d2t``, ``t2d``); the frozen embedding is left out because the serving
engine shares the target's.  ``config.json`` also records the target the draft belongs to and
the aux layers in both serving conventions, so no engine falls back to its default layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from schemas.jsonio import write_json_atomic
from schemas.manifest import TargetIdentity
from stage_train.draft import DraftConfig, Eagle3DraftModel

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXCLUDED = ("embed_tokens.weight",)


def expected_tensors(config: DraftConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor an export must hold, with its shape and dtype."""
    h, ht, i = config.hidden_size, config.target_hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    bf16 = torch.bfloat16
    return {
        "fc.weight": ((h, 3 * ht), bf16),
        "midlayer.input_layernorm.weight": ((h,), bf16),
        "midlayer.hidden_norm.weight": ((h,), bf16),
        "midlayer.post_attention_layernorm.weight": ((h,), bf16),
        "midlayer.self_attn.q_proj.weight": ((q, 2 * h), bf16),
        "midlayer.self_attn.k_proj.weight": ((kv, 2 * h), bf16),
        "midlayer.self_attn.v_proj.weight": ((kv, 2 * h), bf16),
        "midlayer.self_attn.o_proj.weight": ((h, q), bf16),
        "midlayer.mlp.gate_proj.weight": ((i, h), bf16),
        "midlayer.mlp.up_proj.weight": ((i, h), bf16),
        "midlayer.mlp.down_proj.weight": ((h, i), bf16),
        "norm.weight": ((h,), bf16),
        "lm_head.weight": ((config.draft_vocab_size, h), bf16),
        "d2t": ((config.draft_vocab_size,), torch.int64),
        "t2d": ((config.vocab_size,), torch.bool),
    }


def export_draft(draft: Eagle3DraftModel, out_dir: Path, *, target: TargetIdentity, layer_ids: tuple[int, ...], layer_convention: str,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the draft; ``state_dict`` (e.g. gathered from FSDP2 shards) replaces ``draft.state_dict()``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in (draft.state_dict() if state_dict is None else state_dict).items():
        if name in EXCLUDED:
            continue
        tensor = tensor.detach().to("cpu")
        tensors[name] = (tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor).contiguous()
    tmp = out_dir / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / WEIGHTS_FILE)
    config: dict[str, Any] = draft.config.to_hf_dict()
    ids = [int(i) for i in layer_ids]
    # SGLang reads eagle_config's ids and adds 1; vLLM reads the top-level key as input-of-layer
    # ids.  Our ids are output-of-layer, so both engines end up capturing the same tensors.
    config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True}
    config["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in ids]
    config["talon"] = {
        "target": {k: v for k, v in target.to_dict().items() if k != "config"},
        "aux_layer_ids": ids,
        "aux_layer_convention": layer_convention,
    }
    write_json_atomic(out_dir / CONFIG_FILE, config)
    return out_dir


def read_export_config(export_dir: Path) -> dict[str, Any]:
    return json.loads((Path(export_dir) / CONFIG_FILE).read_text())


def load_exported_draft(export_dir: Path, embed_weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> Eagle3DraftModel:
    """Rebuild a draft from an export the way a serving engine does (config + safetensors + the
    target's embedding)."""
    export_dir = Path(export_dir)
    config = DraftConfig.from_hf_dict(read_export_config(export_dir))
    draft = Eagle3DraftModel(config)
    state = load_file(str(export_dir / WEIGHTS_FILE))
    state["embed_tokens.weight"] = embed_weight
    missing, unexpected = draft.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{export_dir / WEIGHTS_FILE}: missing {missing}, unexpected {unexpected}")
    draft.embed_tokens.weight.requires_grad_(False)
    return draft.to(dtype)
