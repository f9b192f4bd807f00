"""`talon extract`: run the frozen target once over chat data and write the feature cache.

The main thread tokenises records and queues target forwards; each batch's features are copied
to the host asynchronously (:mod:`stage_extract.transfer`) and a background thread checks,
compresses and writes finished parts (:mod:`stage_extract.writer`).  Parts are cut at the same
records whether or not a run was interrupted, so a resumed run writes the same bytes.  With
several workers (:mod:`stage_extract.workers`) each extracts its share into its own directory
and the last one to finish writes the cache manifest.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipeline.config import ExtractConfig
from pipeline.runtime import compute_dtype, resolve_device
from schemas.checksum import checksum_for_schema
from schemas.layout import FINAL_HIDDEN_CONVENTION, SCHEMA_VERSION, TARGET_HEAD_FILE, has_final_hidden, row_widths
from schemas.manifest import CacheManifest, ExtractSettings, ExtractSpec, read_manifest, read_sealed_parts
from stage_extract.cache_dir import prepare_cache_dir, resumed_setting
from stage_extract.backends import FeatureBackend, open_backend
from stage_extract.cuda_graphs import use_cuda_graphs
from stage_extract.features import default_aux_layers, validate_aux_layers
from stage_extract.records import RecordStats, iter_chat_records
from stage_extract.tokenize_ahead import tokenize_ahead
from stage_extract.target import load_target, resolve_target, target_identity
from stage_extract.transfer import HostTransfer
from stage_extract.workers import Shard, merge_cache, resolve_shard, write_worker_record
from stage_extract.writer import BackgroundPartWriter, CacheWriteError, PartBuilder, PendingSample, describe_write_error

__all__ = ["PendingSample", "extract_with_model", "launch_part", "run_extract", "save_target_head"]


def save_target_head(cache_dir: Path, model, teacher: str = "topk") -> None:
    """Store the target's input embedding once per cache, so training never loads the target;
    with a final-hidden teacher also its final norm and LM head (``rms_norm_eps`` goes in the
    file's metadata).  Written to a unique temp file and renamed, so concurrent workers and a
    kill at any point leave either no file or a whole one."""
    path = Path(cache_dir) / TARGET_HEAD_FILE
    if path.is_file():
        return
    tensors = {"embed_tokens.weight": model.get_input_embeddings().weight.detach().to("cpu").contiguous().clone()}
    metadata = {"rms_norm_eps": repr(float(getattr(model.config, "rms_norm_eps", 1e-6)))}
    if has_final_hidden(teacher):
        tensors["norm.weight"] = model.model.norm.weight.detach().to("cpu").contiguous().clone()
        tensors["lm_head.weight"] = model.get_output_embeddings().weight.detach().to("cpu").contiguous().clone()
        metadata["final_hidden"] = FINAL_HIDDEN_CONVENTION
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise CacheWriteError(describe_write_error(err, path, "writing")) from err


def launch_part(backend: FeatureBackend, builder: PartBuilder, transfer: HostTransfer) -> int:
    """Queue the backend over the part's pending samples; each batch's features go to
    ``builder.batches`` as a :class:`HostBatch` (possibly still copying). Returns the tokens queued."""
    samples = [(p.record_index, p.input_ids) for p in builder.pending]
    for batch in backend.feature_batches(samples):
        builder.batches.append(transfer.submit(batch.planes, batch.lengths, batch.positions))
    return sum(len(p.input_ids) for p in builder.pending)


def cores_per_worker() -> int:
    """This process's share of the host's cores: all of them, or under torchrun one
    LOCAL_WORLD_SIZE-th (every GPU of the host runs its own extraction worker)."""
    return max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


DEFAULT_TOKENIZER_PROCESSES = 2


def tokenizer_processes(requested: int | None, device: torch.device, backend: str) -> int:
    """``--tokenizer-workers``: as given, else 2 processes for the hf backend on a GPU host with
    4+ cores per worker.  Tokenising in the extraction process holds its GIL about 1 s per
    million tokens, which at SmolLM2's pace on an H200 made the part writers wait: in one call
    the run reached 0.57 of the features' rate with a tokenizer thread and 0.84 with 2 forked
    processes (0.87 with everything tokenised beforehand, in another); 2 processes tokenise
    ~1.8M tokens/s there, 4x the target.  On CPU the main thread tokenises between forwards (the cores run the target);
    the vllm backend keeps the thread (forking beside vLLM's engine is untested)."""
    if requested is not None:
        return requested
    if device.type != "cuda" or backend != "hf" or cores_per_worker() < 4:
        return 0
    return DEFAULT_TOKENIZER_PROCESSES


def writer_parallelism(device: torch.device) -> dict[str, int]:
    """Part-writer threads and the shared compression pool behind them.

    On CPU one of each (the cores run the target).  On a GPU host, where ~0.5-1 GB/s of
    features must be checksummed and compressed, a pool of up to 8 encoding threads (leaving
    cores for the main thread and the writers) does that GIL-free work, and 3 writer threads
    overlap one part's concatenation and file writes with the others' encoding; more writer
    threads would only hold more parts in memory.  Written parts are flushed to the disk on 3
    sync threads (they only wait): parallel flushes of part directories reach ~1.3x a single
    file's bandwidth on the H200 hosts' disks (``bench/disk_speed.py``)."""
    if device.type != "cuda":
        return {"threads": 1, "max_pending": 2, "encode_threads": 1, "sync_threads": 1}
    cores = cores_per_worker()
    return {"threads": min(3, max(1, cores // 4)), "max_pending": 2, "encode_threads": max(1, min(8, cores - 3)),
            "sync_threads": 3}


def _local_device(device: torch.device) -> torch.device:
    """Under torchrun, each worker takes the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def run_extract(cfg: ExtractConfig) -> dict:
    device = _local_device(resolve_device(cfg.device))
    dtype = compute_dtype(device)
    # With vLLM the engine owns the GPU; the HF model is only needed for the tokenizer, the
    # target identity and the stored embedding, so it stays on the CPU (in the GPU's dtype, so
    # the weights fingerprint matches an HF-backend cache of the same target).
    load_device = torch.device("cpu") if cfg.backend == "vllm" else device
    tokenizer, model = load_target(cfg.target, device=load_device, dtype=dtype)
    return extract_with_model(cfg, tokenizer, model, device=device, dtype=dtype)


def extract_with_model(cfg: ExtractConfig, tokenizer, model, *, device: torch.device, dtype: torch.dtype) -> dict:
    """The extraction itself, for a loaded target (benchmarks pass a random-weight model)."""
    shard = resolve_shard(cfg.shard_index, cfg.num_shards)
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
        feature_dtype=cfg.feature_dtype,
        teacher=cfg.teacher,
        num_shards=shard.count,
        aux_compression=resumed_setting(Path(cfg.out), "aux_compression", cfg.aux_compression),
        batching=resumed_setting(Path(cfg.out), "batching", cfg.batching),
    )
    spec = ExtractSpec(SCHEMA_VERSION, target_identity(cfg.target, model, tokenizer), settings)
    cfg = replace(cfg, aux_compression=settings.aux_compression, batching=settings.batching)  # resolved
    graphs = use_cuda_graphs(cfg.cuda_graphs, device=device, batching=cfg.batching, backend=cfg.backend,
                             parameters=sum(p.numel() for p in model.parameters()))
    out = Path(cfg.out)
    state = prepare_cache_dir(out, spec, shard)
    started = time.perf_counter()
    tokens_computed = 0
    graph_stats = None
    if not state.complete:
        save_target_head(out, model, cfg.teacher)
        backend = open_backend(
            cfg.backend, model=model, target_path=resolve_target(cfg.target), layer_ids=layer_ids, top_k=cfg.top_k,
            batch_tokens=cfg.batch_tokens, max_length=cfg.max_length, device=device,
            feature_dtype=cfg.feature_dtype, teacher=cfg.teacher, batching=cfg.batching,
            cuda_graphs=graphs,
            vllm_options=vllm_options(cfg) if cfg.backend == "vllm" else None,
        )
        try:
            tokens_computed = _extract_shard(cfg, tokenizer, backend, int(model.config.vocab_size),
                                             int(model.config.hidden_size), shard, state)
            graph_stats = getattr(backend, "graph_stats", lambda: None)()
        finally:
            backend.close()
    seconds = time.perf_counter() - started
    try:
        manifest = merge_cache(out, require_complete=False) if not state.merged or not state.complete else read_manifest(out)
    except OSError as err:
        raise CacheWriteError(describe_write_error(err, out, "writing the manifest of")) from err
    summary = summarize(manifest, out, shard, state, seconds=seconds, tokens_computed=tokens_computed)
    if graph_stats is not None:
        summary["cuda_graphs"] = graph_stats
    return summary


def vllm_options(cfg: ExtractConfig):
    from stage_extract.vllm_backend import VLLMOptions

    return VLLMOptions(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, tensor_parallel_size=cfg.tensor_parallel_size)


def _extract_shard(cfg: ExtractConfig, tokenizer, backend: FeatureBackend, vocab_size: int, hidden_size: int, shard: Shard, state) -> int:
    """Extract this worker's unsealed records; returns the tokens computed."""
    started = time.perf_counter()
    stats = RecordStats()
    widths = row_widths(hidden_size, cfg.top_k, cfg.feature_dtype, cfg.teacher)
    writer = BackgroundPartWriter(state.worker_dir, vocab_size, cfg.feature_dtype, cfg.teacher,
                                  aux_compression=cfg.aux_compression, checksum_name=checksum_for_schema(state.schema_version),
                                  **writer_parallelism(backend.device))
    transfer = HostTransfer(backend.device)
    builder: PartBuilder | None = None
    pending_tokens = 0
    tokens_computed = 0
    next_part = state.next_part
    bar = tqdm(total=cfg.max_samples, desc=f"extract {shard.name}" if shard.count > 1 else "extract",
               unit="rec", disable=not cfg.progress, dynamic_ncols=True)

    source_stats = stats.as_dict()  # the reader's counts after the last record taken (tokenised ahead)

    def flush() -> None:
        nonlocal builder, pending_tokens, tokens_computed, next_part
        if builder is None:
            return
        tokens_computed += launch_part(backend, builder, transfer)
        writer.submit(builder, source_stats)
        elapsed = max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(parts=next_part + 1, tok_s=f"{tokens_computed / elapsed:,.0f}")
        next_part += 1
        builder, pending_tokens = None, 0

    def wanted(record) -> bool:  # not sealed by an earlier run, and this worker's
        return record.record_index > state.last_record and shard.owns(record.record_index)

    try:
        records = iter_chat_records(cfg.data, skip_bad_records=cfg.skip_bad_records, stats=stats, limit=cfg.max_samples)
        for item in tokenize_ahead(records, stats, tokenizer, max_length=cfg.max_length, wanted=wanted,
                                   workers=tokenizer_processes(cfg.tokenizer_workers, backend.device, cfg.backend),
                                   background=backend.device.type == "cuda"):
            record, tokens, source_stats = item.record, item.tokens, item.stats
            bar.update(1)
            if not item.wanted:
                continue
            if builder is None:
                builder = PartBuilder(index=next_part, first_record=record.record_index, widths=widths)
            builder.records_consumed += 1
            builder.last_record = record.record_index
            if tokens is None:
                builder.drop(record.record_index, "no_assistant_after_truncation")
                continue
            builder.pending.append(PendingSample(record.record_index, tokens.input_ids.astype(np.int64), tokens.loss_mask.astype(np.uint8)))
            pending_tokens += len(tokens.input_ids)
            if pending_tokens >= cfg.part_tokens:
                flush()
        source_stats = stats.as_dict()  # the reader is exhausted: its final counts
        flush()
    finally:
        bar.close()
        writer.close()
    try:
        write_worker_record(state.worker_dir, shard, read_sealed_parts(state.worker_dir), stats.as_dict())
    except OSError as err:
        raise CacheWriteError(describe_write_error(err, state.worker_dir, "writing the worker record of")) from err
    return tokens_computed


def summarize(manifest: CacheManifest | None, out: Path, shard: Shard, state, *, seconds: float, tokens_computed: int) -> dict:
    """What the command prints: the cache when it is merged, else this worker's share."""
    rate = round(tokens_computed / seconds, 1) if seconds > 0 and tokens_computed else None
    common = {
        "cache": str(out),
        "worker": f"{shard.index} of {shard.count}",
        "merged": manifest is not None,
        "resumed_parts": len(state.seals),
        "seconds": round(seconds, 2),
        "tokens_per_second": rate,
    }
    if manifest is None:
        seals = read_sealed_parts(state.worker_dir)
        return {
            **common,
            "target": None,
            "samples": sum(s.n_samples for s in seals),
            "tokens": sum(s.n_tokens for s in seals),
            "assistant_tokens": sum(s.n_assistant_tokens for s in seals),
            "parts": len(seals),
            "bytes_per_token": None,
            "stored_bytes": sum(a.stored_bytes for s in seals for a in s.arrays.values()),
            "source_stats": seals[-1].source_stats if seals else {},
            "dropped": {},
            "note": "other workers are still running; the last one to finish (or `talon merge`) writes the manifest",
        }
    return {
        **common,
        "target": manifest.target.source,
        "samples": manifest.n_samples,
        "tokens": manifest.n_tokens,
        "assistant_tokens": manifest.n_assistant_tokens,
        "parts": len(manifest.parts),
        "bytes_per_token": round(manifest.bytes_per_token, 1),
        "stored_bytes": manifest.stored_bytes,
        "source_stats": manifest.source_stats,
        "dropped": manifest.dropped,
        "feature_dtype": manifest.settings.feature_dtype,
        "teacher": manifest.settings.teacher,
    }

