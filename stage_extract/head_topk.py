"""The teacher's top-k log-probs from the LM head's logits, without a float copy of the logits.

``log_softmax`` then ``topk`` over a float copy of the logits writes and reads four bytes per
vocabulary entry several times, and ``torch.topk``'s radix select takes twice the passes over
32-bit keys that it takes over 16-bit ones.  For a small target (SmolLM2: 49,152 logits per
token from a 576-wide state) that was most of the head's time.  Since ``log_softmax`` only shifts
each row by its log-sum-exp, the same top-k comes from the logits in their own dtype:

* ``ids, values = topk(logits)``, on bf16 logits directly;
* ``log_probs = float(values) - logsumexp(float(logits))``, the row's log-sum-exp computed in
  float32 by one fused pass over the logits on CUDA (a Triton kernel, :func:`row_logsumexp`),
  or by ``torch.logsumexp`` elsewhere.

The log-probs equal ``log_softmax``'s to float32 rounding; the ids are the same set, tied
logits aside (their order among themselves is the top-k kernel's).
"""

from __future__ import annotations

import functools
import warnings

import torch


def topk_from_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids int32 [N, k], log_probs float32 [N, k])`` of ``logits [N, vocab]``, sorted by
    decreasing log-prob."""
    values, ids = torch.topk(logits, k=k, dim=-1)
    return ids.to(torch.int32), values.float() - row_logsumexp(logits).unsqueeze(-1)


def row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """float32 ``logsumexp`` of each row of a 2-D tensor: NaN where a row holds a NaN or a +inf
    (``torch.logsumexp`` gives +inf for the latter; the log-probs are non-finite either way)."""
    kernel = _triton_kernel() if logits.is_cuda and logits.dim() == 2 and logits.stride(-1) == 1 else None
    if kernel is None:
        return torch.logsumexp(logits.float(), dim=-1)
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        try:
            with torch.cuda.device(logits.device):
                kernel[(logits.shape[0],)](logits, out, logits.shape[1], logits.stride(0), BLOCK=2048, num_warps=8)
        except Exception as err:  # Triton present but unable to build or launch here: the same sum, unfused
            warnings.warn(f"the fused log-sum-exp kernel failed ({type(err).__name__}: {err}); using torch.logsumexp",
                          RuntimeWarning, stacklevel=2)
            return torch.logsumexp(logits.float(), dim=-1)
    return out


@functools.cache
def _triton_kernel():
    """The Triton row log-sum-exp kernel, or None where Triton is missing (CPU-only torch)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def row_logsumexp_kernel(logits_ptr, out_ptr, n_cols, row_stride, BLOCK: tl.constexpr):
        # One program per row; each lane keeps a running max and a sum of exp(x - max) over
        # its columns (the online softmax), and the lanes are combined once at the end.
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        lanes = tl.arange(0, BLOCK)
        lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
        lane_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + lanes
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(lane_max, x)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # an all -inf lane stays at 0
            lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(x - shift)  # NaN x: NaN sum
            lane_max = new_max
        row_max = tl.max(lane_max, axis=0)
        shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        total = tl.sum(lane_sum * tl.exp(lane_max - shift), axis=0)
        tl.store(out_ptr + row, shift + tl.log(total))

    return row_logsumexp_kernel
