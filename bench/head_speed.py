"""The LM head's share of extraction: logits, top-k and log-probs, side by side (issue #2).

For each target shape, a random final state ``[tokens, hidden]`` goes through the head in chunks
of ``--chunk-tokens`` (as :func:`stage_extract.features._batch_features` does) by each method:

* ``log_softmax fp32``: the float copy of the logits, ``log_softmax``, ``topk`` (the code before
  :mod:`stage_extract.head_topk`);
* ``topk + torch.logsumexp``: ``topk`` on the logits' own dtype, the row's log-sum-exp by
  ``torch.logsumexp`` of a float copy;
* ``topk + fused lse`` (:func:`stage_extract.head_topk.topk_from_logits`): the same with the
  log-sum-exp from one Triton pass over the logits;
* ``topk + compiled lse``: the log-sum-exp through ``torch.compile`` instead (a check of the
  Triton kernel against what Inductor makes of it);
* ``blocked topk + fused lse``: the top-k of each block of ~1,024 logits first, then of those.

plus the parts alone (``matmul only``, ``+ topk only``, ``+ fused lse only``).  Columns:
tokens/s, the ratio to ``log_softmax fp32`` measured in the same run, and against it the rows
whose top-k ids are the same set and the largest log-prob difference.

    python bench/head_speed.py --device cuda
    python bench/head_speed.py --device cuda --shapes smollm2 --tokens 1048576 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import LLAMA_8B, markdown_table, resolve, sync  # noqa: E402
from stage_extract.head_topk import row_logsumexp, topk_from_logits  # noqa: E402

SHAPES = {"smollm2": (576, 49152), "8b": (LLAMA_8B["hidden_size"], LLAMA_8B["vocab_size"])}


def log_softmax_fp32(logits: torch.Tensor, k: int):
    values, ids = torch.topk(torch.log_softmax(logits.float(), dim=-1), k=k, dim=-1)
    return ids.to(torch.int32), values


def topk_torch_lse(logits: torch.Tensor, k: int):
    values, ids = torch.topk(logits, k=k, dim=-1)
    return ids.to(torch.int32), values.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)


def make_topk_compiled_lse():
    lse = torch.compile(lambda x: torch.logsumexp(x.float(), dim=-1, keepdim=True), dynamic=True)

    def method(logits: torch.Tensor, k: int):
        values, ids = torch.topk(logits, k=k, dim=-1)
        return ids.to(torch.int32), values.float() - lse(logits)
    return method


def block_size(vocab: int, k: int, target: int = 1024) -> int | None:
    """The divisor of ``vocab`` nearest ``target`` that holds at least ``k`` entries."""
    divisors = [d for d in range(max(k, target // 4), target * 4 + 1) if vocab % d == 0]
    return min(divisors, key=lambda d: abs(d - target)) if divisors else None


def blocked_topk_fused_lse(logits: torch.Tensor, k: int):
    rows, vocab = logits.shape
    size = block_size(vocab, k)
    if size is None:
        return topk_from_logits(logits, k)
    values, local = torch.topk(logits.view(rows, vocab // size, size), k=k, dim=-1)
    offsets = torch.arange(0, vocab, size, device=logits.device).view(1, -1, 1)
    values, pick = torch.topk(values.reshape(rows, -1), k=k, dim=-1)
    ids = (local + offsets).reshape(rows, -1).gather(-1, pick)
    return ids.to(torch.int32), values.float() - row_logsumexp(logits).unsqueeze(-1)


def topk_only(logits: torch.Tensor, k: int):
    values, ids = torch.topk(logits, k=k, dim=-1)
    return ids, values


def lse_only(logits: torch.Tensor, k: int):
    return None, row_logsumexp(logits)


def matmul_only(logits: torch.Tensor, k: int):
    return None, None


def run_head(method, final: torch.Tensor, weight: torch.Tensor, k: int, chunk: int):
    outputs = []
    for start in range(0, final.shape[0], chunk):
        logits = final[start : start + chunk] @ weight.T
        outputs.append(method(logits, k))
    return outputs


def timed(method, final, weight, k, chunk, device, repeats: int) -> tuple[float, list]:
    outputs = run_head(method, final, weight, k, chunk)  # warm-up (and compilation)
    sync(device)
    begin = time.perf_counter()
    for _ in range(repeats):
        run_head(method, final, weight, k, chunk)
    sync(device)
    seconds = (time.perf_counter() - begin) / repeats
    return final.shape[0] / seconds, outputs


def agreement(reference: list, outputs: list) -> tuple[float, float]:
    """Share of rows whose id sets match the reference's, and the largest |log-prob difference|
    between the two, each sorted by id."""
    same, rows, worst = 0, 0, 0.0
    for (ref_ids, ref_values), (ids, values) in zip(reference, outputs):
        ref_sorted, ref_order = torch.sort(ref_ids.long(), dim=-1)
        got_sorted, got_order = torch.sort(ids.long(), dim=-1)
        match = (ref_sorted == got_sorted).all(dim=-1)
        same += int(match.sum())
        rows += ref_ids.shape[0]
        if match.any():
            diff = ref_values.gather(-1, ref_order)[match] - values.gather(-1, got_order)[match]
            worst = max(worst, float(diff.abs().max()))
    return same / rows, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--shapes", default="smollm2,8b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", type=int, default=262144, help="final states run through the head per repeat")
    parser.add_argument("--chunk-tokens", type=int, default=4096, help="tokens per head call (the extractor's default)")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up")
    parser.add_argument("--dtype", default="bfloat16", help="the head's dtype (bfloat16 as extraction runs it)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    device = resolve(args.device)
    dtype = getattr(torch, args.dtype)
    methods = {
        "log_softmax fp32": log_softmax_fp32,
        "topk + torch.logsumexp": topk_torch_lse,
        "topk + fused lse": topk_from_logits,
        "topk + compiled lse": make_topk_compiled_lse(),
        "blocked topk + fused lse": blocked_topk_fused_lse,
        "matmul only": matmul_only,
        "+ topk only": topk_only,
        "+ fused lse only": lse_only,
    }
    rows, report = [], []
    for shape in args.shapes.split(","):
        hidden, vocab = SHAPES[shape]
        gen = torch.Generator(device=device).manual_seed(0)
        final = torch.randn(args.tokens, hidden, device=device, dtype=dtype, generator=gen)
        weight = (torch.randn(vocab, hidden, device=device, dtype=dtype, generator=gen) * hidden ** -0.5 * 4)
        base_rate, reference = None, None
        for name, method in methods.items():
            try:
                rate, outputs = timed(method, final, weight, args.top_k, args.chunk_tokens, device, args.repeats)
            except Exception as error:  # a method unavailable here (no compiler, say): say so, go on
                rows.append([shape, name, f"failed: {type(error).__name__}: {error}"[:80], "", "", ""])
                continue
            if base_rate is None:
                base_rate, reference = rate, outputs
            same, worst = ("", "") if outputs[0][0] is None or name.startswith("+") else agreement(reference, outputs)
            rows.append([shape, name, round(rate), round(rate / base_rate, 2),
                         same if same == "" else f"{same:.4f}", worst if worst == "" else f"{worst:.1e}"])
            report.append(dict(shape=shape, method=name, tokens_per_s=rate, ratio=rate / base_rate,
                               same_id_sets=same, max_logprob_diff=worst))
        del final, weight
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; {args.tokens} tokens "
          f"per repeat, chunks of {args.chunk_tokens}, top-{args.top_k}, {args.dtype}")
    print(markdown_table(["shape", "method", "tok/s", "vs log_softmax fp32", "same id sets", "max |Δ log-prob|"], rows))
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
