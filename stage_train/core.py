"""EAGLE-3 training core: target projection, the TTT unroll, the loss and its metrics.

Batch conventions (notes §3.2, the Automodel / SpecForge-PR-#895 convention):

* ``input_ids``, ``loss_mask`` and the target (dense logits or cached top-k log-probs)
  arrive already shifted left by one with ``_shift_left_with_zero``; slot t then sees
  token ``x_{t+1}`` and is supervised by the target's prediction at position t+1.
* ``aux_hidden_states`` are NOT shifted.
* ``attention_mask`` [B, T] is constant over the TTT steps; only ids, targets, the
  position mask and the loss mask roll left by one per step.

The unroll drives the draft through a shared ``cache_hidden = [[], []]`` so that step k
attends to the K/V produced by every earlier step at the same slot (notes §5.2). Without
that shared cache multi-step TTT would collapse into K independent single-step passes and
the draft would never see the multi-step inputs it gets when drafting.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Union, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stage_train.soft_ce import SOFT_CE_IMPLS, sparse_soft_cross_entropy

__all__ = [
    "DraftVocabLogits",
    "Eagle3StepMetrics",
    "Eagle3TrainerModule",
    "SparseTargetDistribution",
    "TopKLogProbs",
    "_compute_target_distribution",
    "_shift_left_with_zero",
    "build_target_to_draft_index",
]


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Upcast half/bf16 to fp32 but keep fp64 (used by the float64 reference tests)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _shift_tensor_left(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() < 2:
        raise ValueError(f"expected a batched sequence tensor with rank >= 2, got shape {tuple(tensor.shape)}")
    tail = torch.zeros_like(tensor[:, :1])
    return torch.cat([tensor[:, 1:], tail], dim=1)


def _shift_tensor_left_by(tensor: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` applications of ``_shift_tensor_left`` in one copy (the tensor itself for 0)."""
    if steps == 0:
        return tensor
    steps = min(steps, tensor.shape[1])
    return torch.cat([tensor[:, steps:], torch.zeros_like(tensor[:, :steps])], dim=1)


@dataclass
class TopKLogProbs:
    """Cached sparse target: the top-k target tokens per slot and their log-probs.

    ``token_ids`` [B, T, k] are target-vocab ids; ``logprobs`` [B, T, k] are normalised
    over the FULL target vocab (as stored by extraction). Entries need not be sorted.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor

    def __post_init__(self) -> None:
        if self.token_ids.shape != self.logprobs.shape or self.token_ids.dim() != 3:
            raise ValueError(
                "TopKLogProbs.token_ids and .logprobs must both be [B, T, k], got "
                f"{tuple(self.token_ids.shape)} and {tuple(self.logprobs.shape)}"
            )

    def shift_left(self) -> "TopKLogProbs":
        """Shift both fields one slot left along T, zero-filling the tail."""
        return TopKLogProbs(_shift_tensor_left(self.token_ids), _shift_tensor_left(self.logprobs))


@dataclass
class SparseTargetDistribution:
    """Renormalised draft-vocab target kept sparse (the top-k path never builds [B, T, V]).

    ``draft_ids`` [B, T, k] index the draft vocab (0 where the entry is not in it) and
    ``probs`` [B, T, k] fp32 are renormalised over the in-draft entries (0 elsewhere).
    """

    draft_ids: torch.Tensor
    probs: torch.Tensor

    def shift_left(self) -> "SparseTargetDistribution":
        """Shift both fields one slot left along T, zero-filling the tail."""
        return SparseTargetDistribution(_shift_tensor_left(self.draft_ids), _shift_tensor_left(self.probs))

    def argmax(self) -> torch.Tensor:
        """Draft id of the most probable entry per slot, [B, T]."""
        best = self.probs.argmax(dim=-1, keepdim=True)
        return self.draft_ids.gather(-1, best).squeeze(-1)


@dataclass
class DraftVocabLogits:
    """Exact teacher recomputed from the target's final hidden state (see ``stage_train.teacher``).

    ``logits`` [B, T, V_d] are the target's logits of the draft-vocab tokens, columns in the
    ``selected_token_ids`` (``lm_head`` row) order; ``argmax_in_draft`` [B, T] bool says whether
    the target's FULL-vocab greedy token is in the draft vocab (computed by streaming over the
    vocab, so no [B, T, V] tensor exists).  Unshifted like the other forms; shift it with
    ``_shift_left_with_zero``.
    """

    logits: torch.Tensor
    argmax_in_draft: torch.Tensor

    def __post_init__(self) -> None:
        if self.logits.dim() != 3 or self.argmax_in_draft.shape != self.logits.shape[:2]:
            raise ValueError(
                "DraftVocabLogits.logits must be [B, T, V_d] and .argmax_in_draft [B, T], got "
                f"{tuple(self.logits.shape)} and {tuple(self.argmax_in_draft.shape)}"
            )

    def shift_left(self) -> "DraftVocabLogits":
        """Shift both fields one slot left along T, zero-filling the tail (False for the flag)."""
        return DraftVocabLogits(_shift_tensor_left(self.logits), _shift_tensor_left(self.argmax_in_draft))


TargetDistribution = Union[torch.Tensor, SparseTargetDistribution]


@overload
def _shift_left_with_zero(tensor: torch.Tensor) -> torch.Tensor: ...
@overload
def _shift_left_with_zero(tensor: TopKLogProbs) -> TopKLogProbs: ...
@overload
def _shift_left_with_zero(tensor: SparseTargetDistribution) -> SparseTargetDistribution: ...
@overload
def _shift_left_with_zero(tensor: DraftVocabLogits) -> DraftVocabLogits: ...
def _shift_left_with_zero(
    tensor: torch.Tensor | TopKLogProbs | SparseTargetDistribution | DraftVocabLogits,
) -> torch.Tensor | TopKLogProbs | SparseTargetDistribution | DraftVocabLogits:
    """Shift a batched sequence tensor left and zero-fill the tail.

    Works along dim 1 for any rank >= 2 and any dtype (zero is ``False`` for bool), and
    also for ``TopKLogProbs`` / ``SparseTargetDistribution`` / ``DraftVocabLogits`` (both
    fields shifted).
    """
    if isinstance(tensor, (TopKLogProbs, SparseTargetDistribution, DraftVocabLogits)):
        return tensor.shift_left()
    return _shift_tensor_left(tensor)


def build_target_to_draft_index(selected_token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """long[V] map target id -> draft id, -1 for target ids outside the draft vocab.

    Order-agnostic: follows ``selected_token_ids`` (the ``lm_head`` row order).
    """
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=selected_token_ids.device)
    index[selected_token_ids.long()] = torch.arange(
        selected_token_ids.numel(), dtype=torch.long, device=selected_token_ids.device
    )
    return index


@torch.no_grad()
def _compute_target_distribution(
    target_logits: torch.Tensor | TopKLogProbs | DraftVocabLogits,
    selected_token_ids: torch.Tensor,
    selected_token_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    target_to_draft_index: torch.Tensor | None = None,
) -> tuple[TargetDistribution, torch.Tensor]:
    """Project target logits into draft vocabulary space and build supervision mask.

    Dense ``target_logits`` [B, T, V]: the full-vocab argmax picks the target's greedy
    token; ``position_mask = selected_token_mask[argmax] & loss_mask`` (a slot whose
    greedy token the draft cannot emit is not supervised, notes §4) and
    ``target_probs = softmax_fp32(target_logits[..., selected_token_ids])`` [B, T, V_d].
    The fp32 cast happens after ``index_select`` so no fp32 [B, T, V] copy is made.

    ``TopKLogProbs``: the best of the k entries stands in for the argmax, and the target
    is a ``SparseTargetDistribution`` renormalising ``exp(logprob)`` over the in-draft
    entries; no [B, T, V] tensor is built. ``target_to_draft_index`` (see
    ``build_target_to_draft_index``) may be passed to avoid rebuilding it per call.

    ``DraftVocabLogits``: the logits are already the draft-vocab columns and the greedy
    token's membership is given, so ``position_mask = argmax_in_draft & loss_mask`` and
    ``target_probs = softmax_fp32(logits)`` [B, T, V_d] (the same result as dense logits).

    Probabilities are fp32 (fp64 inputs stay fp64). Runs under ``no_grad``; everything
    returned is detached.
    """
    loss_mask = loss_mask.bool()
    selected_token_mask = selected_token_mask.bool()
    if isinstance(target_logits, DraftVocabLogits):
        if target_logits.logits.shape[-1] != selected_token_ids.numel():
            raise ValueError(
                f"DraftVocabLogits has {target_logits.logits.shape[-1]} columns, the draft vocab "
                f"{selected_token_ids.numel()}"
            )
        position_mask = target_logits.argmax_in_draft.bool() & loss_mask
        target_probs = torch.softmax(_at_least_fp32(target_logits.logits), dim=-1).detach()
        return target_probs, position_mask
    if isinstance(target_logits, TopKLogProbs):
        token_ids = target_logits.token_ids.long()
        logprobs = _at_least_fp32(target_logits.logprobs)
        best = logprobs.argmax(dim=-1, keepdim=True)
        greedy_ids = token_ids.gather(-1, best).squeeze(-1)
        position_mask = selected_token_mask[greedy_ids] & loss_mask
        if target_to_draft_index is None:
            target_to_draft_index = build_target_to_draft_index(selected_token_ids, selected_token_mask.numel())
        draft_ids = target_to_draft_index[token_ids]
        in_draft = draft_ids >= 0
        masked = logprobs.masked_fill(~in_draft, float("-inf"))
        row_max = masked.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        weights = torch.exp(masked - row_max)  # exp(-inf) = 0 for out-of-draft entries
        total = weights.sum(dim=-1, keepdim=True)
        probs = weights / total.clamp_min(torch.finfo(weights.dtype).tiny)
        sparse = SparseTargetDistribution(draft_ids=draft_ids.clamp_min(0), probs=probs)
        return sparse, position_mask

    greedy_ids = target_logits.argmax(dim=-1)
    position_mask = selected_token_mask[greedy_ids] & loss_mask
    projected = _at_least_fp32(target_logits.index_select(-1, selected_token_ids.long()))
    target_probs = torch.softmax(projected, dim=-1).detach()
    return target_probs, position_mask


def _soft_cross_entropy(log_probs: torch.Tensor, target: TargetDistribution) -> torch.Tensor:
    """Per-slot ``-sum_j p_j log q_j`` [B, T] for a dense or sparse draft-vocab target."""
    if isinstance(target, SparseTargetDistribution):
        picked = log_probs.gather(-1, target.draft_ids)
        return -(target.probs * picked).sum(dim=-1)
    return -(target * log_probs).sum(dim=-1)


def _target_argmax(target: TargetDistribution) -> torch.Tensor:
    """Draft id of the target mode per slot, [B, T]."""
    if isinstance(target, SparseTargetDistribution):
        return target.argmax()
    return target.argmax(dim=-1)


@dataclass
class Eagle3StepMetrics:
    """Aggregated metrics from one EAGLE-3 training step.

    ``loss`` carries the graph; everything else is detached. ``accuracy`` and
    ``valid_tokens`` count position-mask-valid slots (out-of-draft targets excluded).
    ``simulated_acceptance_length`` is the chain-drafting estimate
    ``1 + sum_k prefix_hits[k] / prefix_valid[k]`` where out-of-draft targets count as
    rejections; ``prefix_hits``/``prefix_valid`` are the raw per-depth counts so that
    callers can aggregate over batches and ranks before dividing.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    valid_tokens: torch.Tensor
    step_losses: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    step_accuracies: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    step_valid_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    simulated_acceptance_length: torch.Tensor = field(default_factory=lambda: torch.tensor(1.0))
    prefix_hits: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    prefix_valid: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


class Eagle3TrainerModule(nn.Module):
    """Draft-side EAGLE-3 trainer module with test-time-training unroll.

    The draft must provide ``embed``, ``project_hidden``, ``decoder_step`` and
    ``compute_logits`` (see ``stage_train.draft.Eagle3DraftModel``). The selected ids
    (draft -> target, the ``lm_head`` row order) and mask (``t2d``) are kept as
    non-persistent buffers together with the inverse target -> draft map used by the
    top-k path. When the draft carries ``d2t``/``t2d`` buffers they must describe the
    same mapping, since a mismatch silently misaligns ``lm_head`` rows at serve time.

    ``gradient_checkpointing=True`` runs each TTT step (midlayer, head, log-softmax, soft CE
    and the hit metrics) under non-reentrant ``torch.utils.checkpoint``: between forward and
    backward only each step's inputs and outputs (hidden state, this step's K/V, the loss
    piece) stay alive, and the [B, T, V_d] fp32 logits / log-probs and the MLP activations are
    recomputed in backward (about one extra step forward). Loss, metrics and gradients are the
    same as without it; memory then grows with K only by the cached K/V and hidden states.
    It applies only while autograd records (``torch.is_grad_enabled()``).

    ``soft_ce="fused"`` computes a sparse (top-k) teacher's loss and argmax with
    :func:`stage_train.soft_ce.sparse_soft_cross_entropy` from the logits as the head returns
    them, without the fp32 logits / log-probs and their fp32 gradients; the value is the same.
    Dense teachers always take the reference path.

    ``compile_step=True`` runs the elementwise work of each TTT step through ``torch.compile``
    with symbolic shapes (one graph for every batch shape and step): the midlayer's norms,
    concatenation, projections and rotary before the attention, its output projection,
    residuals and MLP after it (``Eagle3DraftModel.set_compiled``), and the final norm, head and
    loss.  Values equal the eager step's to fp32 rounding; the first batches pay the compilation.
    """

    def __init__(
        self,
        draft_model: nn.Module,
        *,
        selected_token_ids: torch.Tensor,
        selected_token_mask: torch.Tensor,
        ttt_steps: int,
        step_weight_decay: float = 0.8,
        gradient_checkpointing: bool = False,
        soft_ce: str = "reference",
        compile_step: bool = False,
    ) -> None:
        super().__init__()
        if soft_ce not in SOFT_CE_IMPLS:
            raise ValueError(f"soft_ce must be one of {SOFT_CE_IMPLS}, got {soft_ce!r}")
        if int(ttt_steps) < 1:
            raise ValueError(f"ttt_steps must be >= 1, got {ttt_steps}")
        if not step_weight_decay > 0:
            raise ValueError(f"step_weight_decay must be > 0, got {step_weight_decay}")
        ids = torch.as_tensor(selected_token_ids).long()
        mask = torch.as_tensor(selected_token_mask).bool()
        if ids.dim() != 1 or mask.dim() != 1:
            raise ValueError("selected_token_ids and selected_token_mask must be 1-D")
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= mask.numel():
            raise ValueError(f"selected_token_ids must be non-empty and lie in [0, {mask.numel()})")
        if int(mask.sum()) != ids.numel() or not bool(mask[ids].all()) or ids.unique().numel() != ids.numel():
            raise ValueError("selected_token_mask must be True exactly at the (unique) selected_token_ids")
        self._check_draft_mapping(draft_model, ids, mask)

        self.draft_model = draft_model
        self.ttt_steps = int(ttt_steps)
        self.step_weight_decay = float(step_weight_decay)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.soft_ce = soft_ce
        self.compile_step = bool(compile_step)
        if self.compile_step and hasattr(draft_model, "set_compiled"):  # other drafts: only the loss compiles
            draft_model.set_compiled(True)
        self.register_buffer("selected_token_ids", ids, persistent=False)
        self.register_buffer("selected_token_mask", mask, persistent=False)
        self.register_buffer(
            "target_to_draft_index", build_target_to_draft_index(ids, mask.numel()), persistent=False
        )

    @staticmethod
    def _check_draft_mapping(draft_model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
        d2t = getattr(draft_model, "d2t", None)
        t2d = getattr(draft_model, "t2d", None)
        if d2t is None or t2d is None:
            return
        if d2t.numel() != ids.numel() or t2d.numel() != mask.numel():
            raise ValueError(
                f"draft vocab sizes ({d2t.numel()}, {t2d.numel()}) do not match the selected "
                f"ids/mask ({ids.numel()}, {mask.numel()})"
            )
        draft_ids = torch.arange(d2t.numel()) + d2t.detach().cpu().long()
        if not torch.equal(draft_ids, ids.cpu()) or not torch.equal(t2d.detach().cpu().bool(), mask.cpu()):
            raise ValueError(
                "draft d2t/t2d buffers disagree with selected_token_ids/selected_token_mask; "
                "call draft_model.set_vocab_mapping(selected_token_ids) first"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        aux_hidden_states: torch.Tensor,
        target_logits: torch.Tensor | TopKLogProbs | DraftVocabLogits,
        *,
        position_ids: torch.Tensor | None = None,
    ) -> Eagle3StepMetrics:
        """Run the EAGLE-3 unrolled draft loss for one batch.

        ``input_ids``, ``loss_mask`` and ``target_logits`` arrive shifted left by one;
        ``aux_hidden_states`` [B, T, 3*H_t] do not. ``position_ids`` default to arange(T)
        per row. Step k (0-based) supervises slot t with ``p~_{t+k}`` under
        ``position_mask_{t+k}``; its loss is the masked mean soft cross-entropy, and the
        total loss is the ``step_weight_decay**k`` weighted mean over steps.
        """
        draft = self.draft_model
        bsz, seq_len = input_ids.shape
        if loss_mask.shape != input_ids.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if aux_hidden_states.shape[:2] != input_ids.shape:
            raise ValueError(
                f"aux_hidden_states leading dims {tuple(aux_hidden_states.shape[:2])} != {tuple(input_ids.shape)}"
            )
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device).expand(bsz, seq_len)

        target, position_mask = _compute_target_distribution(
            target_logits,
            self.selected_token_ids,
            self.selected_token_mask,
            loss_mask,
            target_to_draft_index=self.target_to_draft_index,
        )
        step_loss_mask = loss_mask.bool()

        # The target is passed to every step unshifted and shifted inside the step, so that a
        # checkpointed step keeps no per-step [B, T, V_d] copy of a dense teacher alive.
        if isinstance(target, SparseTargetDistribution):
            target_tensors: tuple[torch.Tensor, torch.Tensor | None] = (target.draft_ids, target.probs)
        else:
            target_tensors = (target, None)
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()

        hidden = draft.project_hidden(aux_hidden_states)
        cache_hidden: list[list[torch.Tensor]] = [[], []]
        ids = input_ids
        hit_chain = torch.ones_like(step_loss_mask)
        valid_chain = torch.ones_like(step_loss_mask)
        step_losses: list[torch.Tensor] = []
        correct: list[torch.Tensor] = []
        valid: list[torch.Tensor] = []
        prefix_hits: list[torch.Tensor] = []
        prefix_valid: list[torch.Tensor] = []

        for step in range(self.ttt_steps):
            if step > 0:
                ids = _shift_left_with_zero(ids)
                position_mask = _shift_left_with_zero(position_mask)
                step_loss_mask = _shift_left_with_zero(step_loss_mask)

            keys, values = cache_hidden
            args = (step, len(keys), ids, hidden, attention_mask, position_ids, position_mask, *target_tensors,
                    *keys, *values)
            if use_checkpoint:
                # Every tensor crossing the step boundary is an explicit input or output, and the
                # step's K/V are appended here, outside, so the recomputation cannot append twice.
                outputs = checkpoint(self._ttt_step, *args, use_reentrant=False)
            else:
                outputs = self._ttt_step(*args)
            hidden, step_loss, hit, new_keys, new_values = outputs
            keys.extend(new_keys)
            values.extend(new_values)
            step_losses.append(step_loss)

            with torch.no_grad():
                n_valid = position_mask.sum()
                hit_chain = hit_chain & hit
                valid_chain = valid_chain & step_loss_mask
                correct.append(hit.sum())
                valid.append(n_valid)
                prefix_hits.append(hit_chain.sum())
                prefix_valid.append(valid_chain.sum())

        losses = torch.stack(step_losses)
        weights = torch.tensor(
            [self.step_weight_decay**k for k in range(self.ttt_steps)], dtype=losses.dtype, device=losses.device
        )
        loss = (losses * weights).sum() / weights.sum()

        correct_t = torch.stack(correct)
        valid_t = torch.stack(valid)
        hits_t = torch.stack(prefix_hits)
        pvalid_t = torch.stack(prefix_valid)
        step_acc = correct_t.float() / valid_t.clamp_min(1).float()
        ratios = torch.where(pvalid_t > 0, hits_t.float() / pvalid_t.clamp_min(1).float(), torch.zeros_like(step_acc))
        return Eagle3StepMetrics(
            loss=loss,
            accuracy=correct_t.sum().float() / valid_t.sum().clamp_min(1).float(),
            valid_tokens=valid_t.sum(),
            step_losses=losses.detach(),
            step_accuracies=step_acc,
            step_valid_tokens=valid_t,
            simulated_acceptance_length=1.0 + ratios.sum(),
            prefix_hits=hits_t,
            prefix_valid=pvalid_t,
        )

    def _ttt_step(
        self,
        step: int,
        n_cached: int,
        ids: torch.Tensor,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        position_mask: torch.Tensor,
        target_main: torch.Tensor,
        target_probs: torch.Tensor | None,
        *cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """One TTT step, free of side effects so that it can be checkpointed and recomputed.

        ``cache`` holds the ``n_cached`` earlier keys followed by as many values; a local
        ``cache_hidden`` is built from them for ``decoder_step``, and what it appends is
        returned. ``target_main``/``target_probs`` are the unshifted target (dense probs and
        None, or sparse draft ids and probs), shifted here by ``step``; ``ids`` and
        ``position_mask`` arrive already shifted. Returns the new hidden state, the step loss
        (masked mean soft CE), the hit mask [B, T] (detached) and the new keys and values.
        """
        draft = self.draft_model
        cache_hidden = [list(cache[:n_cached]), list(cache[n_cached:])]
        hidden = draft.decoder_step(draft.embed(ids), hidden, cache_hidden, attention_mask, position_ids)
        new_keys, new_values = tuple(cache_hidden[0][n_cached:]), tuple(cache_hidden[1][n_cached:])

        target_main = _shift_tensor_left_by(target_main, step)
        target_probs = None if target_probs is None else _shift_tensor_left_by(target_probs, step)
        step_loss_fn = _compiled_step_loss() if self.compile_step else _step_loss
        step_loss, hit = step_loss_fn(draft, hidden, position_mask, target_main, target_probs, self.soft_ce == "fused")
        return hidden, step_loss, hit, new_keys, new_values


def _step_loss(draft: nn.Module, hidden: torch.Tensor, position_mask: torch.Tensor, target_main: torch.Tensor,
               target_probs: torch.Tensor | None, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A TTT step's loss (masked mean soft CE of the draft head against the already shifted
    target: dense probs and None, or sparse draft ids and probs) and its hit mask [B, T]."""
    target: TargetDistribution
    target = target_main if target_probs is None else SparseTargetDistribution(target_main, target_probs)
    if fused and isinstance(target, SparseTargetDistribution):
        # Same loss and argmax from the logits as computed (bf16 under autocast), no fp32 copies.
        step_loss, argmax = sparse_soft_cross_entropy(draft.compute_logits(hidden), target.draft_ids, target.probs,
                                                      position_mask)
        with torch.no_grad():
            hit = (argmax == _target_argmax(target)) & position_mask
        return step_loss, hit
    logits = _at_least_fp32(draft.compute_logits(hidden))
    log_probs = F.log_softmax(logits, dim=-1)
    ce = _soft_cross_entropy(log_probs, target)
    ce = torch.where(position_mask, ce, torch.zeros_like(ce))
    step_loss = ce.sum() / position_mask.sum().clamp_min(1)
    with torch.no_grad():
        hit = (logits.argmax(dim=-1) == _target_argmax(target)) & position_mask
    return step_loss, hit


@functools.cache
def _compiled_step_loss():
    """:func:`_step_loss` compiled once per process, with symbolic shapes."""
    from stage_train.draft import raise_recompile_limit

    raise_recompile_limit()
    return torch.compile(_step_loss, dynamic=True)
