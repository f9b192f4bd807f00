"""`talon train`: fit the EAGLE-3 draft from a feature cache, never running the target."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import LlamaConfig

from pipeline.config import TrainConfig, config_to_dict
from pipeline.runtime import resolve_device
from schemas.jsonio import write_json_atomic
from schemas.layout import TARGET_HEAD_FILE
from schemas.manifest import CacheError, CacheManifest, read_manifest, require_same_target
from schemas.store import CacheReader
from stage_train.core import Eagle3TrainerModule, TopKLogProbs, _shift_left_with_zero
from stage_train.data import BatchPlan, FeatureBatch, load_batch, prefetch
from stage_train.draft import DraftConfig, Eagle3DraftModel
from stage_train.export import export_draft
from stage_train.metrics import JsonlWriter, MetricWindow
from stage_train.schedule import warmup_cosine
from stage_train.vocab import select_draft_vocab


def check_target(manifest: CacheManifest, cache: Path, target: str) -> None:
    """Refuse a cache that was not extracted from ``target`` (naming the differing fields)."""
    from stage_extract.target import load_target, target_identity

    tokenizer, model = load_target(target, device=torch.device("cpu"), dtype=torch.float32)
    require_same_target(manifest.target, target_identity(target, model, tokenizer), where=f"cache {cache}")


def build_draft(manifest: CacheManifest, cache: Path, draft_vocab: int) -> tuple[Eagle3DraftModel, float]:
    target_config = LlamaConfig(**manifest.target.config)
    vocab_size = int(target_config.vocab_size)
    vocab = select_draft_vocab(manifest.assistant_token_counts, vocab_size, min(draft_vocab, vocab_size))
    draft = Eagle3DraftModel(DraftConfig.from_target_config(target_config, len(vocab.selected_token_ids)))
    draft.set_vocab_mapping(vocab.selected_token_ids)
    head_path = Path(cache) / TARGET_HEAD_FILE
    if not head_path.is_file():
        raise CacheError(f"{head_path} is missing: the cache has no copy of the target's embedding")
    draft.load_target_embeddings(load_file(str(head_path))["embed_tokens.weight"].float())
    return draft, vocab.coverage


def shifted_inputs(batch: FeatureBatch, device: torch.device) -> dict:
    """The seed's conventions: ids, loss mask and teacher shifted left by one; aux unshifted."""
    aux = batch.aux_hidden_states if device.type == "cuda" else batch.aux_hidden_states.float()
    return {
        "input_ids": _shift_left_with_zero(batch.input_ids),
        "attention_mask": batch.attention_mask,
        "loss_mask": _shift_left_with_zero(batch.loss_mask),
        "aux_hidden_states": aux,
        "target_logits": TopKLogProbs(
            token_ids=_shift_left_with_zero(batch.topk_ids), logprobs=_shift_left_with_zero(batch.topk_logprobs)
        ),
    }


def run_train(cfg: TrainConfig) -> dict:
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    manifest = read_manifest(cfg.cache)
    if cfg.target is not None:
        check_target(manifest, Path(cfg.cache), cfg.target)
    reader = CacheReader(cfg.cache, manifest)
    draft, coverage = build_draft(manifest, Path(cfg.cache), cfg.draft_vocab)
    module = Eagle3TrainerModule(
        draft,
        selected_token_ids=draft.d2t + torch.arange(draft.config.draft_vocab_size),
        selected_token_mask=draft.t2d,
        ttt_steps=cfg.ttt_steps,
    ).to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

    plan = BatchPlan(reader.lengths, cfg.batch_tokens, cfg.seed, cfg.max_length)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * plan.batches_per_epoch()))
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup, cfg.min_lr_ratio)
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", {"train": config_to_dict(cfg), "cache_target": manifest.target.source})
    (out / "metrics.jsonl").unlink(missing_ok=True)
    log = JsonlWriter(out / "metrics.jsonl")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    batches = prefetch((load_batch(reader, samples, cfg.max_length) for _, samples in plan.stream()), depth=4)

    window, first, last = MetricWindow(), None, None
    started = window_started = time.perf_counter()
    tokens_total = 0
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    module.train()
    try:
        for step in range(total_steps):
            batch = next(batches).to(device)
            with autocast:
                metrics = module(**shifted_inputs(batch, device))
            optimizer.zero_grad(set_to_none=True)
            metrics.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            window.add(metrics, batch.n_tokens)
            tokens_total += batch.n_tokens
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
                now = time.perf_counter()
                record = {"step": step + 1, "lr": scheduler.get_last_lr()[0], **window.summary()}
                record["tokens_per_second"] = round(window.tokens / max(now - window_started, 1e-9), 1)
                log.write(record)
                first = first or record
                last = record
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc0=f"{record['step_accuracy'][0]:.3f}")
                window.reset()
                window_started = now
    finally:
        bar.close()
        log.close()
    seconds = time.perf_counter() - started
    export_dir = export_draft(
        module.draft_model.to("cpu"), out / "export", target=manifest.target,
        layer_ids=manifest.settings.layer_ids, layer_convention=manifest.layer_convention,
    )
    summary = {
        "run": str(out),
        "export": str(export_dir),
        "steps": total_steps,
        "ttt_steps": cfg.ttt_steps,
        "draft_vocab": draft.config.draft_vocab_size,
        "draft_vocab_coverage": round(coverage, 4),
        "first": first,
        "final": last,
        "tokens": tokens_total,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens_total / max(seconds, 1e-9), 1),
        "device": str(device),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary
