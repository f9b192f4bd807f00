"""Running the frozen target on a batch (padded, or packed into one row) and keeping what the draft needs.

The aux states are captured with forward hooks on ``model.model.layers[i]`` (output-of-layer,
0-based; see :data:`schemas.layout.LAYER_CONVENTION`); the final hidden state, when the cache
keeps it, with a forward pre-hook on ``model.model.norm`` (its input: the pre-norm output of the
last layer, :data:`schemas.layout.FINAL_HIDDEN_CONVENTION`).  The LM head runs only on the real
(unpadded) tokens, in chunks, so the full ``batch x length x vocab`` logits never exist at once.

Everything here stays on the model's device and never synchronises with the host (the real
tokens are gathered with an index built on the host, not a boolean mask): the copy to host is
the writer's business (:mod:`stage_extract.transfer`), so the next batch's forward is queued
while this one is still running.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from schemas.layout import N_AUX_LAYERS, has_final_hidden, has_topk
from stage_extract.head_topk import topk_from_logits
from stage_extract.packed_attention import PackedInputs, packed_attention
from stage_extract.quant import quantize_fp8


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's default capture layers ``[1, L//2 - 1, L - 4]`` in output-of-layer indexing."""
    return (1, num_layers // 2 - 1, num_layers - 4)


def validate_aux_layers(layer_ids: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    if len(layer_ids) != N_AUX_LAYERS or len(set(layer_ids)) != N_AUX_LAYERS:
        raise ValueError(f"--layers needs exactly 3 distinct layer ids, got {list(layer_ids)}")
    bad = [i for i in layer_ids if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"--layers {bad} out of range: the target has layers 0..{num_layers - 1}")
    return tuple(sorted(layer_ids))


@dataclass
class BatchFeatures:
    """Features of the real tokens of a batch, concatenated row by row (padding removed), still
    on the model's device.  Absent planes are None (they depend on the teacher and dtype)."""

    aux_hidden: torch.Tensor  # [N, 3H] bfloat16, or uint8 e4m3fn codes when fp8
    topk_ids: torch.Tensor | None  # [N, k] int32
    topk_logprobs: torch.Tensor | None  # [N, k] float32
    finite: torch.Tensor  # [N] bool: every feature of the token is finite
    lengths: list[int]
    aux_scale: torch.Tensor | None = None  # [N, 3] float32 (fp8 only)
    final_hidden: torch.Tensor | None = None  # [N, H] bfloat16 (pre-norm)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The present planes by cache array name (plus ``finite``)."""
        names = ("aux_hidden", "aux_scale", "topk_ids", "topk_logprobs", "final_hidden", "finite")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@contextmanager
def capture_layer_outputs(model, layer_ids: tuple[int, ...], *, final_norm_input: bool = False):
    """Yield a dict that fills with ``layer_id -> output hidden state`` during a forward (and
    ``"final"`` -> the input of the final norm when ``final_norm_input``)."""
    captured: dict = {}
    handles = []
    for layer_id in layer_ids:
        def hook(_module, _inputs, output, layer_id=layer_id):
            captured[layer_id] = output[0] if isinstance(output, tuple) else output

        handles.append(model.model.layers[layer_id].register_forward_hook(hook))
    if final_norm_input:
        def pre_hook(_module, args):
            captured["final"] = args[0]

        handles.append(model.model.norm.register_forward_pre_hook(pre_hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def real_token_index(lengths: list[int], width: int) -> torch.Tensor:
    """Flat row indices of the real tokens of a right-padded ``[len(lengths), width]`` batch."""
    return torch.cat([torch.arange(n, dtype=torch.long) + row * width for row, n in enumerate(lengths)])


def _rows_finite(tensor: torch.Tensor) -> torch.Tensor:
    """Per-row finiteness through an fp32 row sum (NaN and +-inf propagate into it), so no
    ``[N, width]`` boolean temporary is allocated on the device."""
    return torch.isfinite(tensor.sum(dim=-1, dtype=torch.float32))


@torch.inference_mode()
def extract_batch(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    layer_ids: tuple[int, ...],
    top_k: int,
    feature_dtype: str = "bf16",
    teacher: str = "topk",
    lengths: list[int] | None = None,
    head_chunk_tokens: int = 4096,
) -> BatchFeatures:
    """Forward a right-padded batch once; return the features of its real tokens.

    ``lengths`` (the real tokens per row, known on the host) avoids a device sync; without it
    they are read from ``attention_mask``."""
    if lengths is None:
        lengths = attention_mask.sum(dim=1).tolist()
    index = real_token_index(lengths, input_ids.shape[1]).to(input_ids.device, non_blocking=True)
    return _batch_features(
        model, dict(input_ids=input_ids, attention_mask=attention_mask), index, lengths,
        layer_ids=layer_ids, top_k=top_k, feature_dtype=feature_dtype, teacher=teacher, head_chunk_tokens=head_chunk_tokens,
    )


@torch.inference_mode()
def extract_packed(
    model,
    packed: PackedInputs,
    *,
    layer_ids: tuple[int, ...],
    top_k: int,
    feature_dtype: str = "bf16",
    teacher: str = "topk",
    head_chunk_tokens: int = 4096,
) -> BatchFeatures:
    """Forward one packed row (:func:`stage_extract.packed_attention.pack_samples`) once; every
    token is real, so the features come out in the row's order, sample after sample."""
    with packed_attention(model):
        return _batch_features(
            model, packed.forward_kwargs(), None, packed.lengths,
            layer_ids=layer_ids, top_k=top_k, feature_dtype=feature_dtype, teacher=teacher, head_chunk_tokens=head_chunk_tokens,
        )


def _batch_features(model, forward_kwargs: dict, index: torch.Tensor | None, lengths: list[int], *, layer_ids, top_k,
                    feature_dtype, teacher, head_chunk_tokens) -> BatchFeatures:
    """The forward with hooks, then the planes of the rows ``index`` selects (all rows when None)."""
    keep_final = has_final_hidden(teacher)
    with capture_layer_outputs(model, layer_ids, final_norm_input=keep_final) as captured:
        final = model.model(**forward_kwargs, use_cache=False).last_hidden_state

    def real(tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.reshape(-1, tensor.shape[-1])
        return flat if index is None else flat.index_select(0, index)

    aux = torch.cat([real(captured[i]) for i in layer_ids], dim=-1)
    aux_scale = None
    if feature_dtype == "fp8":
        aux, aux_scale = quantize_fp8(aux, groups=len(layer_ids))
        finite = _rows_finite(aux_scale)  # a scale is amax/448: non-finite iff its group is
    else:
        finite = _rows_finite(aux)
        aux = aux.to(torch.bfloat16)
    final_hidden = None
    if keep_final:
        final_hidden = real(captured["final"])
        finite &= _rows_finite(final_hidden)
        final_hidden = final_hidden.to(torch.bfloat16)
    topk_ids = topk_logprobs = None
    if has_topk(teacher):
        final = real(final)
        ids, logprobs = [], []
        head = model.get_output_embeddings()
        for start in range(0, final.shape[0], head_chunk_tokens):
            chunk_ids, chunk_logprobs = topk_from_logits(head(final[start : start + head_chunk_tokens]), top_k)
            ids.append(chunk_ids)
            logprobs.append(chunk_logprobs)
        topk_ids, topk_logprobs = torch.cat(ids), torch.cat(logprobs)
        finite &= _rows_finite(topk_logprobs)
    return BatchFeatures(
        aux_hidden=aux,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        finite=finite,
        lengths=list(lengths),
        aux_scale=aux_scale,
        final_hidden=final_hidden,
    )
