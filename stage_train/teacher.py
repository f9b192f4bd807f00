"""The exact teacher from a cache's final hidden states (``--teacher final-hidden|both``).

A top-k cache stores the target's k best log-probs: a biased, truncated teacher.  A
final-hidden cache stores the pre-norm last hidden state ``h`` [T, H] instead (8 KiB/token at
H=4096) plus, once, the target's final RMSNorm weight and LM head (``target_head.safetensors``),
and the teacher is recomputed at training time exactly as the target computes it:

* draft-vocab logits ``lm_head[selected_ids] @ rmsnorm(h)`` [B, T, V_d], and
* whether the full-vocab argmax lies in the draft vocab, found by streaming the LM head in
  vocab chunks (a running max), so no [B, T, V] tensor is ever built.

The result is a :class:`stage_train.core.DraftVocabLogits`, which ``_compute_target_distribution``
turns into the same dense draft-vocab distribution and position mask as dense target logits.
The matmuls run in the head's stored dtype (bf16 from a GPU extraction, like the target's own
head; fp32 from a CPU one) with fp32 RMSNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from schemas.layout import TARGET_HEAD_FILE
from schemas.manifest import CacheError
from stage_train.core import DraftVocabLogits


@dataclass
class TargetHead:
    """The target's final RMSNorm and LM head, as stored in the cache."""

    norm_weight: torch.Tensor  # [H]
    lm_head_weight: torch.Tensor  # [V, H]
    rms_norm_eps: float

    @classmethod
    def load(cls, cache_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> "TargetHead":
        from safetensors import safe_open

        path = Path(cache_dir) / TARGET_HEAD_FILE
        if not path.is_file():
            raise CacheError(f"{path} is missing: the cache has no copy of the target's head")
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names = set(handle.keys())
            if not {"norm.weight", "lm_head.weight"} <= names:
                raise CacheError(
                    f"{path} has no final norm / LM head: the cache was extracted with --teacher topk; "
                    "re-extract with --teacher final-hidden or both to train from final hidden states"
                )
            eps = float((handle.metadata() or {}).get("rms_norm_eps", "1e-6"))
            norm = handle.get_tensor("norm.weight")
            head = handle.get_tensor("lm_head.weight")
        if dtype is not None:
            head = head.to(dtype)
        return cls(norm_weight=norm.float().to(device), lm_head_weight=head.to(device), rms_norm_eps=eps)

    def to(self, device: torch.device | str) -> "TargetHead":
        return TargetHead(self.norm_weight.to(device), self.lm_head_weight.to(device), self.rms_norm_eps)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm in fp32: ``weight * h / sqrt(mean(h^2) + eps)``."""
    h = hidden.float()
    return weight.float() * (h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps))


@torch.no_grad()
def final_hidden_teacher(
    final_hidden: torch.Tensor,
    head: TargetHead,
    selected_token_ids: torch.Tensor,
    selected_token_mask: torch.Tensor | None = None,
    *,
    vocab_chunk: int = 16384,
    token_chunk: int = 8192,
) -> DraftVocabLogits:
    """Recompute the teacher for ``final_hidden`` [B, T, H] (pre-norm, any float dtype).

    ``selected_token_ids`` [V_d] are the draft vocab's target ids in ``lm_head`` row order;
    ``selected_token_mask`` [V] (True on them) is derived when not given.  Peak extra memory is
    ``token_chunk x vocab_chunk`` logits."""
    batch, seq, hidden = final_hidden.shape
    weight = head.lm_head_weight
    vocab = weight.shape[0]
    device = weight.device
    selected = selected_token_ids.to(device).long()
    if selected_token_mask is None:
        selected_token_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        selected_token_mask[selected] = True
    in_draft = selected_token_mask.to(device).bool()
    draft_head = weight.index_select(0, selected)
    flat = final_hidden.reshape(batch * seq, hidden).to(device)
    logits_out = torch.empty((batch * seq, selected.numel()), dtype=torch.float32, device=device)
    argmax_out = torch.empty(batch * seq, dtype=torch.long, device=device)
    for start in range(0, flat.shape[0], token_chunk):
        normed = rms_norm(flat[start : start + token_chunk], head.norm_weight, head.rms_norm_eps).to(weight.dtype)
        logits_out[start : start + token_chunk] = (normed @ draft_head.T).float()
        best_value = torch.full((normed.shape[0],), float("-inf"), device=device)
        best_index = torch.zeros(normed.shape[0], dtype=torch.long, device=device)
        for v0 in range(0, vocab, vocab_chunk):
            chunk = (normed @ weight[v0 : v0 + vocab_chunk].T).float()
            value, index = chunk.max(dim=-1)
            better = value > best_value  # strict: ties keep the lowest id, like torch.argmax
            best_value = torch.where(better, value, best_value)
            best_index = torch.where(better, index + v0, best_index)
        argmax_out[start : start + token_chunk] = best_index
    return DraftVocabLogits(
        logits=logits_out.reshape(batch, seq, -1),
        argmax_in_draft=in_draft[argmax_out].reshape(batch, seq),
    )
