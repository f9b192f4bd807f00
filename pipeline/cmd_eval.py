"""`talon eval` and `talon regenerate`: thin typer commands over the library functions.

Registered in ``pipeline/cli.py`` with ``app.command("eval")(eval_command)`` and
``app.command("regenerate")(regenerate_command)``.  Each command builds a validated config,
calls one library function and prints a text or ``--json`` summary; heavy imports (torch,
transformers) happen only inside the call.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.cli_common import emit, fail
from pipeline.config import ConfigError

__all__ = ["eval_command", "eval_merge_command", "regenerate_command"]

_ERRORS = (ConfigError, ValueError, FileNotFoundError, RuntimeError, OSError)


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def eval_command(
    draft: Annotated[Path, typer.Option("--draft", help="Exported draft folder (RUN/export: config.json + model.safetensors).")],
    target: Annotated[Optional[str], typer.Option(help="Target model; default: the one recorded in the export (config.json talon.target.source).")] = None,
    prompts: Annotated[str, typer.Option(help="Prompts: 'mt-bench' (80 questions, 2 turns each) or a .jsonl file with 'prompt' or 'turns' per line.")] = "mt-bench",
    draft_tokens: Annotated[Optional[int], typer.Option(help="Draft chain length K per round (default: the training run's TTT steps if RUN/summary.json exists, else 4).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Cap on generated tokens per turn.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy verification (output checked against the target's own greedy output); > 0 = speculative sampling.")] = 0.0,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N prompts (MT-Bench is ordered by category: a small N covers few categories).")] = None,
    device: Annotated[str, typer.Option(help="Where to run: auto (CUDA if present), cpu, or cuda. bf16 on CUDA, fp32 on CPU.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Precision of target and draft: float32 (default; the greedy check is exact), bfloat16 (serving precision, faster on GPU; batched verification and one-token decoding round differently, so greedy outputs may diverge at near-ties), or auto (bf16 on CUDA, fp32 on CPU).")] = "float32",
    seed: Annotated[int, typer.Option(help="Seed of the sampling generator (temperature > 0).")] = 0,
    plot: Annotated[Optional[Path], typer.Option(help="Where to write the per-depth acceptance PNG (default: RUN/eval_acceptance.png beside the export).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Where to write the JSON report (default: RUN/eval.json beside the export).")] = None,
    warmup: Annotated[bool, typer.Option(help="Decode one short prompt first, untimed, so start-up costs stay out of both speeds.")] = True,
    shard_index: Annotated[int, typer.Option(help="Evaluate only prompts I, I+N, I+2N, ... of the set (this worker's index I); join the shard reports with `talon eval-merge`.")] = 0,
    num_shards: Annotated[int, typer.Option(help="Number N of eval workers splitting the prompts (processes on one card, or several cards/hosts).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the machine-readable JSON report on stdout instead of text.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Measure a draft by real EAGLE-3 speculative decoding against its target: acceptance length τ,
    per-depth acceptance, tokens/s with and without the draft, and (at temperature 0) exact equality
    with the target's own greedy output."""
    try:
        from stage_train.evaluate import EvalConfig, run_eval

        cfg = EvalConfig(
            draft=draft, target=target, prompts=prompts, draft_tokens=draft_tokens, max_new_tokens=max_new_tokens,
            temperature=temperature, limit=limit, device=device, dtype=dtype, seed=seed, plot=plot, report=report,
            warmup=warmup, progress=progress and sys.stderr.isatty(), shard_index=shard_index, num_shards=num_shards,
        )
        summary = run_eval(cfg)
    except _ERRORS as err:
        fail(err)
    _emit_eval(summary, as_json)


def eval_merge_command(
    reports: Annotated[list[Path], typer.Argument(help="The shard reports (eval.json files) of one `talon eval --num-shards N` run, all N of them.")],
    report: Annotated[Path, typer.Option("--report", help="Where to write the merged JSON report.")],
    plot: Annotated[Optional[Path], typer.Option(help="Where to write the merged per-depth acceptance PNG (default: the report's path with .png).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the merged JSON report on stdout instead of text.")] = False,
) -> None:
    """Join the shard reports of one sharded `talon eval` into one report: acceptance counts,
    tokens and seconds are added up, and every shard must come from the same draft and settings."""
    try:
        from stage_train.evaluate import merge_eval_reports

        summary = merge_eval_reports(list(reports), report, plot)
    except _ERRORS as err:
        fail(err)
    _emit_eval(summary, as_json)


def _emit_eval(summary: dict[str, Any], as_json: bool) -> None:
    greedy = {True: "yes", False: f"NO ({len(summary['mismatches'])} turns differ)", None: "not checked (sampling)"}
    per_position = " ".join(f"{p:.2f}" for p in summary["per_position_acceptance"])
    emit(summary, as_json, [
        f"draft: {summary['draft']}  target: {summary['target']}  ({summary['device']}, {summary['dtype']})",
        f"prompts: {summary['prompts']} ({summary['prompt_count']} prompts, {summary['turns']} turns)  K={summary['draft_tokens']}  T={summary['temperature']}",
        f"tau (tokens per verification): {_fmt(summary['tau'])}   simulated in training: {_fmt(summary['simulated_tau'])}"
        + (f" (depth {summary['simulated_tau_depth']})" if summary["simulated_tau_depth"] else ""),
        f"per-depth acceptance: {per_position or 'n/a'}",
        f"tokens/s: {summary['tokens_per_s']:.2f} speculative vs {summary['baseline_tokens_per_s']:.2f} baseline  "
        f"-> speedup {summary['speedup']:.3f}x",
        f"equal to the target's greedy output: {greedy[summary['greedy_equal']]}",
        *(f"warning: {w}" for w in summary["warnings"]),
        f"report: {summary['report']}  plot: {summary['plot']}",
    ])


def regenerate_command(
    target: Annotated[str, typer.Option(help="Target model that writes the answers: 'smollm2', a local HF Llama folder, or a hub id.")],
    data: Annotated[str, typer.Option(help="Chat data: 'sharegpt', or a .jsonl/.json file in ShareGPT or OpenAI messages form.")],
    out: Annotated[Path, typer.Option("--out", help="Output .jsonl (OpenAI messages form). An existing file is resumed: finished records are skipped.")],
    max_new_tokens: Annotated[int, typer.Option(help="Cap on generated tokens per assistant turn.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Conversations generated together (left-padded batch); each batch is one append to --out.")] = 8,
    max_prompt_tokens: Annotated[int, typer.Option(help="End a conversation before a user turn whose prompt would exceed this many tokens.")] = 4096,
    temperature: Annotated[float, typer.Option(help="0 = greedy (default, reproducible); > 0 samples.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for sampling (temperature > 0).")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Stop after this many new conversations in this invocation (rerun to continue).")] = None,
    device: Annotated[str, typer.Option(help="Where to run: auto (CUDA if present), cpu, or cuda. bf16 on CUDA, fp32 on CPU.")] = "auto",
    skip_bad_records: Annotated[bool, typer.Option(help="Count and skip malformed records instead of stopping at the first one.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout instead of text.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Let the target answer every user turn of a chat dataset itself (turn by turn, given its own
    earlier answers), writing a resumable JSONL training set in OpenAI messages form."""
    try:
        from stage_extract.regenerate import RegenerateConfig, run_regenerate

        cfg = RegenerateConfig(
            target=target, data=data, out=out, max_new_tokens=max_new_tokens, batch_size=batch_size,
            max_prompt_tokens=max_prompt_tokens, temperature=temperature, seed=seed, limit=limit, device=device,
            skip_bad_records=skip_bad_records, progress=progress and sys.stderr.isatty(),
        )
        summary = run_regenerate(cfg)
    except _ERRORS as err:
        fail(err)
    emit(summary, as_json, [
        f"out: {summary['out']}  (target {summary['target']} on {summary['device']})",
        f"records written: {summary['records_written']}  already done: {summary['records_resumed']}  turns: {summary['turns']}",
        f"prompts too long (conversation ended early): {summary['prompts_too_long']}  skipped source records: {summary['source_stats']}",
        f"generated tokens: {summary['generated_tokens']} in {summary['seconds']} s ({summary['tokens_per_second']} tok/s)",
    ])
