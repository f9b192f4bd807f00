"""`talon train`, `talon sweep` and `talon plot`: thin typer commands over stage_train."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.cli_common import fail

from pipeline.config import ConfigError, TrainConfig, load_config_file, train_config_from_dict

_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name not in ("cache", "out")}


def _d(name: str) -> str:
    return f" [default: {_DEFAULTS[name]}]"


def _explicit(ctx: typer.Context, names: list[str]) -> dict[str, Any]:
    """The options the user actually typed (so config files and saved runs are not clobbered)."""
    return {
        name: ctx.params[name]
        for name in names
        if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"  # typer vendors click
    }




def train_command(
    ctx: typer.Context,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Feature cache written by `talon extract`.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory: config.json, metrics.jsonl, checkpoints/, summary.json and export/ (the servable draft).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML or YAML file of train settings (keys as the option names with underscores); options given on the command line override it. Unknown keys are errors.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this directory from its latest checkpoint, with its saved settings (options given here override them, e.g. a larger --max-steps).")] = None,
    target: Annotated[Optional[str], typer.Option(help="Refuse the cache unless it was extracted from this target (hidden size, vocab, tokenizer, template, weights are compared).")] = None,
    ttt_steps: Annotated[Optional[int], typer.Option(help="Training-time-test unroll depth K." + _d("ttt_steps"))] = None,
    draft_vocab: Annotated[Optional[int], typer.Option(help="Draft vocabulary size: the most frequent assistant tokens of the cache, capped at the target vocab." + _d("draft_vocab"))] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps; overrides --epochs.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the training split when --max-steps is not given." + _d("epochs"))] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW, linear warmup then cosine)." + _d("lr"))] = None,
    warmup_ratio: Annotated[Optional[float], typer.Option(help="Share of steps spent warming up." + _d("warmup_ratio"))] = None,
    min_lr_ratio: Annotated[Optional[float], typer.Option(help="Final learning rate as a share of the peak." + _d("min_lr_ratio"))] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay." + _d("weight_decay"))] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help="Max gradient norm." + _d("grad_clip"))] = None,
    batch_tokens: Annotated[Optional[int], typer.Option(help="Padded tokens per micro-batch and rank (batch size x longest sample)." + _d("batch_tokens"))] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step and rank." + _d("grad_accum"))] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Truncate cached samples to this many tokens (default: as cached).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Share of the cache's samples held out for validation (per-step accuracy and simulated acceptance length)." + _d("val_fraction"))] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Validate every N steps (at a log step); always validated at the end when --val-fraction > 0.")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (a multiple of --log-every) so --resume can continue exactly.")] = None,
    skip_nonfinite: Annotated[Optional[int], typer.Option(help="Tolerate up to N batches with a NaN/Inf loss or gradient (skipped and counted) instead of stopping." + _d("skip_nonfinite"))] = None,
    fsdp: Annotated[Optional[bool], typer.Option("--fsdp/--ddp", help="With several ranks (torchrun), shard with FSDP2 instead of replicating with DDP.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute each TTT step in backward instead of keeping its activations: memory then grows with --ttt-steps only by the cached K/V and hidden states (the [tokens, draft vocab] fp32 logits and MLP activations are not kept), at the cost of about one extra forward per step. Same loss and gradients." + _d("gradient_checkpointing"))] = None,
    skip_parts: Annotated[Optional[str], typer.Option(help="Comma-separated part names to leave out of a damaged cache (as `talon validate` names them).")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher: auto (final-hidden when the cache has it, else top-k), topk, or final-hidden (exact draft-vocab teacher recomputed from the cached final hidden state)." + _d("teacher"))] = None,
    attention: Annotated[Optional[str], typer.Option(help="TTT attention kernel: flex (compiled block-sparse flex_attention over the prefix and the per-step diagonals; CUDA), eager (explicit [T, T] scores), or auto (flex on CUDA, eager on CPU). Both give the same result to rounding." + _d("attention"))] = None,
    soft_ce: Annotated[Optional[str], typer.Option(help="Loss kernel of the top-k teacher: reference (fp32 log-softmax of the logits, kept for backward) or fused (the same soft cross-entropy and argmax computed from the head's bf16 logits, compiled on CUDA: no fp32 copies of the [tokens, draft vocab] logits or their gradients). Same loss to rounding; the final-hidden teacher always uses reference. fused is the default: it keeps ~3.5 GB less at the 8B shape and K=7, and with --compile-step the two measured the same speed." + _d("soft_ce"))] = None,
    compile_step: Annotated[Optional[bool], typer.Option("--compile-step/--no-compile-step", help="Run each TTT step through torch.compile, so that the norms, rotary, SwiGLU, residual adds and the loss fuse around the matmuls and the attention. Same values to fp32 rounding; the first batches pay the compilation (tens of seconds). Default: on with CUDA (1.2x the draft step at the 8B shape on an H200), off on CPU; not yet with --fsdp.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto (CUDA if present), cpu, or cuda. bf16 autocast on CUDA, fp32 on CPU." + _d("device"))] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for initialisation, validation split and batch order." + _d("seed"))] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Write a metrics.jsonl line every N steps." + _d("log_every"))] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout instead of text.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Train the EAGLE-3 draft from a feature cache (never loading the target) and export it for SGLang/vLLM.

    Run it under `torchrun --nproc-per-node N -m pipeline train ...` for data parallelism."""
    names = [n for n in _DEFAULTS if n != "progress"] + ["cache", "out"]
    try:
        given = _explicit(ctx, names)
        from stage_train.trainer import resolve_resume, run_train

        if resume is not None:
            cfg = resolve_resume(resume, given)
        else:
            values = load_config_file(config) if config else {}
            values.update(given)
            if "cache" not in values or "out" not in values:
                raise ConfigError("--cache and --out are required (or --resume RUN)")
            cfg = train_config_from_dict(values, where=str(config or "command line"))
        cfg = TrainConfig(**{**cfg.__dict__, "progress": progress and sys.stderr.isatty()})
        summary = run_train(cfg, resume=resume is not None)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        fail(err)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    final = summary["final"] or {}
    typer.echo(f"run: {summary['run']}")
    typer.echo(f"steps: {summary['steps']}  tokens: {summary['tokens']}  ({summary['tokens_per_second']} tok/s on {summary['device']})")
    typer.echo(f"draft vocab: {summary['draft_vocab']} (covers {summary['draft_vocab_coverage']:.1%} of assistant tokens)")
    typer.echo(f"final loss: {final.get('loss', float('nan')):.4f}  per-step accuracy: {final.get('step_accuracy')}")
    typer.echo(f"simulated acceptance length (train): {final.get('simulated_acceptance_length')}")
    if summary.get("validation"):
        val = summary["validation"]
        typer.echo(f"validation: per-step accuracy {val['step_accuracy']}  simulated acceptance length {val['simulated_acceptance_length']}")
    typer.echo(f"draft exported to: {summary['export']}")


def sweep_command(
    cache: Annotated[Path, typer.Option("--cache", help="Feature cache to train every point from (the target is never loaded).")],
    out: Annotated[Path, typer.Option("--out", help="Sweep directory: one run folder per point, results.md, results.csv and results.png.")],
    grid: Annotated[list[str], typer.Option("--grid", help="A swept setting, e.g. --grid lr=1e-4,3e-4 --grid ttt_steps=3,5,7 (repeatable; every combination runs).")],
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML/YAML file of settings shared by every point.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Steps per point (shared).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Held-out share of the cache, the same split for every point.")] = 0.05,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Train every combination of a grid from the same cache; finished points are skipped on rerun,
    a failed point is recorded and the sweep goes on."""
    from stage_train.sweep import parse_grid, run_sweep

    try:
        base = load_config_file(config) if config else {}
        base.update({"cache": str(cache), "val_fraction": val_fraction, "device": device, "progress": False})
        if max_steps is not None:
            base["max_steps"] = max_steps
        rows = run_sweep(base, parse_grid(grid), Path(out))
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo((Path(out) / "results.md").read_text())


def plot_command(
    run: Annotated[Path, typer.Argument(help="Run directory holding metrics.jsonl.")],
    output: Annotated[Optional[Path], typer.Option("--output", help="PNG path (default RUN/training.png).")] = None,
) -> None:
    """Draw the loss and per-step accuracy curves of a run to a PNG."""
    from stage_train.plots import plot_run

    try:
        path = plot_run(run, output)
    except (ValueError, FileNotFoundError, OSError) as err:
        fail(err)
    typer.echo(str(path))
