"""Data-parallel training throughput: 1 process against N (torchrun) on the same machine (issue #6).

Builds (or reuses, ``--cache``) a synthetic cache of the target shape through the real writer
(:mod:`bench.synthetic_cache`), then runs the real CLI twice on it with the same per-rank batch
and the same number of steps:

    python -m pipeline train --cache C --out W/run-1gpu --device D ... --json
    torchrun --standalone --nproc-per-node N -m pipeline train --cache C --out W/run-Ngpu ... --json

and prints a table: processes, global tok/s (steady state: the trainer's log windows after the
first ``--warmup`` steps, summed over ranks; and the whole-run figure of ``summary.json``), tok/s
per GPU and the scaling efficiency ``tok/s_N / (N * tok/s_1)``.  Under torchrun every rank takes
the GPU of its ``LOCAL_RANK`` (``pipeline.runtime.Runtime``), rank 0 writes ``summary.json`` /
``metrics.jsonl`` and prints the JSON summary.  ``--attention`` / ``--gradient-checkpointing``
reach both runs through a ``--config`` TOML file, when this checkout's TrainConfig has the field.

    python bench/multi_gpu_train.py --device cuda --out $OUT/multi_gpu.json             # 8B shape, 2 GPUs
    python bench/multi_gpu_train.py --device cpu --hidden 64 --layers 4 --vocab 1000 --draft-vocab 256 \\
        --seq 128 --batch-tokens 256 --steps 4 --warmup 2                                # CPU smoke (gloo)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synthetic_cache import add_cache_args, add_shape_args, request_from_args, shape_from_args  # noqa: E402

OPTIONAL_FIELDS = ("attention", "gradient_checkpointing")
# The GPU hosts keep NVLink multicast off (it can take shared GPUs out of service); the children
# get these values whatever the caller's environment says.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def train_fields() -> set[str]:
    from pipeline.config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def run_logged(cmd: list[str], env: dict, log_path: Path, timeout: int) -> str:
    """Run ``cmd``; stderr goes to ``log_path``, stdout is returned (the commands print JSON there)."""
    log("$ " + " ".join(cmd))
    started = time.perf_counter()
    with log_path.open("w") as handle:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=handle, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            fail(f"{cmd[0]} ... ran past {timeout} s; its output is in {log_path}")
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        fail(f"the command exited with {proc.returncode} after {time.perf_counter() - started:.0f} s; last lines of "
             f"{log_path}:\n  " + "\n  ".join(tail))
    log(f"  done in {time.perf_counter() - started:.1f} s")
    return proc.stdout


def read_run(run: Path) -> dict:
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        fail(f"{summary_path} is missing: the run did not finish")
    summary = json.loads(summary_path.read_text())
    windows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [w for w in windows[1:] if w.get("tokens") and w.get("tokens_per_second")]
    rate = None
    if steady:  # window tokens are summed over ranks, so this is the global rate
        rate = sum(w["tokens"] for w in steady) / sum(w["tokens"] / w["tokens_per_second"] for w in steady)
    return {
        "world_size": summary["world_size"],
        "tokens_per_second": round(rate, 1) if rate else summary["tokens_per_second"],
        "steady_state": rate is not None,
        "whole_run_tokens_per_second": summary["tokens_per_second"],
        "whole_run_seconds": summary["seconds"],
        "tokens": summary["tokens"],
        "steps": summary["steps"],
        "attention": summary.get("attention"),
        "window_tokens_per_second": [w.get("tokens_per_second") for w in windows],
        "final_loss": (summary.get("final") or {}).get("loss"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (NCCL) or cpu (gloo, smoke test)")
    parser.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of the data-parallel run")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument("--cache", type=Path, default=None, help="synthetic cache directory: reused when complete with the "
                        "same settings, else built there (default: under --work, removed at the end)")
    parser.add_argument("--work", type=Path, default=None, help="where runs and logs go, kept (default: a temp dir, "
                        "removed after a successful run, kept after a failure)")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per step and rank")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5, help="steps of the first log window, left out of the steady rate")
    parser.add_argument("--ttt-steps", type=int, default=7)
    parser.add_argument("--draft-vocab", type=int, default=32000)
    parser.add_argument("--attention", default=None, help="TrainConfig.attention (auto|eager|flex), when this checkout has it")
    parser.add_argument("--gradient-checkpointing", default=None, action=argparse.BooleanOptionalAction,
                        help="TrainConfig.gradient_checkpointing, when this checkout has it")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP for the N-process run")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per run")
    parser.add_argument("--writer-threads", type=int, default=None, help="cache writer threads (default: the extractor's)")
    add_shape_args(parser)
    add_cache_args(parser)
    args = parser.parse_args()
    if args.nproc < 2:
        parser.error("--nproc must be at least 2")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    if args.batch_tokens < args.seq:
        parser.error(f"--batch-tokens ({args.batch_tokens}) must be at least --seq ({args.seq}) so a sample fits")
    shape = shape_from_args(args)
    if not 2 <= args.draft_vocab <= shape.vocab:
        parser.error(f"--draft-vocab must be in [2, --vocab={shape.vocab}]")

    fields = train_fields()
    options = {}
    for name in OPTIONAL_FIELDS:
        value = getattr(args, name)
        if value is None:
            continue
        if name not in fields:
            fail(f"--{name.replace('_', '-')} was given, but this checkout's TrainConfig has no {name!r} field yet")
        options[name] = value

    import torch  # after argument checks, so a bad flag fails fast

    if args.device == "cuda":
        if not torch.cuda.is_available():
            fail("--device cuda, but no CUDA device is visible (use --device cpu for the gloo smoke test)")
        if torch.cuda.device_count() < args.nproc:
            fail(f"--nproc {args.nproc} needs {args.nproc} GPUs; this machine shows {torch.cuda.device_count()}")

    if args.work is not None:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="talon-multi-gpu-"))
    cache = args.cache or work / "cache"
    # One epoch covers the single-process run; the N-process run reads N batches a step and wraps
    # around to the next epoch (still reading the shards) when the cache runs out.
    tokens = args.cache_tokens or (args.warmup + args.steps + 1) * args.batch_tokens
    req = request_from_args(args, shape, tokens)  # validates the cache flags before anything runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for name, value in NO_MULTICAST.items():  # never let a child turn NVLink multicast on
        env[name] = value
    started = time.perf_counter()
    try:
        # The cache is built in a child process, so this one never holds GPU memory during the runs.
        build = [sys.executable, str(ROOT / "bench" / "synthetic_cache.py"), "--out", str(cache), "--device", args.device,
                 "--hidden", str(shape.hidden), "--layers", str(shape.layers), "--heads", str(shape.heads),
                 "--kv-heads", str(shape.kv_heads), "--mlp", str(shape.mlp), "--vocab", str(shape.vocab),
                 "--seq", str(req.seq), "--min-length", str(req.min_length), "--top-k", str(req.top_k),
                 "--cache-tokens", str(req.tokens), "--part-tokens", str(req.part_tokens),
                 "--feature-dtype", req.feature_dtype, "--aux-std", ",".join(map(str, req.aux_std)), "--seed", str(req.seed)]
        if args.writer_threads:
            build += ["--writer-threads", str(args.writer_threads)]
        cache_info = json.loads(run_logged(build, env, work / "cache-build.log", args.timeout))
        log(f"  cache: {cache_info['tokens']:,} tokens" + (" (reused)" if cache_info["reused"] else
                                                           f", built in {cache_info['build_seconds']} s"))
        train_args = ["train", "--cache", str(cache), "--device", args.device, "--max-steps", str(args.warmup + args.steps),
                      "--batch-tokens", str(args.batch_tokens), "--ttt-steps", str(args.ttt_steps),
                      "--draft-vocab", str(args.draft_vocab), "--log-every", str(args.warmup), "--teacher", "topk",
                      "--json", "--no-progress"]
        if options:
            config = work / "train-options.toml"
            config.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in options.items()))
            train_args += ["--config", str(config)]
        runs = {}
        for nproc in (1, args.nproc):
            out = work / f"run-{nproc}"
            shutil.rmtree(out, ignore_errors=True)
            extra = ["--fsdp"] if args.fsdp and nproc > 1 else []
            if nproc == 1:
                cmd = [sys.executable, "-m", "pipeline", *train_args, "--out", str(out)]
            else:  # torchrun, through this interpreter
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                       "-m", "pipeline", *train_args, *extra, "--out", str(out)]
            stdout = run_logged(cmd, env, work / f"run-{nproc}.log", args.timeout)
            (work / f"run-{nproc}.json").write_text(stdout)  # rank 0's JSON summary
            runs[nproc] = read_run(out)
            log(f"  {nproc} process(es): {runs[nproc]['tokens_per_second']:,.0f} tok/s steady, "
                f"{runs[nproc]['whole_run_tokens_per_second']:,.0f} whole run")
            if runs[nproc]["world_size"] != nproc:
                fail(f"the {nproc}-process run reports world size {runs[nproc]['world_size']}")
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)

    card = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if args.device == "cuda"
            else f"cpu ({os.cpu_count()} cores, gloo)")
    one, many = runs[1], runs[args.nproc]
    results = {
        "card": card, "device": args.device, "torch": torch.__version__, "shape": dataclasses.asdict(shape),
        "shape_label": shape.label(), "draft_vocab": args.draft_vocab, "top_k": req.top_k, "ttt_steps": args.ttt_steps,
        "seq": req.seq, "batch_tokens_per_rank": args.batch_tokens, "steps": args.steps, "warmup": args.warmup,
        "train_options_given": options, "parallel": "fsdp" if args.fsdp else "ddp", "cache": cache_info,
        "runs": {str(k): v for k, v in runs.items()},
        "scaling_efficiency": round(many["tokens_per_second"] / (args.nproc * one["tokens_per_second"]), 3),
        "scaling_efficiency_whole_run": round(many["whole_run_tokens_per_second"]
                                              / (args.nproc * one["whole_run_tokens_per_second"]), 3),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "work": str(work),
    }
    attention = one.get("attention")
    opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
    print(f"\n### Data-parallel training on {card}: {shape.label()}, draft vocab {args.draft_vocab}, top-{req.top_k}, "
          f"K={args.ttt_steps}, {args.batch_tokens} tokens per step and rank (samples of {req.seq}), "
          f"{args.warmup} warm-up + {args.steps} timed steps, {results['parallel'].upper()}, trainer options: {opts}"
          + (f" (attention resolved to {attention})" if attention and attention != options.get("attention") else "")
          + f", torch {torch.__version__}\n")
    from bench.common import markdown_table

    rows = []
    for nproc, run in runs.items():
        eff = 1.0 if nproc == 1 else results["scaling_efficiency"]
        eff_whole = 1.0 if nproc == 1 else results["scaling_efficiency_whole_run"]
        rows.append([nproc, run["tokens_per_second"], run["tokens_per_second"] / nproc, run["whole_run_tokens_per_second"],
                     f"{eff:.2f}", f"{eff_whole:.2f}"])
    unit = "GPU" if args.device == "cuda" else "process"
    print(markdown_table(["GPUs" if unit == "GPU" else "processes", "tok/s global (steady)", f"tok/s per {unit}",
                          "tok/s global (whole run)", "scaling efficiency (steady)", "scaling efficiency (whole run)"], rows))
    kept = args.work is not None
    print(f"\nScaling efficiency = tok/s_{args.nproc} / ({args.nproc} x tok/s_1). Wall time {results['wall_seconds']} s"
          + (f"; runs and logs in {work}." if kept else "."))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        log(f"results written to {args.out}")
    if not kept:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
