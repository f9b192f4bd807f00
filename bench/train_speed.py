"""Training throughput, side by side in one process (issue #6): draft step, from the cache, online.

1. A synthetic cache of the target shape is written through the real extraction writer
   (:mod:`bench.synthetic_cache`: random bf16 aux states, random top-k; no target model).
2. For every ``--batch-tokens`` budget (default ``2048,8192``: the anchor's T=2048 x batch 1,
   then our default budget; samples are ``--seq`` tokens long):

   * ``draft``  the draft step alone: ``Eagle3TrainerModule`` forward + backward + grad clip +
     AdamW (the draft and module built as the trainer builds them) on batches already resident
     in GPU memory;
   * ``cache``  the real training entry point, ``stage_train.trainer.run_train`` with a
     ``TrainConfig`` (top-k teacher), reading the Zarr shards; tok/s from its log windows after
     the first (``--warmup`` steps), and the whole-run figure from its summary;
   * ``online`` a random-weight target of the same shape built on the device, its forward
     through the extractor's own capture and top-k (``stage_extract.features.extract_batch``),
     then the same draft step, on the same token ids.

Prints a markdown table naming the card, the ratios cache/draft and cache/online, peak memory
per mode, and on an H200 the comparison with the NeMo AutoModel anchor (draft step 17.4k tok/s,
online 11.3k tok/s, Llama-3.1-8B shapes, T=2048, batch 1).  ``--out`` gets the results as JSON.

    python bench/train_speed.py --device cuda --out $OUT/train_speed.json          # 8B shape
    python bench/train_speed.py --device cpu --hidden 64 --layers 4 --vocab 1000 --draft-vocab 256 \\
        --seq 128 --batch-tokens 128,256 --steps 3 --warmup 1                     # CPU smoke
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import inspect
import json
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, resolve, sync  # noqa: E402
from bench.synthetic_cache import (  # noqa: E402
    add_cache_args, add_shape_args, build_random_llama, ensure_cache, request_from_args, shape_from_args,
)

ANCHOR = {"card": "H200", "draft_step": 17_400.0, "online": 11_300.0}
GOALS = {"cache_tok_s": 26_000.0, "cache_over_anchor_draft": 1.5, "cache_over_online": 2.0}
MODES = ("draft", "cache", "online")
OPTIONAL_FIELDS = ("attention", "gradient_checkpointing", "soft_ce", "compile_step")  # TrainConfig fields being added concurrently


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def train_options(args: argparse.Namespace) -> dict:
    """The optional TrainConfig fields asked for, refused when this checkout's TrainConfig lacks them."""
    from pipeline.config import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    asked = {"attention": args.attention, "gradient_checkpointing": args.gradient_checkpointing, "soft_ce": args.soft_ce,
             "compile_step": args.compile_step}
    options = {}
    for name, value in asked.items():
        if value is None:
            continue
        if name not in known:
            raise SystemExit(f"error: --{name.replace('_', '-')} was given, but this checkout's TrainConfig has no "
                             f"{name!r} field yet (fields: {', '.join(sorted(known))})")
        options[name] = value
    return options


def effective_options(options: dict) -> dict:
    """The optional fields' values the trainer will use (given, else the TrainConfig default)."""
    from pipeline.config import TrainConfig

    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in OPTIONAL_FIELDS:
            out[f.name] = options.get(f.name, f.default)
    return out


def accepted(fn, options: dict) -> dict:
    """The options ``fn`` takes as keyword arguments."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in options.items() if k in params}


class Peak:
    """Peak device memory of one mode (GiB); the current allocation is the mode's floor."""

    def __init__(self, device):
        self.device = device
        self.gib = None

    def __enter__(self):
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            sync(self.device)
            self.gib = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        return False


def build_module(template, ttt_steps: int, device, options: dict, grad_clip: float, lr: float):
    """The trainer's module and optimizer for a fresh copy of ``template``, configured as
    ``stage_train.trainer`` configures it (attention backend resolved the same way, the same
    constructor options, the same AdamW settings); returns what was applied."""
    import torch

    import stage_train.trainer as trainer
    from stage_train.core import Eagle3TrainerModule

    draft = copy.deepcopy(template)
    applied = {}
    if "attention" in options and hasattr(draft, "set_attention_backend"):
        applied["attention"] = trainer.resolve_attention(options["attention"], device, draft.config.head_dim)
        draft.set_attention_backend(applied["attention"])
    if options.get("compile_step", False) is None:  # unset: resolved as the trainer resolves it
        applied["compile_step"] = device.type == "cuda"
    kwargs = accepted(Eagle3TrainerModule.__init__, {k: v for k, v in options.items() if k not in applied})
    if "compile_step" in applied:
        kwargs["compile_step"] = applied["compile_step"]
    applied.update(kwargs)
    module = Eagle3TrainerModule(draft, selected_token_ids=draft.draft_to_target_ids(), selected_token_mask=draft.t2d,
                                 ttt_steps=ttt_steps, **kwargs).to(device)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step(inputs: dict):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            metrics = module(**inputs)
            metrics.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        return metrics

    return module, optimizer, step, applied


def timed(step_fn, items: list, warmup: int, steps: int, device) -> dict:
    """Run ``warmup`` then ``steps`` steps over ``items`` (cycled); tok/s of the timed steps."""
    for i in range(warmup):
        step_fn(items[i % len(items)])
    sync(device)
    started = time.perf_counter()
    tokens = 0
    for i in range(steps):
        item = items[(warmup + i) % len(items)]
        step_fn(item)
        tokens += item["n_tokens"]
    sync(device)
    seconds = time.perf_counter() - started
    return {"tokens_per_second": round(tokens / seconds, 1), "tokens": tokens, "seconds": round(seconds, 3),
            "steps": steps, "warmup_steps": warmup}


# Kernel (or, on CPU, operator) names -> where the draft step's time goes.  First match wins.
PROFILE_CATEGORIES = (
    ("attention (flex / sdpa)", ("flex", "attention", "triton_tem", "fmha", "sdpa")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
    ("softmax / soft CE / top-k target", ("softmax", "logsumexp", "gather", "scatter", "log_softmax", "argmax", "nll")),
    ("optimizer + grad clip", ("adam", "foreach", "multi_tensor")),
    ("copies / casts", ("copy", "cast", "to_copy", "memcpy", "memset", "fill")),
)


def profile_step(step_fn, items: list, steps: int, device, top: int = 15) -> dict:
    """Device time of ``steps`` steps by kernel (CUDA) or operator (CPU), and by category."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step_fn(items[0])  # one untimed step outside the profile
    sync(device)
    with profile(activities=activities) as prof:
        for i in range(steps):
            step_fn(items[i % len(items)])
        sync(device)
    events = prof.key_averages()

    def on_device(event) -> bool:
        return getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA

    # On CUDA, only the kernels themselves: the CPU op that launched a kernel also carries its
    # device time, and counting both would double it.  On CPU, the aten ops' own time.
    if cuda:
        rows = [(e.key, float(getattr(e, "self_device_time_total", 0.0) or 0.0), e.count) for e in events if on_device(e)]
    else:
        rows = [(e.key, float(e.self_cpu_time_total), e.count) for e in events if e.key.startswith("aten::")]
    rows = [r for r in rows if r[1] > 0]
    total = sum(r[1] for r in rows) or 1.0
    categories: dict[str, float] = {}
    for name, us, _ in rows:
        lowered = name.lower()
        label = next((label for label, keys in PROFILE_CATEGORIES if any(k in lowered for k in keys)), "other elementwise")
        categories[label] = categories.get(label, 0.0) + us
    rows.sort(key=lambda r: -r[1])
    return {
        "steps": steps,
        "clock": "device" if cuda else "cpu self time of aten ops",
        "ms_per_step": round(total / 1000 / steps, 2),
        "share_by_category": {k: round(v / total, 4) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n[:120], "share": round(us / total, 4), "calls": c} for n, us, c in rows[:top]],
    }


def cache_batches(reader, batch_tokens: int, count: int, names):
    """``count`` batches of the cache under the token budget (the trainer's batching)."""
    import numpy as np

    from pipeline.batching import shuffled_bucket_batches
    from stage_train.data import load_batch

    plan = shuffled_bucket_batches(reader.lengths, batch_tokens, np.random.default_rng(0))
    raw = accepted(load_batch, {"raw": True})  # as the trainer reads: fp8 stays codes + scales until on the device
    return [load_batch(reader, b, None, names, **raw) for b in plan[: max(1, count)]]


def bench_draft(template, batches, args, device, options) -> dict:
    from stage_train.trainer import shifted_inputs

    with Peak(device) as peak:
        module, optimizer, step, applied = build_module(template, args.ttt_steps, device, options, args.grad_clip, args.lr)
        items = []
        for batch in batches:
            on_device = batch.to(device)
            items.append({"inputs": shifted_inputs(on_device, device), "n_tokens": batch.n_tokens})
        sync(device)
        result = timed(lambda item, step=step: step(item["inputs"]), items, args.warmup, args.steps, device)
        if args.profile:
            result["profile"] = profile_step(lambda item, step=step: step(item["inputs"]), items, args.profile, device)
        del module, optimizer, step, items
    result.update(peak_gib=peak.gib, batch_shape=list(batches[0].input_ids.shape), options_applied=applied)
    return result


def bench_cache(cache: Path, batch_tokens: int, work: Path, args, device, options) -> dict:
    from pipeline.config import TrainConfig
    from stage_train.trainer import run_train

    out = work / f"run-{batch_tokens}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(
        cache=cache, out=out, ttt_steps=args.ttt_steps, draft_vocab=args.draft_vocab, max_steps=args.warmup + args.steps,
        lr=args.lr, grad_clip=args.grad_clip, batch_tokens=batch_tokens, device=device.type, log_every=args.warmup,
        teacher="topk", progress=False, **options,
    )
    with Peak(device) as peak:
        summary = run_train(cfg)
    windows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [w for w in windows[1:] if w.get("tokens") and w.get("tokens_per_second")]
    steady_rate = None
    if steady:
        tokens = sum(w["tokens"] for w in steady)
        steady_rate = round(tokens / sum(w["tokens"] / w["tokens_per_second"] for w in steady), 1)
    result = {
        "tokens_per_second": steady_rate if steady_rate is not None else summary["tokens_per_second"],
        "steady_state": steady_rate is not None,
        "steady_steps": windows[-1]["step"] - windows[0]["step"] if steady else 0,
        "whole_run_tokens_per_second": summary["tokens_per_second"],
        "whole_run_seconds": summary["seconds"],
        "tokens": summary["tokens"],
        "steps": summary["steps"],
        "window_tokens_per_second": [w.get("tokens_per_second") for w in windows],
        "final_loss": (summary.get("final") or {}).get("loss"),
        "attention": summary.get("attention"),
        "peak_gib": peak.gib,
        "train_config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
    }
    if not args.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
    return result


def bench_online(model, template, batches, layer_ids, args, device, options) -> dict:
    import torch

    from stage_extract.features import extract_batch, real_token_index
    from stage_train.data import FeatureBatch
    from stage_train.trainer import shifted_inputs

    def online_inputs(item):
        feats = extract_batch(model, item["ids"], item["mask"], layer_ids=layer_ids, top_k=args.top_k,
                              lengths=item["lengths"])
        bsz, width = item["ids"].shape

        def padded(rows: torch.Tensor) -> torch.Tensor:  # real-token rows back to [B, T, ...], out of inference mode
            if item["index"] is None:
                return rows.clone().view(bsz, width, -1)
            full = torch.zeros((bsz * width, rows.shape[-1]), dtype=rows.dtype, device=rows.device)
            return full.index_copy_(0, item["index"], rows).view(bsz, width, -1)

        batch = FeatureBatch(input_ids=item["ids"], attention_mask=item["mask"], loss_mask=item["loss_mask"],
                             aux_hidden_states=padded(feats.aux_hidden), topk_ids=padded(feats.topk_ids).long(),
                             topk_logprobs=padded(feats.topk_logprobs), n_tokens=item["n_tokens"])
        return shifted_inputs(batch, device)

    with Peak(device) as peak:
        module, optimizer, step, applied = build_module(template, args.ttt_steps, device, options, args.grad_clip, args.lr)
        items = []
        for batch in batches:
            lengths = batch.attention_mask.sum(dim=1).tolist()
            width = batch.input_ids.shape[1]
            index = None if all(n == width for n in lengths) else real_token_index(lengths, width).to(device)
            items.append({"ids": batch.input_ids.to(device), "mask": batch.attention_mask.to(device),
                          "loss_mask": batch.loss_mask.to(device), "lengths": lengths, "index": index,
                          "n_tokens": batch.n_tokens})
        result = timed(lambda item, step=step: step(online_inputs(item)), items, args.warmup, args.steps, device)
        del module, optimizer, step, items
    result.update(peak_gib=peak.gib, options_applied=applied)
    return result


def allow_recompiles(limit: int = 64) -> dict:
    """Every mode builds a fresh draft, and each wraps flex_attention in its own torch.compile; raise
    dynamo's per-function recompile limit (8) so no later mode silently falls back to the unfused
    eager flex_attention.  Returns the limits now in force."""
    try:
        import torch._dynamo.config as dynamo_config
    except ImportError:
        return {}
    limits = {}
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), limit))
            limits[name] = getattr(dynamo_config, name)
    return limits


def log_profile(batch_tokens: int, prof: dict) -> None:
    log(f"[profile] batch {batch_tokens}: {prof['ms_per_step']} ms/step of {prof['clock']} time")
    for label, share in prof["share_by_category"].items():
        log(f"[profile]   {share:6.1%}  {label}")
    for row in prof["top"]:
        log(f"[profile]     {row['share']:6.1%}  x{row['calls']:<5} {row['name']}")


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument("--cache", type=Path, default=None, help="synthetic cache directory: reused when complete with the "
                        "same settings, else built there (default: a temp dir, removed at the end)")
    parser.add_argument("--work", type=Path, default=None, help="where temp caches and runs go (default: the system temp dir)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of draft,cache,online")
    parser.add_argument("--batch-tokens", default="2048,8192", help="comma-separated token budgets per step")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode and budget")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (the trainer's first log window)")
    parser.add_argument("--ttt-steps", type=int, default=7)
    parser.add_argument("--draft-vocab", type=int, default=32000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--grad-clip", type=float, default=0.5)
    parser.add_argument("--batches", type=int, default=4, help="distinct resident batches cycled by the draft/online modes")
    parser.add_argument("--attention", default=None, help="TrainConfig.attention (auto|eager|flex), when this checkout has it")
    parser.add_argument("--gradient-checkpointing", default=None, action=argparse.BooleanOptionalAction,
                        help="TrainConfig.gradient_checkpointing, when this checkout has it")
    parser.add_argument("--soft-ce", default=None, help="TrainConfig.soft_ce (reference|fused), when this checkout has it")
    parser.add_argument("--compile-step", default=None, action=argparse.BooleanOptionalAction,
                        help="TrainConfig.compile_step (torch.compile around the attention), when this checkout has it")
    parser.add_argument("--keep-runs", action="store_true", help="keep the trainer's run folders under --work")
    parser.add_argument("--writer-threads", type=int, default=None, help="cache writer threads (default: the extractor's)")
    parser.add_argument("--profile", type=int, default=0, help="after timing the draft step, profile this many more steps "
                        "and print where the device time goes (kernel categories and the top kernels)")
    add_shape_args(parser)
    add_cache_args(parser)
    args = parser.parse_args()

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes takes a comma-separated subset of {','.join(MODES)}")
    try:
        budgets = [int(b) for b in args.batch_tokens.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch-tokens takes comma-separated integers, got {args.batch_tokens!r}")
    if not budgets or min(budgets) < args.seq:
        parser.error(f"every --batch-tokens budget must be at least --seq ({args.seq}) so a sample fits")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    shape = shape_from_args(args)
    if not 2 <= args.draft_vocab <= shape.vocab:
        parser.error(f"--draft-vocab must be in [2, --vocab={shape.vocab}]")

    import torch
    import transformers

    from pipeline.runtime import compute_dtype
    from schemas.manifest import read_manifest
    from schemas.store import CacheReader
    from stage_train.data import fields_for_teacher
    from stage_train.trainer import build_draft

    options = train_options(args)  # given on the command line: passed to TrainConfig
    dynamo_limits = allow_recompiles()
    effective = effective_options(options)  # what the trainer uses: also offered to the draft/online module
    device = resolve(args.device)
    cuda = device.type == "cuda"
    card = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    work = Path(tempfile.mkdtemp(prefix="talon-train-speed-", dir=args.work))
    cache_path = args.cache or work / "cache"
    tokens = args.cache_tokens or (args.warmup + args.steps + 1) * max(budgets)
    req = request_from_args(args, shape, tokens)
    results: dict = {
        "card": card, "device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
        "shape": dataclasses.asdict(shape), "shape_label": shape.label(), "draft_vocab": args.draft_vocab,
        "top_k": args.top_k, "ttt_steps": args.ttt_steps, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
        "autocast": "bf16" if cuda else "none (fp32)", "train_options": effective, "train_options_given": options,
        "dynamo_limits": dynamo_limits,
        "budgets": [],
    }
    started = time.perf_counter()
    try:
        results["cache"] = ensure_cache(cache_path, req, device, writer_threads=args.writer_threads, log=log)
        manifest = read_manifest(cache_path)
        reader = CacheReader(cache_path, manifest)
        names = fields_for_teacher(reader, "topk")
        template = None
        if "draft" in modes or "online" in modes:
            template, coverage = build_draft(manifest, cache_path, args.draft_vocab)
            results["draft_vocab_coverage"] = round(coverage, 4)
        loaded = {b: cache_batches(reader, b, args.batches, names) for b in budgets} if template is not None else {}
        rows = {b: {"batch_tokens": b} for b in budgets}
        for b in budgets:
            if "draft" in modes:
                log(f"[draft] batch {b} tokens ...")
                rows[b]["draft"] = bench_draft(template, loaded[b], args, device, effective)
                log(f"[draft] {rows[b]['draft']['tokens_per_second']:,.0f} tok/s")
                if "profile" in rows[b]["draft"]:
                    log_profile(b, rows[b]["draft"]["profile"])
            if "cache" in modes:
                log(f"[cache] batch {b} tokens: run_train, {args.warmup + args.steps} steps ...")
                rows[b]["cache"] = bench_cache(cache_path, b, work, args, device, options)
                log(f"[cache] {rows[b]['cache']['tokens_per_second']:,.0f} tok/s steady, "
                    f"{rows[b]['cache']['whole_run_tokens_per_second']:,.0f} whole run")
        if "online" in modes:
            built = time.perf_counter()
            model = build_random_llama(shape, device, compute_dtype(device), seed=args.seed)
            sync(device)
            results["online_target_build_seconds"] = round(time.perf_counter() - built, 2)
            log(f"[online] random {shape.label()} target built in {results['online_target_build_seconds']} s")
            for b in budgets:
                log(f"[online] batch {b} tokens ...")
                rows[b]["online"] = bench_online(model, template, loaded[b], manifest.settings.layer_ids, args, device, effective)
                log(f"[online] {rows[b]['online']['tokens_per_second']:,.0f} tok/s")
            del model
        for b in budgets:
            row = rows[b]
            rate = {m: row[m]["tokens_per_second"] for m in MODES if m in row}
            row["ratios"] = {"cache_over_draft": ratio(rate.get("cache"), rate.get("draft")),
                             "cache_over_online": ratio(rate.get("cache"), rate.get("online"))}
            if "H200" in card:
                row["anchor"] = {
                    "cache_over_anchor_draft_step": ratio(rate.get("cache"), ANCHOR["draft_step"]),
                    "online_over_anchor_online": ratio(rate.get("online"), ANCHOR["online"]),
                    "draft_over_anchor_draft_step": ratio(rate.get("draft"), ANCHOR["draft_step"]),
                }
            results["budgets"].append(row)
    finally:
        if args.cache is None:
            shutil.rmtree(cache_path, ignore_errors=True)
        if not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    report(results, modes)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        log(f"results written to {args.out}")


def report(results: dict, modes: list[str]) -> None:
    def rate(row, mode, key="tokens_per_second"):
        return row[mode][key] if mode in row else "-"

    def peak(row, mode):
        value = row.get(mode, {}).get("peak_gib")
        return "-" if value is None else f"{value:.1f}"

    cache = results["cache"]
    resolved = next((row["cache"].get("attention") for row in results["budgets"] if "cache" in row), None)
    opts = ", ".join(f"{k}={v}" + (f" ({resolved})" if k == "attention" and resolved and resolved != v else "")
                     for k, v in results["train_options"].items()) or "defaults"
    print(f"\n### Training speed on {results['card']}: {results['shape_label']}, draft vocab {results['draft_vocab']}, "
          f"top-{results['top_k']}, K={results['ttt_steps']}, samples of {results['seq']} tokens, autocast "
          f"{results['autocast']}, torch {results['torch']}, trainer options: {opts}\n")
    print(f"Cache: {cache['tokens']:,} tokens, {cache['bytes_per_token'] / 1024:.2f} KiB/token"
          + (" (reused)" if cache["reused"] else f", built in {cache['build_seconds']} s")
          + f"; {results['warmup']} warm-up + {results['steps']} timed steps per mode.\n")
    header = ["batch tokens (shape)", "draft step tok/s", "from cache tok/s (steady)", "from cache, whole run",
              "online tok/s", "cache / draft", "cache / online (goal >= 2)", "peak GiB draft / cache / online"]
    rows = []
    for row in results["budgets"]:
        shape = row.get("draft", {}).get("batch_shape")
        rows.append([
            f"{row['batch_tokens']}" + (f" ({shape[0]}x{shape[1]})" if shape else ""),
            rate(row, "draft"), rate(row, "cache"), rate(row, "cache", "whole_run_tokens_per_second"), rate(row, "online"),
            row["ratios"]["cache_over_draft"] or "-", row["ratios"]["cache_over_online"] or "-",
            f"{peak(row, 'draft')} / {peak(row, 'cache')} / {peak(row, 'online')}",
        ])
    print(markdown_table(header, rows))
    if "H200" in results["card"]:
        print(f"\nAgainst NeMo AutoModel's minimal EAGLE-3 trainer on an H200 (draft step {ANCHOR['draft_step']:,.0f} "
              f"tok/s, online {ANCHOR['online']:,.0f} tok/s; 8B shapes, T=2048, batch 1):\n")
        header = ["batch tokens", "from cache / anchor draft step (goal >= 1.5, i.e. >= 26k tok/s)",
                  "our draft step / anchor draft step", "our online / anchor online"]
        print(markdown_table(header, [[row["batch_tokens"], row["anchor"]["cache_over_anchor_draft_step"] or "-",
                                       row["anchor"]["draft_over_anchor_draft_step"] or "-",
                                       row["anchor"]["online_over_anchor_online"] or "-"] for row in results["budgets"]]))
    else:
        print(f"\n(The anchor comparison is printed only on an H200; this card is {results['card']}.)")
    applied = [set(row[m].get("options_applied", {})) for row in results["budgets"] for m in ("draft", "online") if m in row]
    used = set(results["train_options"])
    missed = sorted(set().union(*(used - a for a in applied))) if applied else []
    if missed:
        print(f"\nNote: the trainer ('cache') runs with {opts}; the draft/online modes build the module through the "
              f"constructors, which do not take {', '.join(missed)}, so they ran with the module's own default for it.")
    print(f"\nWall time {results['wall_seconds']} s.")


if __name__ == "__main__":
    main()
