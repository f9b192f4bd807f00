"""Soft cross-entropy against a sparse (top-k) teacher, without fp32 copies of the logits.

The reference loss of a TTT step (``stage_train.core``) upcasts the draft's [N, V_d] logits to
fp32, takes ``log_softmax`` (kept for backward) and gathers the teacher's k columns.  At an
8B shape (N = 8k tokens, V_d = 32k) that is a 1 GB fp32 tensor per TTT step written, read
and kept, plus fp32 gradients of the same size: about 12 GB of memory traffic per step and 7 GB
held over a K = 7 unroll.

:func:`sparse_soft_cross_entropy` computes the same quantity from the logits as they come out
of the matmul (bf16 under autocast):

    ce_i = lse_i * sum_j p_ij - sum_j p_ij * x_i[d_ij]        (lse_i = logsumexp_v x_iv, in fp32)
    d loss / d x_iv = w_i * (softmax(x_i)_v * sum_j p_ij - sum_{j: d_ij = v} p_ij)

keeping only the logits and one fp32 scalar per row for backward, and returning the gradient
in the logits' dtype.  On CUDA the two row-wise passes are compiled once per process (the cast,
the reductions and the gather fuse into reads of the bf16 logits); elsewhere they run eagerly.
Masked rows (weight 0) contribute nothing and get zero gradient.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["SOFT_CE_IMPLS", "sparse_soft_cross_entropy"]

SOFT_CE_IMPLS = ("reference", "fused")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 logits (as the reference's upcast), fp64 for fp64 ones."""
    return torch.promote_types(dtype, torch.float32)


def _row_stats(logits: torch.Tensor, draft_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logsumexp [N], the teacher columns [N, k], argmax [N]) of ``logits`` [N, V], in fp32 (fp64)."""
    x = logits.to(_accumulation_dtype(logits.dtype))
    return torch.logsumexp(x, dim=-1), x.gather(-1, draft_ids), logits.argmax(dim=-1)


def _logits_grad(logits: torch.Tensor, lse: torch.Tensor, draft_ids: torch.Tensor, probs: torch.Tensor,
                 row_scale: torch.Tensor) -> torch.Tensor:
    """``row_scale_i * (softmax(x_i) * sum_j p_ij - scatter(p_i))`` in the logits' dtype."""
    x = logits.to(lse.dtype)
    grad = torch.exp(x - lse.unsqueeze(-1)) * (row_scale * probs.sum(-1)).unsqueeze(-1)
    grad = grad.scatter_add(-1, draft_ids, -(row_scale.unsqueeze(-1) * probs))
    return grad.to(logits.dtype)


@functools.cache
def _compiled():
    # Default dynamism: the vocab width stays a constant (the reductions specialise on it) and
    # the row count becomes symbolic after its first change, so batches do not recompile.
    return torch.compile(_row_stats), torch.compile(_logits_grad)


def _kernels(device: torch.device):
    # Inside the compiled step loss (compile_step) the enclosing graph fuses the plain functions.
    if device.type != "cuda" or torch.compiler.is_compiling():
        return _row_stats, _logits_grad
    return _compiled()


class _SparseSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, draft_ids, probs, weight):
        row_stats, _ = _kernels(logits.device)
        lse, picked, argmax = row_stats(logits, draft_ids)
        ce = lse * probs.sum(-1) - (probs * picked).sum(-1)
        ctx.save_for_backward(logits, lse, draft_ids, probs, weight)
        ctx.mark_non_differentiable(argmax)
        # Masked rows are left out, not multiplied by 0: a non-finite value there must not reach
        # the loss (the reference masks the same way).
        return torch.where(weight > 0, ce * weight, torch.zeros_like(ce)).sum(), argmax

    @staticmethod
    def backward(ctx, grad_loss, _grad_argmax):
        logits, lse, draft_ids, probs, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        _, logits_grad = _kernels(logits.device)
        return logits_grad(logits, lse, draft_ids, probs, weight * grad_loss), None, None, None


def sparse_soft_cross_entropy(logits: torch.Tensor, draft_ids: torch.Tensor, probs: torch.Tensor,
                              mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean soft CE of ``logits`` [..., V] against a sparse teacher, and the argmax.

    ``draft_ids`` [..., k] (columns of ``logits``) and ``probs`` [..., k] describe the teacher;
    ``mask`` [...] selects the rows that count.  Returns ``(sum over masked rows of
    -sum_j p_j log softmax(logits)[d_j]) / max(1, masked rows)`` and the argmax [...] of every
    row, equal to the reference ``log_softmax`` + gather computation in fp32.
    """
    shape = logits.shape[:-1]
    acc = _accumulation_dtype(logits.dtype)
    rows = logits.reshape(-1, logits.shape[-1])
    weight = mask.reshape(-1).to(acc) / mask.sum().clamp_min(1).to(acc)
    loss, argmax = _SparseSoftCE.apply(rows, draft_ids.reshape(-1, draft_ids.shape[-1]),
                                       probs.reshape(-1, probs.shape[-1]).to(acc), weight)
    return loss, argmax.reshape(shape)
