"""`talon train`: fit the EAGLE-3 draft from a feature cache, never running the target.

One code path for 1 and N processes (see :class:`pipeline.runtime.Runtime`): each rank reads a
disjoint share of every window of batches, gradients are averaged by DDP (or sharded by FSDP2),
metrics are all-reduced, and only rank 0 writes logs, checkpoints and the export.
"""

from __future__ import annotations

import math
import time
from functools import partial
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import LlamaConfig

from pipeline.config import ConfigError, TrainConfig, config_to_dict, train_config_from_dict
from pipeline.runtime import Runtime
from schemas.jsonio import read_json, write_json_atomic
from schemas.layout import TARGET_HEAD_FILE
from schemas.manifest import CacheError, CacheManifest, read_manifest, require_same_target
from schemas.store import CacheReader
from schemas.validate import validate_cache
from stage_train.checkpoint import (full_model_state, full_optimizer_state, load_latest_checkpoint, load_optimizer_state,
                                    restore_rng, rng_state, save_checkpoint)
from stage_train.core import Eagle3TrainerModule, TopKLogProbs, _shift_left_with_zero
from pipeline.prefetch import prefetch
from stage_train.data import (BatchPlan, FeatureBatch, fields_for_teacher, iterate_batches, iterate_random_access,
                              load_batch)
from stage_train.draft import FLEX_MIN_HEAD_DIM, DraftConfig, Eagle3DraftModel
from stage_train.export import export_draft
from stage_train.metrics import MetricSink, MetricWindow
from stage_train.schedule import warmup_cosine
from stage_train.teacher import TargetHead, final_hidden_teacher
from stage_train.vocab import select_draft_vocab

RUN_CONFIG = "config.json"


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN/Inf loss or gradient and the run was not told to skip it."""


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


def split_samples(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, stable train/validation split of the cache's samples."""
    n_val = 0 if val_fraction == 0 else min(n - 1, max(1, round(val_fraction * n)))
    order = np.random.default_rng([seed, 7919]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def resolve_attention(requested: str, device: torch.device, head_dim: int) -> str:
    """``auto`` uses the compiled flex kernel on CUDA and the eager kernel elsewhere, or where the
    draft's heads are narrower than the CUDA kernel supports (tiny test models)."""
    flex_fits = head_dim >= FLEX_MIN_HEAD_DIM
    if requested == "auto":
        return "flex" if device.type == "cuda" and flex_fits else "eager"
    if requested == "flex" and device.type == "cuda" and not flex_fits:
        raise ConfigError(f"--attention flex needs head_dim >= {FLEX_MIN_HEAD_DIM} on CUDA (the draft has {head_dim}); "
                          "use --attention eager or auto")
    return requested


def resolve_teacher(requested: str, fields: tuple[str, ...]) -> str:
    """``auto`` trains from the exact final-hidden teacher when the cache has it, else top-k."""
    if requested != "auto":
        return requested
    return "final-hidden" if "final_hidden" in fields else "topk"


def shifted_inputs(batch: FeatureBatch, device: torch.device, teacher=None) -> dict:
    """The seed's conventions: ids, loss mask and teacher shifted left by one; aux unshifted.

    ``teacher`` (a callable of the final hidden states) recomputes the exact draft-vocab teacher
    when the batch carries final hidden states instead of top-k log-probs."""
    aux = batch.aux_states()  # raw fp8 batches are decoded here, on the device they were moved to
    aux = aux if device.type == "cuda" else aux.float()
    if batch.final_hidden is not None and teacher is not None:
        target = teacher(batch.final_hidden)
    else:
        target = TopKLogProbs(token_ids=batch.topk_ids, logprobs=batch.topk_logprobs)
    return {
        "input_ids": _shift_left_with_zero(batch.input_ids),
        "attention_mask": batch.attention_mask,
        "loss_mask": _shift_left_with_zero(batch.loss_mask),
        "aux_hidden_states": aux,
        "target_logits": _shift_left_with_zero(target),
    }


def resolve_resume(run_dir: Path, overrides: dict) -> TrainConfig:
    """The config of an existing run, with the given overrides (e.g. a larger --max-steps)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"cannot resume {run_dir}: it has no {RUN_CONFIG}")
    saved = read_json(path)["train"]
    saved.update(overrides)
    saved["out"] = str(run_dir)
    return train_config_from_dict(saved, where=str(path))


@torch.no_grad()
def evaluate(module: Eagle3TrainerModule, reader, plan: BatchPlan, runtime: Runtime, autocast, max_length, names, teacher,
             *, collective: bool = False) -> dict:
    """Per-step accuracy and simulated acceptance length over the held-out samples.

    Every held-out batch is counted once, on one rank.  ``collective`` (FSDP-sharded modules,
    whose forward all-gathers parameters) makes ranks with fewer batches run uncounted padding
    forwards until they have run as many as the busiest rank, so the collectives pair up.
    """
    window = MetricWindow(module.ttt_steps, runtime.device)
    module.eval()
    pin = runtime.device.type == "cuda"
    forwards = 0
    last = None
    for batch in prefetch(iterate_random_access(reader, plan, max_length, names, raw=True, pin_memory=pin), depth=4):
        last = batch = batch.to(runtime.device)
        with autocast:
            window.add(module(**shifted_inputs(batch, runtime.device, teacher)), batch.n_tokens)
        forwards += 1
    if collective:
        if last is None:
            last = load_batch(reader, np.array([plan.any_sample()]), max_length, names, raw=True).to(runtime.device)
        for _ in range(plan.busiest_rank_batches() - forwards):
            with autocast:
                module(**shifted_inputs(last, runtime.device, teacher))
    module.train()
    return window.summary(runtime)


def resolve_compile_step(cfg: TrainConfig, device: torch.device) -> bool:
    """``--compile-step`` as given, else on for CUDA without FSDP (on an H200 at the 8B shape it
    made the draft step 1.2x faster, see BENCHMARKS.md) and off on CPU, where compiling costs
    more than it saves on short runs."""
    if cfg.compile_step is not None:
        return cfg.compile_step
    return device.type == "cuda" and not cfg.fsdp


def run_train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    runtime = Runtime.from_environment(cfg.device)
    try:
        return _train(cfg, runtime, resume)
    finally:
        runtime.close()


def _train(cfg: TrainConfig, runtime: Runtime, resume: bool) -> dict:
    device = runtime.device
    out = Path(cfg.out)
    checkpoint = load_latest_checkpoint(out) if resume else None
    if not resume and (out / "checkpoints").exists():
        raise ConfigError(f"{out} already holds a run with checkpoints; pass --resume {out} or use another --out")
    torch.manual_seed(cfg.seed)
    manifest = read_manifest(cfg.cache)
    if cfg.target is not None:
        check_target(manifest, Path(cfg.cache), cfg.target)
    skip = set(cfg.skip_parts)
    validate_cache(cfg.cache, deep=False).require_ok(skip)  # cheap: seals, shapes, offsets
    reader = CacheReader(cfg.cache, manifest, skip_parts=skip or None)
    manifest = reader.manifest
    teacher_name = resolve_teacher(cfg.teacher, reader.sample_fields)
    names = fields_for_teacher(reader, teacher_name)
    train_ids, val_ids = split_samples(len(reader), cfg.val_fraction, cfg.seed)

    draft, coverage = build_draft(manifest, Path(cfg.cache), cfg.draft_vocab)
    if checkpoint is not None:
        # The checkpoint's d2t/t2d win: lm_head rows are only meaningful under their own mapping.
        draft.load_state_dict(checkpoint["model"])
    attention = resolve_attention(cfg.attention, device, draft.config.head_dim)
    draft.set_attention_backend(attention)
    module = Eagle3TrainerModule(
        draft,
        selected_token_ids=draft.draft_to_target_ids(),
        selected_token_mask=draft.t2d,
        ttt_steps=cfg.ttt_steps,
        gradient_checkpointing=cfg.gradient_checkpointing,
        soft_ce=cfg.soft_ce,
        compile_step=resolve_compile_step(cfg, device),
    ).to(device)
    model = runtime.wrap(module, fsdp=cfg.fsdp)
    # FSDP2 shards `module` in place: its parameters, gradients and the optimizer states become
    # DTensors, so whole-model values (grad norm, state dicts) are gathered with collectives.
    sharded = cfg.fsdp and runtime.world_size > 1
    teacher = None
    if teacher_name == "final-hidden":
        head = TargetHead.load(cfg.cache, device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        teacher = partial(final_hidden_teacher, head=head, selected_token_ids=module.selected_token_ids,
                          selected_token_mask=module.selected_token_mask)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

    group = runtime.world_size * cfg.grad_accum
    plan = BatchPlan(reader, cfg.batch_tokens, cfg.seed, max_length=cfg.max_length, samples=train_ids,
                     rank=runtime.rank, world_size=runtime.world_size, group=group)
    val_plan = BatchPlan(reader, cfg.batch_tokens, cfg.seed, max_length=cfg.max_length, samples=val_ids,
                         rank=runtime.rank, world_size=runtime.world_size, drop_remainder=False) if len(val_ids) else None
    steps_per_epoch = max(1, plan.batches_per_epoch() // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup, cfg.min_lr_ratio)
    )
    window = MetricWindow(cfg.ttt_steps, device)
    start_step, position, skipped = 0, (0, 0), 0
    if checkpoint is not None:
        load_optimizer_state(module, optimizer, checkpoint["optimizer"], sharded=sharded)
        scheduler.load_state_dict(checkpoint["scheduler"])
        window.load_state_dict(checkpoint["window"])
        restore_rng(checkpoint["rng"])
        start_step, position, skipped = checkpoint["step"], tuple(checkpoint["position"]), checkpoint["skipped"]

    sink = None
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_CONFIG, {"train": config_to_dict(cfg), "cache_target": manifest.target.source,
                                             "world_size": runtime.world_size})
        sink = MetricSink(out, keep_until_step=start_step if checkpoint is not None else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    stream = prefetch(iterate_batches(reader, plan, start_epoch=position[0], start_batch=position[1],
                                      max_length=cfg.max_length, names=names, raw=True,
                                      pin_memory=device.type == "cuda"), depth=4)

    first = last = last_val = None
    started = window_started = time.perf_counter()
    tokens_total = 0
    eval_seconds = 0.0
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
               disable=not (cfg.progress and runtime.is_main), dynamic_ncols=True)
    module.train()
    try:
        for step in range(start_step, total_steps):
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            batch_positions = []
            for micro in range(cfg.grad_accum):
                epoch, index, batch = next(stream)
                batch_positions.append((epoch, index))
                position = (epoch, index + 1)
                batch = batch.to(device)
                sync = nullcontext() if micro + 1 == cfg.grad_accum or runtime.world_size == 1 or cfg.fsdp else model.no_sync()
                with sync, autocast:
                    metrics = model(**shifted_inputs(batch, device, teacher))
                    (metrics.loss / cfg.grad_accum).backward()
                step_loss += metrics.loss.detach() / cfg.grad_accum
                window.add(metrics, batch.n_tokens)
                tokens_total += batch.n_tokens
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if sharded and hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, the norm over all shards
                grad_norm = grad_norm.full_tensor()
            finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
            if not bool(runtime.all_reduce_sum(finite.float().reshape(1)) == runtime.world_size):
                if skipped >= cfg.skip_nonfinite:
                    raise NonFiniteLossError(
                        f"step {step + 1}: non-finite loss or gradient (loss {float(step_loss):.4g}, grad norm "
                        f"{float(grad_norm):.4g}) in batch(es) {batch_positions} (epoch, index); rerun with "
                        "--skip-nonfinite N to tolerate up to N such batches"
                    )
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
            else:
                optimizer.step()
            scheduler.step()
            bar.update(1)
            done = step + 1
            if done % cfg.log_every == 0 or done == total_steps:
                now = time.perf_counter()
                summary = window.summary(runtime)
                record = {"step": done, "lr": scheduler.get_last_lr()[0], "skipped_nonfinite": skipped, **summary}
                record["tokens_per_second"] = round(summary.get("tokens", 0) / max(now - window_started, 1e-9), 1)
                if val_plan is not None and cfg.eval_every and done % cfg.eval_every == 0:
                    eval_started = time.perf_counter()
                    last_val = evaluate(module, reader, val_plan, runtime, autocast, cfg.max_length, names, teacher,
                                    collective=sharded)
                    eval_seconds += time.perf_counter() - eval_started
                    record.update({f"val_{k}": v for k, v in last_val.items()})
                if sink is not None:
                    sink.write(record)
                first = first or record
                last = record
                bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", acc0=f"{record['step_accuracy'][0]:.3f}",
                                tok_s=f"{record['tokens_per_second']:,.0f}")
                window.reset()
                window_started = time.perf_counter()
            if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
                model_state = full_model_state(module, "draft_model", sharded=sharded)  # every rank (FSDP2)
                optimizer_state = full_optimizer_state(module, optimizer, sharded=sharded)
                if runtime.is_main:
                    save_checkpoint(out, done, {
                        "model": model_state,
                        "optimizer": optimizer_state,
                        "scheduler": scheduler.state_dict(),
                        "window": window.state_dict(),
                        "rng": rng_state(),
                        "position": list(position),
                        "skipped": skipped,
                        "config": config_to_dict(cfg),
                    })
                runtime.barrier()
    finally:
        stream.close()  # stops the reader threads before the process group goes away
        bar.close()
        if sink is not None:
            sink.close()
    seconds = time.perf_counter() - started - eval_seconds  # training time, validation excluded
    if val_plan is not None:
        last_val = evaluate(module, reader, val_plan, runtime, autocast, cfg.max_length, names, teacher,
                            collective=sharded)
    summary = {
        "run": str(out),
        "export": str(out / "export"),
        "steps": total_steps,
        "resumed_from_step": start_step if checkpoint is not None else None,
        "ttt_steps": cfg.ttt_steps,
        "teacher": teacher_name,
        "attention": attention,
        "soft_ce": cfg.soft_ce,
        "compile_step": resolve_compile_step(cfg, device),
        "draft_vocab": draft.config.draft_vocab_size,
        "draft_vocab_coverage": round(coverage, 4),
        "world_size": runtime.world_size,
        "first": first,
        "final": last,
        "validation": last_val,
        "skipped_nonfinite": skipped,
        "tokens": tokens_total * runtime.world_size,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens_total * runtime.world_size / max(seconds, 1e-9), 1),
        "device": str(device),
    }
    export_state = full_model_state(module, "draft_model", sharded=True) if sharded else None  # every rank
    if runtime.is_main:
        export_draft(
            module.draft_model if sharded else module.draft_model.to("cpu"), out / "export", target=manifest.target,
            layer_ids=manifest.settings.layer_ids, layer_convention=manifest.layer_convention, state_dict=export_state,
        )
        write_json_atomic(out / "summary.json", summary)
    runtime.barrier()
    return summary
