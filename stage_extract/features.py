"""Running the frozen target on a padded batch and keeping what the draft needs.

The aux states are captured with forward hooks on ``model.model.layers[i]`` (output-of-layer,
0-based; see :data:`schemas.layout.LAYER_CONVENTION`).  The LM head runs only on the real
(unpadded) tokens, in chunks, so the full ``batch x length x vocab`` logits never exist at once.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's default capture layers ``[1, L//2 - 1, L - 4]`` in output-of-layer indexing."""
    return (1, num_layers // 2 - 1, num_layers - 4)


def validate_aux_layers(layer_ids: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    if len(layer_ids) != 3 or len(set(layer_ids)) != 3:
        raise ValueError(f"--layers needs exactly 3 distinct layer ids, got {list(layer_ids)}")
    bad = [i for i in layer_ids if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"--layers {bad} out of range: the target has layers 0..{num_layers - 1}")
    return tuple(sorted(layer_ids))


@dataclass
class BatchFeatures:
    """Features of the real tokens of a batch, concatenated row by row (padding removed)."""

    aux_hidden: torch.Tensor  # [N, 3H] bfloat16
    topk_ids: torch.Tensor  # [N, k] int64
    topk_logprobs: torch.Tensor  # [N, k] float32
    lengths: list[int]


@contextmanager
def capture_layer_outputs(model, layer_ids: tuple[int, ...]):
    """Yield a dict that fills with ``layer_id -> output hidden state`` during a forward."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer_id in layer_ids:
        def hook(_module, _inputs, output, layer_id=layer_id):
            captured[layer_id] = output[0] if isinstance(output, tuple) else output

        handles.append(model.model.layers[layer_id].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def extract_batch(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    layer_ids: tuple[int, ...],
    top_k: int,
    head_chunk_tokens: int = 4096,
) -> BatchFeatures:
    """Forward a right-padded batch once; return aux states and top-k log-probs of real tokens."""
    with capture_layer_outputs(model, layer_ids) as captured:
        final = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    aux = torch.cat([captured[i][real] for i in layer_ids], dim=-1).to(torch.bfloat16)
    final = final[real]
    ids, logprobs = [], []
    head = model.get_output_embeddings()
    for start in range(0, final.shape[0], head_chunk_tokens):
        logits = head(final[start : start + head_chunk_tokens]).float()
        values, indices = torch.topk(torch.log_softmax(logits, dim=-1), k=top_k, dim=-1)
        ids.append(indices)
        logprobs.append(values)
    return BatchFeatures(
        aux_hidden=aux,
        topk_ids=torch.cat(ids),
        topk_logprobs=torch.cat(logprobs),
        lengths=real.sum(dim=1).tolist(),
    )
