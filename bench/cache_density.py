"""Bytes per token of each cache array, measured on a real store written by our writer.

By default the features come from a random-weight Llama-3.1-8B-shaped target (hidden 4096,
32 layers, 32/8 heads, MLP 14336, vocab 128256) run over synthetic chats through the real
extraction path (``extract_with_model``), once per storage setting.  On CPU the model is too
big: ``--layers-override 3`` keeps the widths (which decide the bytes) and drops the depth.
``--target smollm2`` measures the real SmolLM2 instead (real features compress better than
random ones; ``--data sharegpt`` uses real chats).  Prints a markdown table.

    python bench/cache_density.py --device cuda                  # H100: full 8B shape, bf16
    python bench/cache_density.py --device cpu --layers-override 3 --tokens 1024
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import aux_layers_for, build_llama_8b, markdown_table, resolve, smollm2_tokenizer, synthetic_chats  # noqa: E402

SETTINGS = [("bf16", "topk"), ("fp8", "topk"), ("bf16", "both"), ("fp8", "both")]
GOALS_KIB = {("bf16", "topk"): 25.0, ("fp8", "topk"): 13.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--target", default="llama8b-random", help="'llama8b-random' (default), 'smollm2' or a local HF folder")
    parser.add_argument("--layers-override", type=int, default=None, help="build the random 8B shape with this many layers (>= 3)")
    parser.add_argument("--data", default=None, help="chat data (default: synthetic chats sized to --tokens)")
    parser.add_argument("--tokens", type=int, default=None, help="about this many tokens per setting (default 16384 on cuda, 1024 on cpu)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--settings", default=",".join(f"{d}/{t}" for d, t in SETTINGS), help="comma-separated dtype/teacher pairs")
    parser.add_argument("--out", type=Path, default=None, help="keep the caches here (default: a temp dir, removed)")
    args = parser.parse_args()

    import torch

    from pipeline.config import ExtractConfig
    from pipeline.inspect_cache import describe_cache
    from pipeline.runtime import compute_dtype
    from stage_extract.run import extract_with_model
    from stage_extract.target import load_target

    device = resolve(args.device)
    dtype = compute_dtype(device)
    tokens = args.tokens or (16384 if device.type == "cuda" else 1024)
    work = Path(args.out or tempfile.mkdtemp(prefix="talon-density-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.target == "llama8b-random":
        if device.type == "cpu" and args.layers_override is None:
            parser.error("on CPU the 8B shape needs --layers-override (e.g. 3): 32 fp32 layers do not fit in memory")
        tokenizer = smollm2_tokenizer()
        model = build_llama_8b(device, dtype, args.layers_override)
        target_name = f"llama-3.1-8b-shaped random ({model.config.num_hidden_layers} layers)"
    else:
        tokenizer, model = load_target(args.target, device=device, dtype=dtype)
        target_name = args.target
    data = args.data or str(synthetic_chats(work / "chats.jsonl", max(4, tokens // 300)))
    layers = aux_layers_for(int(model.config.num_hidden_layers))

    results = {}
    for setting in args.settings.split(","):
        feature_dtype, teacher = setting.split("/")
        out = work / f"{feature_dtype}-{teacher}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = ExtractConfig(
            out=out, target=target_name, data=data, max_samples=None if args.data is None else max(4, tokens // 300),
            max_length=args.max_length, top_k=args.top_k, layers=layers, batch_tokens=max(4096, args.max_length),
            part_tokens=max(tokens // 2, 1024), device=device.type, progress=False,
            feature_dtype=feature_dtype, teacher=teacher,
        )
        started = time.perf_counter()
        extract_with_model(cfg, tokenizer, model, device=device, dtype=dtype)
        info = describe_cache(out)
        results[(feature_dtype, teacher)] = (info, time.perf_counter() - started)
        print(f"{setting}: {info['tokens']} tokens, {info['bytes_per_token'] / 1024:.2f} KiB/token", file=sys.stderr)

    names = []
    for info, _ in results.values():
        names += [n for n, a in info["arrays"].items() if a["bytes_per_token"] >= 0.01 and n not in names]
    header = ["array"] + [f"{d}/{t}" for d, t in results]
    rows = [[name] + [info["arrays"].get(name, {}).get("bytes_per_token", "-") for info, _ in results.values()] for name in names]
    rows.append(["**total B/token**"] + [info["bytes_per_token"] for info, _ in results.values()])
    rows.append(["**total KiB/token**"] + [info["bytes_per_token"] / 1024 for info, _ in results.values()])
    rows.append(["goal KiB/token"] + [GOALS_KIB.get(key, "-") for key in results])
    rows.append(["tokens measured"] + [info["tokens"] for info, _ in results.values()])
    hidden, vocab = int(model.config.hidden_size), int(model.config.vocab_size)
    print(f"\n### Cache density: {target_name}, hidden {hidden}, vocab {vocab}, top-{args.top_k}, "
          f"device {device.type} ({dtype}), torch {torch.__version__}\n")
    print(markdown_table(header, rows))
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
