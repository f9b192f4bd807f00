"""The `talon` command line: thin typer commands that validate a config and call a stage."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli_common import JsonFlag, emit, fail

from pipeline.config import ConfigError, ExtractConfig

app = typer.Typer(
    name="talon",
    help="Train EAGLE-3 speculative-decoding drafts for Llama targets from a cached Zarr feature store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DeviceOpt = Annotated[str, typer.Option(help="Where to run: auto (CUDA if present), cpu, or cuda. bf16 on CUDA, fp32 on CPU.")]


def _parse_layers(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"--layers takes comma-separated integers, got {text!r}")






@app.command()
def extract(
    out: Annotated[Path, typer.Option("--out", help="Cache directory to create, or to resume if a run was interrupted.")],
    target: Annotated[str, typer.Option(help="Target model: 'smollm2' (the embedded default), a local HF Llama folder, or a hub id.")] = "smollm2",
    data: Annotated[str, typer.Option(help="Chat data: 'sharegpt' (embedded ShareGPT V3), or a .jsonl/.json file in ShareGPT (conversations/from/value) or OpenAI (messages/role/content) form.")] = "sharegpt",
    max_samples: Annotated[Optional[int], typer.Option(help="Stop after this many usable conversations (default: all).")] = None,
    max_length: Annotated[int, typer.Option(help="Truncate each tokenised conversation to this many tokens.")] = 2048,
    top_k: Annotated[int, typer.Option(help="How many of the target's top next-token log-probs to keep per position.")] = 64,
    layers: Annotated[Optional[str], typer.Option(help="Three aux layers, comma-separated, 0-based output-of-layer ids (default: 1,L//2-1,L-4).")] = None,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per target forward: the samples' own tokens with --batching packed, batch size x longest sample with padded.")] = 8192,
    part_tokens: Annotated[int, typer.Option(help="Tokens per sealed part of the cache; a killed run loses at most one part of work.")] = 65536,
    device: DeviceOpt = "auto",
    skip_bad_records: Annotated[bool, typer.Option(help="Count and skip malformed records instead of stopping at the first one.")] = False,
    feature_dtype: Annotated[str, typer.Option(help="Aux-state storage: bf16, or fp8 (e4m3fn, one float32 scale per token and aux layer; ~half the bytes, ~2% relative error; read back as bf16).")] = "bf16",
    teacher: Annotated[str, typer.Option(help="Teacher planes: topk (top-k log-probs), final-hidden (pre-norm last hidden state + the target's final norm and LM head, for the exact teacher), or both.")] = "topk",
    aux_compression: Annotated[str, typer.Option(help="Codec of the aux (and final-hidden) planes: auto (lz4 for bf16, zstd for fp8), lz4 (blosc lz4 + bit-shuffle: ~1.18x smaller bf16, about twice zstd's write and read speed), zstd (level 1: ~1.23x bf16, ~1.17x fp8), none (raw: fastest, 24.5 KiB/token for an 8B target at top-64), or blosc-zstd (the codec of caches made before this option; pass it to resume one). Recorded in the cache; readers need no flag.")] = "auto",
    shard_index: Annotated[Optional[int], typer.Option(help="This worker's index I: it extracts the records with record_index % N == I (default: torchrun's RANK, else 0).")] = None,
    num_shards: Annotated[Optional[int], typer.Option(help="Number of workers N writing into the same --out (default: torchrun's WORLD_SIZE, else 1); the last to finish writes the manifest.")] = None,
    backend: Annotated[str, typer.Option(help="Feature engine: hf (transformers forward with layer hooks) or vllm (vLLM 0.26 extract_hidden_states; needs a GPU and `pip install '.[vllm]'`). Both write the same cache.")] = "hf",
    vllm_gpu_memory_utilization: Annotated[float, typer.Option(help="--backend vllm: share of GPU memory vLLM may claim; the rest holds Talon's LM head for the top-k.")] = 0.85,
    tensor_parallel_size: Annotated[int, typer.Option(help="--backend vllm: GPUs to shard the target over (tensor parallel).")] = 1,
    tokenizer_workers: Annotated[Optional[int], typer.Option(help="Processes that render the chat template and tokenise ahead of the forwards. Default: 2 on a GPU with the hf backend (forked on Linux in well under a second; tokenising inside the extraction process holds its GIL and slows the part writers: 0.57 of the features' rate against 0.84 on an H200 with SmolLM2), none on CPU (the main thread tokenises between forwards, the cores run the target) or with --backend vllm. 0: on a GPU, a background thread tokenises ahead instead, a chunk of records at a time. The cache is the same whatever the choice.", show_default=False)] = None,
    batching: Annotated[str, typer.Option(help="Layout of the target's forwards (HF backend): packed (each batch's samples concatenated in one row, positions restarting per sample, attention kept within each sample by a variable-length kernel: no padding), padded (length-sorted samples right-padded to the batch's longest), or auto (packed for a new cache; a resumed cache keeps the batching it was started with, so its numerics never mix).")] = "auto",
    cuda_graphs: Annotated[str, typer.Option(help="Replay the target's packed forwards from CUDA graphs: one launch per batch instead of ~1,000 kernel launches, which is what bounds a small target such as SmolLM2 (its forward is faster than Python can queue it). Each batch is padded to the next eighth of --batch-tokens with pseudo-samples that attend only among themselves and are dropped; each new shape is captured once. auto: on for the hf backend's packed forwards on a GPU of a target under 2B parameters (a larger target's forward is compute-bound: it saves nothing on launches and pays for the padding); on: for any target, an error where the forwards are not packed hf ones on a GPU; off: eager forwards. Graphs and eager forwards differ at most in the last bits of rounding, like any other kernel choice.")] = "auto",
    as_json: JsonFlag = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Run the frozen target once over chat data and write aux hidden states, top-k log-probs,
    token ids and assistant loss masks to a sharded Zarr v3 cache."""
    try:
        cfg = ExtractConfig(
            out=out, target=target, data=data, max_samples=max_samples, max_length=max_length, top_k=top_k,
            layers=_parse_layers(layers), batch_tokens=batch_tokens, part_tokens=part_tokens, device=device,
            skip_bad_records=skip_bad_records, progress=progress and sys.stderr.isatty(),
            feature_dtype=feature_dtype, teacher=teacher, aux_compression=aux_compression,
            shard_index=shard_index, num_shards=num_shards,
            backend=backend, vllm_gpu_memory_utilization=vllm_gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size, tokenizer_workers=tokenizer_workers, batching=batching,
            cuda_graphs=cuda_graphs,
        )
        from stage_extract.run import run_extract

        summary = run_extract(cfg)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        fail(err)
    emit(summary, as_json, [
        f"cache: {summary['cache']}",
        f"samples: {summary['samples']}  tokens: {summary['tokens']}  assistant tokens: {summary['assistant_tokens']}",
        f"parts: {summary['parts']} (resumed {summary['resumed_parts']})  bytes/token: {summary['bytes_per_token']}",
        f"skipped records: {summary['source_stats']}  dropped: {summary['dropped']}",
        f"time: {summary['seconds']} s  ({summary['tokens_per_second']} tok/s)",
    ])


@app.command()
def inspect(
    cache: Annotated[Path, typer.Argument(help="Feature cache directory.")],
    as_json: JsonFlag = False,
) -> None:
    """Describe a cache: target, layers, k, dtypes, counts, bytes per token and parts."""
    from pipeline.inspect_cache import describe_cache

    try:
        info = describe_cache(cache)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        fail(err)
    lines = [
        f"cache: {info['cache']}  (schema v{info['schema_version']})",
        f"target: {info['target']['source']}  hidden {info['target']['hidden_size']}, vocab {info['target']['vocab_size']}, "
        f"{info['target']['num_hidden_layers']} layers",
        f"aux layers: {info['layer_ids']} ({info['layer_convention']})",
        f"top-k: {info['top_k']}  max length: {info['max_length']}  aux compression: {info['aux_compression']}",
        f"samples: {info['samples']}  tokens: {info['tokens']}  assistant tokens: {info['assistant_tokens']}",
        f"stored: {info['stored_bytes']:,} bytes = {info['bytes_per_token']:.1f} bytes/token",
    ]
    lines += [f"  {name:14s} {a['storage']:>8s} ({a['logical']}) {a['bytes_per_token']:9.1f} B/token" for name, a in info["arrays"].items()]
    lines.append(f"parts: {len(info['parts'])}")
    emit(info, as_json, lines)


from pipeline.cmd_cache import estimate_command, merge_command, validate_command  # noqa: E402
from pipeline.cmd_eval import eval_command, eval_merge_command, regenerate_command  # noqa: E402
from pipeline.cmd_train import plot_command, sweep_command, train_command  # noqa: E402

app.command("train")(train_command)
app.command("sweep")(sweep_command)
app.command("plot")(plot_command)
app.command("eval")(eval_command)
app.command("eval-merge")(eval_merge_command)
app.command("regenerate")(regenerate_command)
app.command("validate")(validate_command)
app.command("merge")(merge_command)
app.command("estimate")(estimate_command)


if __name__ == "__main__":
    app()
