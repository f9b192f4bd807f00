"""`talon extract`: run the frozen target once over chat data and write the feature cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipeline.batching import length_sorted_batches
from pipeline.config import ExtractConfig
from pipeline.runtime import compute_dtype, resolve_device
from schemas.layout import SCHEMA_VERSION, TARGET_HEAD_FILE, array_specs
from schemas.manifest import (
    CacheManifest,
    ExtractSettings,
    ExtractSpec,
    build_manifest,
    read_manifest,
    read_sealed_parts,
    write_manifest,
)
from stage_extract.cache_dir import prepare_cache_dir
from stage_extract.chat import tokenize_conversation
from stage_extract.features import default_aux_layers, extract_batch, validate_aux_layers
from stage_extract.records import RecordStats, iter_chat_records
from stage_extract.target import load_target, target_identity
from stage_extract.writer import BackgroundPartWriter, PartBuilder, SampleFeatures


@dataclass
class PendingSample:
    record_index: int
    input_ids: np.ndarray
    loss_mask: np.ndarray


def save_target_head(cache_dir: Path, model) -> None:
    """Store the target's input embedding once per cache, so training never loads the target."""
    path = Path(cache_dir) / TARGET_HEAD_FILE
    if path.is_file():
        return
    tmp = path.with_suffix(".tmp")
    weight = model.get_input_embeddings().weight.detach().to("cpu").contiguous()
    save_file({"embed_tokens.weight": weight}, str(tmp))
    tmp.replace(path)


def compute_part(model, builder: PartBuilder, pending: list[PendingSample], cfg: ExtractConfig, layer_ids, device) -> int:
    """Run the target over one part's samples (length-sorted batches) and fill ``builder``
    in record order.  Returns the number of tokens processed."""
    lengths = np.array([len(p.input_ids) for p in pending])
    results: dict[int, SampleFeatures | None] = {}
    for batch in length_sorted_batches(lengths, cfg.batch_tokens):
        width = int(lengths[batch].max())
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sample in enumerate(batch):
            n = int(lengths[sample])
            ids[row, :n] = torch.from_numpy(pending[sample].input_ids)
            mask[row, :n] = 1
        features = extract_batch(model, ids.to(device), mask.to(device), layer_ids=layer_ids, top_k=cfg.top_k)
        aux = features.aux_hidden.cpu()
        top_ids = features.topk_ids.cpu()
        top_lp = features.topk_logprobs.cpu()
        start = 0
        for sample, n in zip(batch, features.lengths):
            rows = slice(start, start + n)
            start += n
            finite = bool(torch.isfinite(aux[rows]).all()) and bool(torch.isfinite(top_lp[rows]).all())
            item = pending[sample]
            results[int(sample)] = SampleFeatures(
                record_index=item.record_index,
                input_ids=item.input_ids,
                loss_mask=item.loss_mask,
                aux_hidden=aux[rows].view(torch.int16).numpy().view(np.uint16),
                topk_ids=top_ids[rows].numpy(),
                topk_logprobs=top_lp[rows].numpy(),
            ) if finite else None
    for position, item in enumerate(pending):
        features = results[position]
        if features is None:
            builder.drop(item.record_index, "nonfinite")
        else:
            builder.samples.append(features)
    return int(lengths.sum())


def run_extract(cfg: ExtractConfig) -> dict:
    device = resolve_device(cfg.device)
    dtype = compute_dtype(device)
    tokenizer, model = load_target(cfg.target, device=device, dtype=dtype)
    num_layers = int(model.config.num_hidden_layers)
    layer_ids = validate_aux_layers(tuple(cfg.layers) if cfg.layers else default_aux_layers(num_layers), num_layers)
    if cfg.top_k > model.config.vocab_size:
        raise ValueError(f"--top-k {cfg.top_k} exceeds the target vocab ({model.config.vocab_size})")
    settings = ExtractSettings(
        data=cfg.data,
        max_length=cfg.max_length,
        top_k=cfg.top_k,
        layer_ids=layer_ids,
        max_samples=cfg.max_samples,
        part_tokens=cfg.part_tokens,
        batch_tokens=cfg.batch_tokens,
        skip_bad_records=cfg.skip_bad_records,
        compute_dtype=str(dtype).removeprefix("torch."),
        device_type=device.type,
    )
    spec = ExtractSpec(SCHEMA_VERSION, target_identity(cfg.target, model, tokenizer), settings)
    out = Path(cfg.out)
    state = prepare_cache_dir(out, spec)
    if state.complete:
        return summarize(read_manifest(out), out, resumed_parts=len(state.seals), seconds=0.0, tokens_computed=0)
    save_target_head(out, model)

    started = time.perf_counter()
    stats = RecordStats()
    writer = BackgroundPartWriter(out, int(model.config.vocab_size))
    builder: PartBuilder | None = None
    pending: list[PendingSample] = []
    pending_tokens = 0
    tokens_computed = 0
    next_part = state.next_part
    bar = tqdm(total=cfg.max_samples, desc="extract", unit="rec", disable=not cfg.progress, dynamic_ncols=True)

    def flush() -> None:
        nonlocal builder, pending, pending_tokens, tokens_computed, next_part
        if builder is None:
            return
        tokens_computed += compute_part(model, builder, pending, cfg, layer_ids, device)
        writer.submit(builder, stats.as_dict())
        elapsed = max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(parts=next_part + 1, tok_s=f"{tokens_computed / elapsed:,.0f}")
        next_part += 1
        builder, pending, pending_tokens = None, [], 0

    try:
        records = iter_chat_records(cfg.data, skip_bad_records=cfg.skip_bad_records, stats=stats, limit=cfg.max_samples)
        for record in records:
            bar.update(1)
            if record.record_index <= state.last_record:
                continue  # sealed by an earlier run
            if builder is None:
                builder = PartBuilder(index=next_part, first_record=record.record_index)
            builder.records_consumed += 1
            builder.last_record = record.record_index
            tokens = tokenize_conversation(tokenizer, record.messages, max_length=cfg.max_length)
            if tokens is None:
                builder.drop(record.record_index, "no_assistant_after_truncation")
                continue
            pending.append(PendingSample(record.record_index, tokens.input_ids.astype(np.int64), tokens.loss_mask.astype(np.uint8)))
            pending_tokens += len(tokens.input_ids)
            if pending_tokens >= cfg.part_tokens:
                flush()
        flush()
    finally:
        bar.close()
        writer.close()
    seals = read_sealed_parts(out)
    arrays = {s.name: {"storage": s.storage_dtype, "logical": s.logical_dtype} for s in array_specs(int(model.config.vocab_size))}
    manifest = build_manifest(spec, seals, arrays)
    if manifest.n_samples == 0:
        raise ValueError(f"no usable samples in {cfg.data!r}: {manifest.source_stats} {manifest.dropped}")
    write_manifest(out, manifest)
    return summarize(manifest, out, resumed_parts=len(state.seals), seconds=time.perf_counter() - started, tokens_computed=tokens_computed)


def summarize(manifest: CacheManifest, out: Path, *, resumed_parts: int, seconds: float, tokens_computed: int) -> dict:
    return {
        "cache": str(out),
        "target": manifest.target.source,
        "samples": manifest.n_samples,
        "tokens": manifest.n_tokens,
        "assistant_tokens": manifest.n_assistant_tokens,
        "parts": len(manifest.parts),
        "resumed_parts": resumed_parts,
        "bytes_per_token": round(manifest.bytes_per_token, 1),
        "stored_bytes": manifest.stored_bytes,
        "source_stats": manifest.source_stats,
        "dropped": manifest.dropped,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens_computed / seconds, 1) if seconds > 0 else None,
    }
