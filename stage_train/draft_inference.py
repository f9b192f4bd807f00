"""Drafting with a trained EAGLE-3 draft at inference time: a KV cache plus chain proposals.

Training (``stage_train.core``) evaluates the draft on whole sequences at once: at TTT step
k, slot t attends causally to the real-context keys ``K_0[0..t]`` and to its own chain keys
of steps 1..k, with RoPE at ``t + k``.  Decoding sees the same computation one anchor at a
time, and this module reproduces it with the draft's own weights (``draft.py`` is reused, not
copied or changed):

* **Prefix cache.**  Every verified position i contributes one midlayer entry computed from
  ``(embed(x_{i+1}), fc(aux_i))`` at RoPE position i, exactly the step-0 input of slot i in
  training.  Its keys/values are appended to a per-sequence cache; its pre-norm output is the
  step-0 hidden state of the chain anchored at i, and its logits propose draft token 1.
* **Chain.**  Draft token j+1 (j >= 1) comes from one more midlayer step fed with
  ``embed(token j)`` and the previous step's pre-norm output (the hidden state is fed back,
  never re-projected), at RoPE position ``anchor + j``.  Its query sees the whole prefix cache
  (the anchor is the last verified position, so that is ``K_0[0..anchor]``) and the chain keys
  of steps 1..j; chain keys are thrown away after each round because only the verified
  prefix is kept.

Scores are computed like the training attention (projections in the model dtype, scores and
softmax in fp32), so the first drafted logits at every prefix position equal the training
module's step-0 logits, and chain step k equals the training unroll's step k for the same
slot (``tests/test_speculative.py`` checks both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from stage_train.draft import Eagle3DraftModel, _expand_kv

__all__ = ["DraftProposal", "Eagle3DraftRunner"]


@dataclass
class DraftProposal:
    """K drafted tokens in *target* ids, plus their draft distributions when sampling.

    ``probs`` is ``[K, V]`` over the target vocabulary (draft-vocab probabilities scattered
    to ``i + d2t[i]``, zero elsewhere) when the tokens were sampled, or None for greedy
    drafting, where verification only compares tokens.
    """

    token_ids: torch.Tensor  # long [K]
    probs: torch.Tensor | None


class Eagle3DraftRunner:
    """Single-sequence inference driver around an ``Eagle3DraftModel``.

    The runner owns the prefix KV cache of one sequence; ``extend`` appends verified positions,
    ``propose`` drafts a chain from the last one, ``crop`` rolls the prefix back.  Batch size is
    1 for decoding, but ``extend``/``chain_step`` accept any batch whose rows share a length,
    which the training-equivalence tests use.
    """

    def __init__(self, draft: Eagle3DraftModel) -> None:
        self.draft = draft.eval()
        attn = draft.midlayer.self_attn
        self._attn = attn
        self._scale = 1.0 / math.sqrt(attn.head_dim)
        self._draft_to_target = draft.draft_to_target_ids()
        self.reset()

    # ---------------------------------------------------------------- cache bookkeeping
    def reset(self) -> None:
        """Forget the sequence: empty prefix cache, no anchor."""
        # Growable buffers [B, n_h, capacity, d] (GQA-expanded like training); the first
        # ``_length`` entries are valid.  Doubling keeps appends amortised O(new entries).
        self._key_buf: torch.Tensor | None = None
        self._value_buf: torch.Tensor | None = None
        self._length = 0
        self._anchor_hidden: torch.Tensor | None = None  # [B, 1, H] pre-norm output at P - 1

    @property
    def prefix_length(self) -> int:
        """Number of verified positions held in the prefix cache."""
        return self._length

    def _prefix(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._length == 0:
            return []
        return [(self._key_buf[:, :, : self._length], self._value_buf[:, :, : self._length])]

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        needed = self._length + k.shape[2]
        if self._length and k.shape[0] != self._key_buf.shape[0]:
            raise ValueError(f"batch size changed from {self._key_buf.shape[0]} to {k.shape[0]} without reset()")
        if self._key_buf is None or needed > self._key_buf.shape[2] or self._key_buf.shape[0] != k.shape[0]:
            capacity = max(needed, 2 * (self._key_buf.shape[2] if self._key_buf is not None else 0), 64)
            shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
            key_buf, value_buf = k.new_empty(shape), v.new_empty(shape)
            if self._length:
                key_buf[:, :, : self._length] = self._key_buf[:, :, : self._length]
                value_buf[:, :, : self._length] = self._value_buf[:, :, : self._length]
            self._key_buf, self._value_buf = key_buf, value_buf
        self._key_buf[:, :, self._length : needed] = k
        self._value_buf[:, :, self._length : needed] = v
        self._length = needed

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` prefix entries (entries depend only on earlier ones).

        The anchor hidden state is not recomputable from the cache, so a crop must be followed
        by ``extend`` before the next ``propose``.
        """
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot crop a draft prefix of {self._length} entries to {length}")
        self._length = length
        self._anchor_hidden = None

    # ---------------------------------------------------------------- the midlayer, cached
    def _layer(
        self,
        input_embeds: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One midlayer pass of m new entries over the ``past`` key/value blocks plus themselves.

        Every past key is visible; among the new entries attention is causal.  The past is
        passed as blocks (prefix cache, chain keys) and scored block by block, so no step copies
        the whole prefix.  Returns (pre-norm output [B, m, H], new keys, new values
        [B, n_h, m, d]).
        """
        layer = self.draft.midlayer
        attn = self._attn
        bsz, m, _ = input_embeds.shape
        residual = hidden
        u = torch.cat([layer.input_layernorm(input_embeds), layer.hidden_norm(hidden)], dim=-1)
        q = attn.q_proj(u).view(bsz, m, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(u).view(bsz, m, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(u).view(bsz, m, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        cos, sin = attn.rotary_emb(v, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = _expand_kv(k, attn.n_rep)
        v = _expand_kv(v, attn.n_rep)

        blocks = [*past, (k, v)]
        scores = torch.cat([torch.matmul(q, kb.transpose(-1, -2)) for kb, _ in blocks], dim=-1).float() * self._scale
        if m > 1:
            # New entry r may see every past key and new keys 0..r.
            n_past = scores.shape[-1] - m
            allowed = torch.ones(m, scores.shape[-1], dtype=torch.bool, device=q.device).tril(diagonal=n_past)
            scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = None
        start = 0
        for _, vb in blocks:
            part = torch.matmul(probs[..., start : start + vb.shape[2]], vb)
            out = part if out is None else out + part
            start += vb.shape[2]
        out = out.transpose(1, 2).reshape(bsz, m, attn.num_heads * attn.head_dim)
        out = residual + attn.o_proj(out)
        out = out + layer.mlp(layer.post_attention_layernorm(out))
        return out, k, v

    # ---------------------------------------------------------------- public steps
    @torch.no_grad()
    def extend(self, aux_hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """Append verified positions P..P+m-1 to the prefix cache.

        ``aux_hidden`` [B, m, 3*H_t] are the target's aux states at those positions and
        ``next_ids`` [B, m] the tokens *following* them (x_{i+1}, target ids).  Returns the
        pre-norm outputs [B, m, H]; ``logits`` of row i is the step-0 proposal for x_{i+2}.
        The last one becomes the anchor of the next ``propose``.
        """
        if aux_hidden.shape[:2] != next_ids.shape:
            raise ValueError(
                f"aux_hidden leading dims {tuple(aux_hidden.shape[:2])} != next_ids shape {tuple(next_ids.shape)}"
            )
        draft = self.draft
        start = self._length
        m = next_ids.shape[1]
        positions = torch.arange(start, start + m, device=next_ids.device).expand(next_ids.shape[0], m)
        out, k, v = self._layer(draft.embed(next_ids), draft.project_hidden(aux_hidden), positions, self._prefix())
        self._append(k, v)
        self._anchor_hidden = out[:, -1:]
        return out

    @torch.no_grad()
    def chain_step(
        self,
        token_ids: torch.Tensor,
        hidden: torch.Tensor,
        position: int,
        chain: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """One chain step: embed ``token_ids`` [B, 1] (target ids), feed back ``hidden`` [B, 1, H].

        The query at RoPE ``position`` attends to the prefix cache plus the chain's earlier
        (key, value) blocks in ``chain``; this step's block is appended to it.  Returns the
        pre-norm output [B, 1, H].
        """
        if self._length == 0:
            raise RuntimeError("chain_step needs a non-empty prefix cache; call extend first")
        pos = torch.full(token_ids.shape, position, dtype=torch.long, device=token_ids.device)
        out, k, v = self._layer(self.draft.embed(token_ids), hidden, pos, self._prefix() + chain)
        chain.append((k, v))
        return out

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits (fp32) of pre-norm hidden states."""
        return self.draft.compute_logits(hidden).float()

    @torch.no_grad()
    def propose(self, k: int, temperature: float = 0.0, generator: torch.Generator | None = None) -> DraftProposal:
        """Draft a chain of ``k`` tokens from the last verified position.

        Greedy (``temperature == 0``) takes the draft argmax at each depth; otherwise tokens are
        sampled from ``softmax(logits / temperature)`` and the per-depth distributions are
        returned over the target vocabulary for the rejection rule.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._anchor_hidden is None or self._anchor_hidden.shape[0] != 1:
            raise RuntimeError("propose needs a single sequence extended since the last crop/reset")
        anchor = self.prefix_length - 1
        hidden = self._anchor_hidden
        chain: list[tuple[torch.Tensor, torch.Tensor]] = []
        tokens: list[torch.Tensor] = []
        dists: list[torch.Tensor] = []
        for depth in range(k):
            logits = self.logits(hidden)[0, -1]
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                draft_id = torch.multinomial(probs, 1, generator=generator)[0]
                dists.append(probs)
            else:
                draft_id = logits.argmax()
            target_id = self._draft_to_target[draft_id]
            tokens.append(target_id)
            if depth + 1 < k:
                hidden = self.chain_step(target_id.view(1, 1), hidden, anchor + depth + 1, chain)
        token_ids = torch.stack(tokens)
        if temperature <= 0:
            return DraftProposal(token_ids=token_ids, probs=None)
        vocab = self.draft.config.vocab_size
        dense = torch.zeros(k, vocab, dtype=torch.float32, device=token_ids.device)
        dense[:, self._draft_to_target] = torch.stack(dists)
        return DraftProposal(token_ids=token_ids, probs=dense)
