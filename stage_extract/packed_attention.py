"""Attention over packed samples, for the target's forward: no padding, no cross-sample attention.

With ``--batching packed`` a batch's samples are concatenated into a single ``[1, T]`` row whose
positions restart at 0 with every sample, so RoPE sees exactly what a forward of each sample alone
sees.  While such a forward runs, the model's attention is :func:`packed_attention_forward`
(registered with transformers' ``AttentionInterface`` under :data:`PACKED_ATTENTION`; a name with
no mask function, so transformers builds no mask either).  It receives the sample boundaries
through the keyword arguments transformers hands from the model's forward to every attention
call, under the names its own padding-free path uses (``cu_seq_lens_q``: int32 ``[N + 1]``
cumulative lengths on the device; ``max_length_q``: the longest sample), and attends causally
within each sample:

* on CUDA in bf16/fp16, with PyTorch's variable-length flash attention
  (``torch.nn.attention.varlen.varlen_attn``): each sample costs its own ``n^2 / 2``, nothing is
  padded and no mask is built;
* otherwise (CPU, fp32), with one causal SDPA call per sample.

Compared with right-padded batches this drops the padded tokens' whole cost (every linear layer
and the LM head ran on them) and needs no length sorting, so a batch is simply the next samples
up to the token budget.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PACKED_ATTENTION = "talon_packed"


@dataclass
class PackedInputs:
    """One packed row: ``input_ids`` and ``position_ids`` ``[1, T]``, the int32 ``[N + 1]``
    cumulative sample lengths, and the longest sample."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seq_lens: torch.Tensor
    max_length: int
    lengths: list[int]

    def to(self, device: torch.device) -> "PackedInputs":
        """On ``device``; from pinned host memory the copies do not wait for queued GPU work."""
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedInputs(move(self.input_ids), move(self.position_ids), move(self.cu_seq_lens), self.max_length, self.lengths)

    def forward_kwargs(self) -> dict:
        """The model forward's arguments (the boundaries reach every attention call)."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seq_lens,
            "cu_seq_lens_k": self.cu_seq_lens,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }


def pack_samples(samples: Sequence[np.ndarray], *, pin: bool = False) -> PackedInputs:
    """Concatenate token-id arrays into one row with positions restarting per sample (host
    tensors; ``pin`` for a non-blocking upload)."""
    lengths = [len(ids) for ids in samples]
    if not lengths or min(lengths) < 1:
        raise ValueError("packing needs at least one sample and no empty sample")
    ids = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.int64) for s in samples]))
    starts = np.repeat(np.cumsum([0] + lengths[:-1]), lengths)
    positions = torch.from_numpy(np.arange(len(ids), dtype=np.int64) - starts)
    cu = torch.from_numpy(np.cumsum([0] + lengths).astype(np.int32))
    if pin:
        ids, positions, cu = ids.pin_memory(), positions.pin_memory(), cu.pin_memory()
    return PackedInputs(ids[None], positions[None], cu, max(lengths), lengths)


def _causal_per_sample(query, key, value, cu_seq_lens, scale):
    """Causal attention within each sample, one SDPA call per sample ([T, H, D] in and out)."""
    out = torch.empty_like(query)
    bounds = cu_seq_lens.tolist()
    gqa = key.shape[1] != query.shape[1]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop == start:  # a zero-length sequence pads the boundaries to a static count
            continue
        q, k, v = (t[start:stop].transpose(0, 1) for t in (query, key, value))
        out[start:stop] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa).transpose(0, 1)
    return out


@functools.cache
def _varlen_kernel():
    """PyTorch's variable-length flash attention and the keywords its version takes, or None
    (looked up once: this runs in every layer of every forward)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _causal_varlen(query, key, value, cu_seq_lens, max_length, scale, kernel):
    """The flash path ([T, H, D] in and out).  ``varlen_attn``'s keywords changed across PyTorch
    releases (``is_causal`` became ``window_size``; ``scale`` and ``enable_gqa`` arrived later),
    so the call adapts to the signature it finds."""
    varlen_attn, params = kernel
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if scale is not None and not math.isclose(scale, query.shape[-1] ** -0.5, rel_tol=1e-6):
        if "scale" in params:
            kwargs["scale"] = scale
        else:  # the kernel's own scale is 1/sqrt(D): fold the difference into the queries
            query = query * (scale * math.sqrt(query.shape[-1]))
    return varlen_attn(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, **kwargs)


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function contract: ``query`` ``[1, H, T, D]``, ``key``/``value``
    ``[1, H_kv, T, D]`` in; ``[1, T, H, D]`` and no weights out."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None or query.shape[0] != 1:
        raise RuntimeError(
            f"the {PACKED_ATTENTION!r} attention needs one packed row and its sample boundaries "
            "(cu_seq_lens_q); run the forward through stage_extract.features.extract_packed"
        )
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [T, H, D]
    kernel = _varlen_kernel() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if kernel is not None:
        out = _causal_varlen(q, k, v, cu_seq_lens, int(kwargs["max_length_q"]), scaling, kernel)
    else:
        out = _causal_per_sample(q, k, v, cu_seq_lens, scaling)
    return out[None], None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)


@contextmanager
def packed_attention(model) -> Iterator[None]:
    """Run ``model``'s attention as :func:`packed_attention_forward` inside the block (re-entrant:
    an enclosing block keeps it), and restore the previous implementation after."""
    config = model.config
    previous = config._attn_implementation
    if previous == PACKED_ATTENTION:
        yield
        return
    _register()
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
