"""`talon eval`: measure an exported draft by real speculative decoding against its target.

The draft is loaded the way a serving engine loads it (``config.json`` + ``model.safetensors``
+ the target's own embedding), fed the aux layers recorded in the export, and drives EAGLE-3
chain drafting (``stage_train.speculative``) over a prompt set.  Every prompt turn is also
decoded by the plain target (same cache implementation, same process, interleaved prompt by
prompt so both see the same machine load), which gives the baseline speed and, at temperature
0, the reference every speculative output must equal token for token.

Multi-turn prompts (MT-Bench has 2 turns) are asked in order: each turn's answer is appended to
the conversation before the next user turn is rendered with the target's chat template.

The report puts the measured acceptance length next to the training run's simulated one
(``RUN/summary.json`` when the export sits in ``RUN/export``): a large gap means the draft sees
something at serve time that it did not see in training (layers, template, positions).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.config import DEVICES, ConfigError
from pipeline.runtime import compute_dtype, resolve_device
from schemas.jsonio import write_json_atomic
from schemas.manifest import TargetIdentity
from stage_extract.features import default_aux_layers, validate_aux_layers
from stage_extract.records import PromptRecord, iter_prompt_records
from stage_extract.regenerate import render_generation_prompt
from stage_train.draft_inference import Eagle3DraftRunner
from stage_train.export import load_exported_draft, read_export_config
from stage_train.speculative import AcceptanceStats, eos_token_ids, speculative_generate, target_generate

__all__ = ["EvalConfig", "aux_layers_of_export", "merge_eval_reports", "plot_acceptance", "run_eval", "simulated_tau_of_run"]

DEFAULT_DRAFT_TOKENS = 4
PLOT_NAME = "eval_acceptance.png"
REPORT_NAME = "eval.json"


# float32 is the default because the greedy check is only exact there: in bf16 a K+1-token
# verification forward and a one-token decoding forward round differently, so near-tied
# argmaxes flip (measured on an H200: 4 of 6 MT-bench turns diverged within 25 tokens).
EVAL_DTYPES = ("float32", "bfloat16", "auto")


@dataclass(frozen=True)
class EvalConfig:
    """Settings of `talon eval` (validated here, once).

    ``draft_tokens`` None means the training run's TTT depth when ``RUN/summary.json`` is
    found (so measured and simulated acceptance cover the same depths), else 4.  ``plot`` and
    ``report`` default to ``eval_acceptance.png`` / ``eval.json`` beside the export folder.
    """

    draft: Path
    target: str | None = None
    prompts: str = "mt-bench"
    draft_tokens: int | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    limit: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    plot: Path | None = None
    report: Path | None = None
    warmup: bool = True
    progress: bool = True
    shard_index: int = 0
    num_shards: int = 1

    def __post_init__(self) -> None:
        if not (Path(self.draft) / "config.json").is_file():
            raise ConfigError(f"--draft {self.draft} is not an exported draft (no config.json)")
        if self.draft_tokens is not None and not 1 <= self.draft_tokens <= 64:
            raise ConfigError("--draft-tokens must be between 1 and 64")
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be positive")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError("--temperature must be a finite number >= 0 (0 is greedy)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be positive")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}")
        if self.dtype not in EVAL_DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(EVAL_DTYPES)}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"--shard-index must be in [0, --num-shards) (got {self.shard_index} of {self.num_shards})")

    @property
    def run_dir(self) -> Path:
        return Path(self.draft).resolve().parent

    @property
    def plot_path(self) -> Path:
        return Path(self.plot) if self.plot is not None else self.run_dir / PLOT_NAME

    @property
    def report_path(self) -> Path:
        return Path(self.report) if self.report is not None else self.run_dir / REPORT_NAME


# ---------------------------------------------------------------------------- export metadata
def aux_layers_of_export(config: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """The output-of-layer aux ids the draft was trained on.

    Talon's own record first; else ``eagle_config`` (SGLang convention, output-of-layer as
    written by us and SpecForge); else the EAGLE-3 default for the target's depth.
    """
    talon = config.get("talon") or {}
    ids = talon.get("aux_layer_ids") or (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if not ids:
        return default_aux_layers(num_layers)
    return validate_aux_layers(tuple(int(i) for i in ids), num_layers)


def simulated_tau_of_run(run_dir: Path) -> tuple[float | None, int | None]:
    """(final simulated acceptance length, TTT depth) of a training run, when recorded."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None, None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    final = summary.get("final") or {}
    tau = final.get("simulated_acceptance_length")
    depth = summary.get("ttt_steps")
    return (float(tau) if tau is not None else None), (int(depth) if depth is not None else None)


def _check_target(config: dict[str, Any], export_dir: Path, spec: str, model, tokenizer) -> list[str]:
    """Refuse a target whose shape/tokenizer differ from the draft's; warn on weights.

    The weights fingerprint depends on the dtype the target was loaded in (bf16 on GPU, fp32
    on CPU), so a mismatch there alone is reported as a warning, not an error.
    """
    from stage_extract.target import target_identity

    recorded = (config.get("talon") or {}).get("target")
    if not recorded:
        return ["the export records no target identity; it could not be checked"]
    expected = TargetIdentity.from_dict(recorded)
    diffs = expected.mismatches(target_identity(spec, model, tokenizer))
    hard = [d for d in diffs if not d.startswith("weights_fingerprint")]
    if hard:
        raise ValueError(
            f"draft {export_dir} was trained for another target than {spec!r}:\n  "
            + "\n  ".join(d.replace("cache has", "draft has") for d in hard)
        )
    return ["target weights fingerprint differs from the draft's record (other dtype or other weights)"] if diffs else []


# ---------------------------------------------------------------------------- plotting
def plot_acceptance(
    path: Path,
    per_position: list[float],
    *,
    tau: float | None,
    simulated_tau: float | None,
    title: str,
) -> Path:
    """Bar chart of per-depth acceptance (Agg canvas; no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    depths = list(range(1, len(per_position) + 1))
    bars = ax.bar(depths, per_position, color="#3b75af")
    for bar, value in zip(bars, per_position):
        ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("draft depth d")
    ax.set_ylabel("share of rounds accepting the first d tokens")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(depths)
    sim = f", simulated τ {simulated_tau:.2f}" if simulated_tau is not None else ""
    measured = f"τ {tau:.2f}" if tau is not None else "no verification rounds"
    ax.set_title(f"{title}\n{measured}{sim}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return path


# ---------------------------------------------------------------------------- the run
def _first_divergence(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Load target + draft, decode every prompt turn both ways, and report."""
    from stage_extract.target import load_target

    export_dir = Path(cfg.draft)
    export_config = read_export_config(export_dir)
    spec = cfg.target or ((export_config.get("talon") or {}).get("target") or {}).get("source")
    if not spec:
        raise ValueError(f"{export_dir / 'config.json'} names no target (talon.target.source); pass --target")
    simulated_tau, simulated_depth = simulated_tau_of_run(cfg.run_dir)
    k = cfg.draft_tokens or simulated_depth or DEFAULT_DRAFT_TOKENS

    device = resolve_device(cfg.device)
    dtype = compute_dtype(device) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    tokenizer, model = load_target(spec, device=device, dtype=dtype)
    warnings = _check_target(export_config, export_dir, spec, model, tokenizer)
    layer_ids = aux_layers_of_export(export_config, int(model.config.num_hidden_layers))
    embed = model.get_input_embeddings().weight.detach().to("cpu", torch.float32)
    draft = load_exported_draft(export_dir, embed, dtype=torch.float32).to(device=device, dtype=dtype)
    if draft.config.target_hidden_size != model.config.hidden_size:
        raise ValueError(
            f"draft {export_dir} expects target hidden size {draft.config.target_hidden_size}, "
            f"the target has {model.config.hidden_size}"
        )
    runner = Eagle3DraftRunner(draft)
    eos = eos_token_ids(model, tokenizer)
    prompts: list[PromptRecord] = list(iter_prompt_records(cfg.prompts, limit=cfg.limit))
    if not prompts:
        raise ValueError(f"{cfg.prompts}: no prompts")
    prompt_total = len(prompts)
    # Shard I of N: prompts I, I+N, ...  A shard may be empty (more shards than prompts): its
    # report then holds zero counts, so that merging all N still works.
    prompts = prompts[cfg.shard_index :: cfg.num_shards]
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    def decode_turn(base_ids: list[int], spec_ids: list[int], max_new: int):
        base = target_generate(model, torch.tensor([base_ids], device=device), max_new_tokens=max_new,
                               eos_ids=eos, temperature=cfg.temperature, generator=generator)
        spec_out = speculative_generate(model, runner, torch.tensor([spec_ids], device=device), layer_ids=layer_ids,
                                        draft_tokens=k, max_new_tokens=max_new, eos_ids=eos,
                                        temperature=cfg.temperature, generator=generator, draft_dtype=dtype)
        return base, spec_out

    if cfg.warmup and prompts:  # first calls pay for allocator growth and kernel selection; keep them out of timings
        warm = render_generation_prompt(tokenizer, [{"role": "user", "content": prompts[0].turns[0]}])
        decode_turn(warm, warm, 8)

    stats = AcceptanceStats(k)
    base_tokens = spec_tokens = base_forwards = spec_forwards = 0
    base_seconds = spec_seconds = 0.0
    mismatches: list[dict[str, Any]] = []
    turns_done = 0
    total_turns = sum(len(p.turns) for p in prompts)
    bar = tqdm(total=total_turns, desc="eval", unit="turn", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for record in prompts:
            base_history: list[dict[str, str]] = []
            spec_history: list[dict[str, str]] = []
            for turn_index, turn in enumerate(record.turns):
                base_history.append({"role": "user", "content": turn})
                spec_history.append({"role": "user", "content": turn})
                # Each side continues its own conversation; at temperature 0 they agree whenever
                # greedy equality holds.
                base, spec_out = decode_turn(render_generation_prompt(tokenizer, base_history),
                                             render_generation_prompt(tokenizer, spec_history), cfg.max_new_tokens)
                stats.add(spec_out.accepted)
                base_tokens += len(base.tokens)
                spec_tokens += len(spec_out.tokens)
                base_seconds += base.seconds
                spec_seconds += spec_out.seconds
                base_forwards += base.target_forwards
                spec_forwards += spec_out.target_forwards
                if cfg.temperature == 0 and spec_out.tokens != base.tokens:
                    mismatches.append({
                        "record_index": record.record_index,
                        "turn": turn_index,
                        "first_divergence": _first_divergence(spec_out.tokens, base.tokens),
                    })
                base_history.append({"role": "assistant", "content": tokenizer.decode(base.tokens, skip_special_tokens=True).strip()})
                spec_history.append({"role": "assistant", "content": tokenizer.decode(spec_out.tokens, skip_special_tokens=True).strip()})
                turns_done += 1
                bar.update(1)
                bar.set_postfix(tau=f"{stats.tau:.2f}", speedup=f"{(spec_tokens / max(spec_seconds, 1e-9)) / max(base_tokens / max(base_seconds, 1e-9), 1e-9):.2f}")
    finally:
        bar.close()

    meta = {
        "draft": str(export_dir),
        "target": spec,
        "prompts": cfg.prompts,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "aux_layer_ids": list(layer_ids),
        "draft_tokens": k,
        "temperature": cfg.temperature,
        "max_new_tokens": cfg.max_new_tokens,
        "simulated_tau": simulated_tau,
        "simulated_tau_depth": simulated_depth,
        "shard": {"index": cfg.shard_index, "count": cfg.num_shards},
        "draft_config_sha256": hashlib.sha256((export_dir / "config.json").read_bytes()).hexdigest(),
        "limit": cfg.limit,
        "seed": cfg.seed,
        "prompt_total": prompt_total,
    }
    totals = {
        "prompt_count": len(prompts),
        "turns": turns_done,
        "accept_histogram": list(stats.histogram),
        "generated_tokens": spec_tokens,
        "baseline_generated_tokens": base_tokens,
        "target_forwards": spec_forwards,
        "baseline_target_forwards": base_forwards,
        "seconds": round(spec_seconds, 3),
        "baseline_seconds": round(base_seconds, 3),
        "mismatches": mismatches,
        "warnings": warnings,
    }
    report = _report(meta, totals)
    return _write_report(report, cfg.report_path, cfg.plot_path)


# ---------------------------------------------------------------------------- reports
# Fields every shard of one evaluation must agree on before its counts may be added up.
# The draft is compared by its export's config.json (which records its training run and target),
# not by path, so shards run from other folders or hosts still merge.
_SAME_IN_EVERY_SHARD = ("draft_config_sha256", "target", "prompts", "dtype", "aux_layer_ids", "draft_tokens",
                        "temperature", "max_new_tokens", "limit", "seed", "prompt_total")
_SUMMED = ("prompt_count", "turns", "generated_tokens", "baseline_generated_tokens", "target_forwards",
           "baseline_target_forwards", "seconds", "baseline_seconds")


def _report(meta: dict[str, Any], totals: dict[str, Any]) -> dict[str, Any]:
    """The report of an evaluation from its settings and raw counts (one shard or merged)."""
    stats = AcceptanceStats(int(meta["draft_tokens"]), list(totals["accept_histogram"]))
    # With no verification round at all (every answer ended at the prefill) τ is undefined.
    tau = stats.tau if stats.rounds else None
    tokens_per_s = totals["generated_tokens"] / max(totals["seconds"], 1e-9)
    baseline_tokens_per_s = totals["baseline_generated_tokens"] / max(totals["baseline_seconds"], 1e-9)
    return {
        **meta,
        **totals,
        "tau": round(tau, 4) if tau is not None else None,
        "per_position_acceptance": [round(p, 4) for p in stats.per_position_acceptance()] if stats.rounds else [],
        "rounds": stats.rounds,
        "tokens_per_target_forward": round(totals["generated_tokens"] / max(totals["target_forwards"], 1), 4),
        "tokens_per_s": round(tokens_per_s, 2),
        "baseline_tokens_per_s": round(baseline_tokens_per_s, 2),
        "speedup": round(tokens_per_s / max(baseline_tokens_per_s, 1e-9), 4),
        # Checked only at temperature 0, where the target's own output is deterministic.
        "greedy_equal": (not totals["mismatches"]) if meta["temperature"] == 0 else None,
    }


def _write_report(report: dict[str, Any], report_path: Path, plot_path: Path) -> dict[str, Any]:
    shard = report.get("shard") or {"count": 1}
    part = f", shard {shard['index'] + 1}/{shard['count']}" if shard["count"] > 1 else ""
    title = (f"{Path(report['draft']).resolve().parent.name}/{Path(report['draft']).name} on "
             f"{Path(report['prompts']).name} (K={report['draft_tokens']}, T={report['temperature']:g}{part})")
    report["plot"] = str(plot_acceptance(plot_path, report["per_position_acceptance"], tau=report["tau"],
                                         simulated_tau=report["simulated_tau"], title=title))
    report["report"] = str(report_path)
    write_json_atomic(report_path, report)
    return report


def merge_eval_reports(paths: list[Path], report_path: Path, plot_path: Path | None = None) -> dict[str, Any]:
    """Add up the shard reports of one evaluation (``talon eval --shard-index I --num-shards N``).

    Refuses reports of different drafts or settings, a shard given twice, and missing shards,
    naming the file.  Speeds are summed tokens over summed seconds: each shard's speculative and
    baseline timings come from the same process under the same load, so their ratio stays fair
    when shards share a card.
    """
    if not paths:
        raise ValueError("no reports to merge")
    reports = []
    for path in paths:
        try:
            reports.append((Path(path), json.loads(Path(path).read_text())))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable eval report ({err})") from None
    first_path, first = reports[0]
    count = (first.get("shard") or {"count": 1})["count"]
    seen: dict[int, Path] = {}
    for path, report in reports:
        missing = [key for key in (*_SAME_IN_EVERY_SHARD, *_SUMMED, "accept_histogram", "mismatches") if key not in report]
        if missing:
            raise ValueError(f"{path}: not an eval report (missing {', '.join(missing)})")
        differ = [key for key in _SAME_IN_EVERY_SHARD if report[key] != first[key]]
        if differ:
            raise ValueError(f"{path}: {', '.join(f'{k}={report[k]!r}' for k in differ)} differs from {first_path} "
                             f"({', '.join(f'{k}={first[k]!r}' for k in differ)}); these are not shards of one evaluation")
        shard = report.get("shard") or {"index": 0, "count": 1}
        if not 0 <= shard["index"] < shard["count"]:
            raise ValueError(f"{path}: shard index {shard['index']} is outside 0..{shard['count'] - 1}")
        if shard["count"] != count:
            raise ValueError(f"{path}: shard of {shard['count']}, but {first_path} is a shard of {count}")
        if shard["index"] in seen:
            raise ValueError(f"{path}: shard {shard['index']} given twice (also {seen[shard['index']]})")
        seen[shard["index"]] = path
    absent = sorted(set(range(count)) - set(seen))
    if absent:
        raise ValueError(f"cannot merge: shard(s) {absent} of {count} missing")
    meta = {key: first[key] for key in ("draft", *_SAME_IN_EVERY_SHARD, "simulated_tau", "simulated_tau_depth")}
    meta["device"] = ", ".join(sorted({r["device"] for _, r in reports}))
    meta["shard"] = {"index": 0, "count": 1, "merged_from": count}
    histograms = [r["accept_histogram"] for _, r in reports]
    totals: dict[str, Any] = {key: sum(r[key] for _, r in reports) for key in _SUMMED}
    totals["seconds"] = round(totals["seconds"], 3)
    totals["baseline_seconds"] = round(totals["baseline_seconds"], 3)
    totals["accept_histogram"] = [sum(column) for column in zip(*histograms)]
    totals["mismatches"] = sorted((m for _, r in reports for m in r["mismatches"]),
                                  key=lambda m: (m["record_index"], m["turn"]))
    totals["warnings"] = sorted({w for _, r in reports for w in r.get("warnings", [])})
    if totals["prompt_count"] != first["prompt_total"]:
        raise ValueError(f"the shards hold {totals['prompt_count']} prompts, the prompt set has {first['prompt_total']}")
    plot = plot_path if plot_path is not None else Path(report_path).with_suffix(".png")
    return _write_report(_report(meta, totals), Path(report_path), plot)
