"""CPU tests for the EAGLE-3 draft (stage_train.draft) and training core (stage_train.core).

The central check is an independent, deliberately naive reference of the whole unrolled
forward (own RMSNorm, own default RoPE, python loops over steps / rows / queries / heads,
own shifting and soft-CE) that reads only the draft's parameter tensors. The module must
match it in loss, per-step metrics, tau_sim and gradients, in float64.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig

from stage_train.core import (
    Eagle3StepMetrics,
    Eagle3TrainerModule,
    SparseTargetDistribution,
    TopKLogProbs,
    _compute_target_distribution,
    _shift_left_with_zero,
)
from stage_train.draft import FLEX_TILE, DraftConfig, Eagle3DraftModel

# Tiny shapes; every size is distinct so a stray [B, T, V] tensor is recognisable.
H, N_HEADS, N_KV, HEAD_DIM, INTER = 32, 4, 2, 8, 64
V, V_D, H_T = 97, 40, 24
B, T = 2, 7
LENGTHS = (7, 5)  # row 1 is right-padded
THETA = 10000.0
EPS = 1e-6
DTYPE = torch.float64
RTOL, ATOL = 1e-5, 1e-7  # RoPE cos/sin are computed in fp32 inside transformers


def make_config(**overrides) -> DraftConfig:
    fields = dict(
        hidden_size=H,
        intermediate_size=INTER,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        head_dim=HEAD_DIM,
        rms_norm_eps=EPS,
        vocab_size=V,
        draft_vocab_size=V_D,
        target_hidden_size=H_T,
        max_position_embeddings=64,
        rope_theta=THETA,
        rope_scaling=None,
    )
    fields.update(overrides)
    return DraftConfig(**fields)


def make_selected(seed: int = 123) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(V, generator=gen)[:V_D].sort().values


def make_draft(seed: int = 0) -> tuple[Eagle3DraftModel, torch.Tensor]:
    torch.manual_seed(seed)
    draft = Eagle3DraftModel(make_config())
    with torch.no_grad():
        # Non-trivial norm weights so that a mixed-up norm cannot go unnoticed.
        for name, param in draft.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.uniform_(0.5, 1.5)
        draft.load_target_embeddings(torch.randn(V, H))
    selected = make_selected()
    draft.set_vocab_mapping(selected)
    return draft.to(DTYPE), selected


def make_module(draft: Eagle3DraftModel, selected: torch.Tensor, ttt_steps: int) -> Eagle3TrainerModule:
    mask = torch.zeros(V, dtype=torch.bool)
    mask[selected] = True
    return Eagle3TrainerModule(draft, selected_token_ids=selected, selected_token_mask=mask, ttt_steps=ttt_steps)


@dataclass
class RawBatch:
    """Unshifted batch as it comes out of extraction (targets z_t predict x_{t+1})."""

    ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T]
    aux: torch.Tensor  # [B, T, 3*H_t]
    logits: torch.Tensor  # [B, T, V]


def make_raw_batch(seed: int = 7) -> RawBatch:
    gen = torch.Generator().manual_seed(seed)
    attn = torch.zeros(B, T, dtype=torch.long)
    for b, length in enumerate(LENGTHS):
        attn[b, :length] = 1
    ids = torch.randint(0, V, (B, T), generator=gen) * attn
    loss_mask = (torch.rand(B, T, generator=gen) < 0.85).long() * attn
    loss_mask[:, 0] = 0  # "prompt" token
    aux = torch.randn(B, T, 3 * H_T, generator=gen, dtype=DTYPE)
    logits = 3.0 * torch.randn(B, T, V, generator=gen, dtype=DTYPE)
    return RawBatch(ids, attn, loss_mask, aux, logits)


def shift(x: torch.Tensor) -> torch.Tensor:
    """Test-local left shift with zero fill (independent of the core helper)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[1] - 1):
        out[:, t] = x[:, t + 1]
    return out


def module_inputs(raw: RawBatch) -> dict:
    return dict(
        input_ids=shift(raw.ids),
        attention_mask=raw.attention_mask,
        loss_mask=shift(raw.loss_mask),
        aux_hidden_states=raw.aux,
        target_logits=shift(raw.logits),
    )


# --------------------------------------------------------------------------- reference
def ref_rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS)


def ref_rope(x: torch.Tensor, pos: int) -> torch.Tensor:
    """Default rotate-half RoPE of one vector [d] at integer position ``pos``, float64."""
    half = x.shape[-1] // 2
    inv = THETA ** (-torch.arange(half, dtype=torch.float64) * 2.0 / x.shape[-1])
    ang = pos * inv
    c, s = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def ref_unroll(
    p: dict[str, torch.Tensor],
    selected: torch.Tensor,
    raw: RawBatch,
    ttt_steps: int,
    *,
    reset_cache: bool = False,
    decay: float = 0.8,
) -> dict:
    """Naive EAGLE-3 TTT unroll over raw (unshifted) tensors.

    Slot t at step k consumes token x[t+k+1] and is supervised by z[t+k+1] under
    m[t+k+1]; its query sees K_0[j] for non-padded j <= t plus K_1[t]..K_k[t].
    ``reset_cache`` gives the broken "K independent single steps" variant.
    """
    rep = N_HEADS // N_KV
    sel = selected.tolist()
    in_draft = set(sel)
    hidden = [raw.aux[b] @ p["fc.weight"].T for b in range(B)]
    keys: list[list[torch.Tensor]] = [[] for _ in range(B)]
    vals: list[list[torch.Tensor]] = [[] for _ in range(B)]
    chain_hit = [[True] * T for _ in range(B)]
    chain_valid = [[True] * T for _ in range(B)]
    out = {"step_losses": [], "step_acc": [], "step_valid": [], "prefix_hits": [], "prefix_valid": [], "logits": []}
    attn_mask = raw.attention_mask.tolist()
    for k in range(ttt_steps):
        ce_sum, n_valid, n_correct = 0.0, 0, 0
        step_logits = []
        for b in range(B):
            tok = torch.tensor([int(raw.ids[b, t + k + 1]) if t + k + 1 < T else 0 for t in range(T)])
            emb = p["embed_tokens.weight"][tok]
            g = hidden[b]
            u = torch.cat([ref_rms(emb, p["midlayer.input_layernorm.weight"]), ref_rms(g, p["midlayer.hidden_norm.weight"])], -1)
            q = (u @ p["midlayer.self_attn.q_proj.weight"].T).view(T, N_HEADS, HEAD_DIM)
            kk = (u @ p["midlayer.self_attn.k_proj.weight"].T).view(T, N_KV, HEAD_DIM)
            vv = (u @ p["midlayer.self_attn.v_proj.weight"].T).view(T, N_KV, HEAD_DIM)
            if reset_cache:
                keys[b], vals[b] = [], []
            offset = len(keys[b])
            q = torch.stack([torch.stack([ref_rope(q[t, h], t + offset) for h in range(N_HEADS)]) for t in range(T)])
            kk = torch.stack([torch.stack([ref_rope(kk[t, h], t + offset) for h in range(N_KV)]) for t in range(T)])
            kv_head = [h // rep for h in range(N_HEADS)]
            keys[b].append(kk[:, kv_head])
            vals[b].append(vv[:, kv_head])
            rows = []
            for t in range(T):
                heads = []
                for h in range(N_HEADS):
                    ks = [keys[b][0][j, h] for j in range(t + 1) if attn_mask[b][j]]
                    vs = [vals[b][0][j, h] for j in range(t + 1) if attn_mask[b][j]]
                    ks += [keys[b][i][t, h] for i in range(1, len(keys[b]))]
                    vs += [vals[b][i][t, h] for i in range(1, len(vals[b]))]
                    if not ks:  # fully padded query at step 0: undefined, never supervised
                        heads.append(torch.zeros(HEAD_DIM, dtype=DTYPE))
                        continue
                    scores = torch.stack([torch.dot(q[t, h], key) for key in ks]) / math.sqrt(HEAD_DIM)
                    probs = torch.softmax(scores, dim=0)
                    heads.append(sum(pr * v for pr, v in zip(probs, vs)))
                rows.append(torch.cat(heads))
            g1 = g + torch.stack(rows) @ p["midlayer.self_attn.o_proj.weight"].T
            hn = ref_rms(g1, p["midlayer.post_attention_layernorm.weight"])
            mlp = (F.silu(hn @ p["midlayer.mlp.gate_proj.weight"].T) * (hn @ p["midlayer.mlp.up_proj.weight"].T))
            g2 = g1 + mlp @ p["midlayer.mlp.down_proj.weight"].T
            hidden[b] = g2
            logits = ref_rms(g2, p["norm.weight"]) @ p["lm_head.weight"].T
            step_logits.append(logits)
            logq = logits - torch.logsumexp(logits, -1, keepdim=True)
            for t in range(T):
                s = t + k + 1
                z = raw.logits[b, s] if s < T else torch.zeros(V, dtype=DTYPE)
                m = bool(raw.loss_mask[b, s]) if s < T else False
                valid = m and int(z.argmax()) in in_draft
                target = torch.softmax(z[selected], -1)
                correct = int(logits[t].argmax()) == int(target.argmax())
                if valid:
                    ce_sum = ce_sum - (target * logq[t]).sum()
                    n_valid += 1
                    n_correct += int(correct)
                chain_hit[b][t] = chain_hit[b][t] and valid and correct
                chain_valid[b][t] = chain_valid[b][t] and m
        out["logits"].append(torch.stack(step_logits))
        out["step_losses"].append(ce_sum / max(n_valid, 1))
        out["step_acc"].append(n_correct / max(n_valid, 1))
        out["step_valid"].append(n_valid)
        out["prefix_hits"].append(sum(map(sum, chain_hit)))
        out["prefix_valid"].append(sum(map(sum, chain_valid)))
    weights = [decay**k for k in range(ttt_steps)]
    out["loss"] = sum(w * l for w, l in zip(weights, out["step_losses"])) / sum(weights)
    out["valid_tokens"] = sum(out["step_valid"])
    out["accuracy"] = sum(a * n for a, n in zip(out["step_acc"], out["step_valid"])) / max(out["valid_tokens"], 1)
    out["tau"] = 1.0 + sum(hh / vv if vv else 0.0 for hh, vv in zip(out["prefix_hits"], out["prefix_valid"]))
    return out


def ref_params(draft: Eagle3DraftModel) -> dict[str, torch.Tensor]:
    return {n: q.detach().clone().requires_grad_(q.requires_grad) for n, q in draft.named_parameters()}


def plant_chains(draft: Eagle3DraftModel, selected: torch.Tensor, raw: RawBatch, ttt_steps: int) -> RawBatch:
    """Edit the target logits so some greedy chains hit at several depths.

    Draft predictions do not depend on the targets, so the reference's predictions are
    computed first; targets are then set to agree with them along chosen anchors
    (row 0 anchor 1: full chain; row 1 anchor 0: two hits then an out-of-draft target;
    row 0 anchor 4: a depth-1 hit after a depth-0 miss).
    """
    with torch.no_grad():
        preds = ref_unroll(ref_params(draft), selected, raw, ttt_steps)["logits"]  # [K][B, T, V_d]
    logits = raw.logits.clone()
    oov = [v for v in range(V) if v not in set(selected.tolist())]
    for b, anchor, depth in ((0, 1, ttt_steps), (1, 0, 2)):
        for k in range(depth):
            s = anchor + k + 1
            logits[b, s, selected[int(preds[k][b, anchor].argmax())]] = logits[b, s].max() + 4.0
            raw.loss_mask[b, s] = 1
    logits[1, 3, oov[0]] = logits[1, 3].max() + 4.0  # out-of-draft greedy target -> rejection
    # Row 0 anchor 4: miss at depth 0 but hit at depth 1, which must not count as a prefix hit.
    miss = (int(preds[0][0, 4].argmax()) + 1) % V_D
    logits[0, 5, selected[miss]] = logits[0, 5].max() + 4.0
    logits[0, 6, selected[int(preds[1][0, 4].argmax())]] = logits[0, 6].max() + 4.0
    raw.loss_mask[0, 5:] = 1
    return replace(raw, logits=logits)


def assert_close(actual, expected, msg: str = "") -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=DTYPE), torch.as_tensor(expected, dtype=DTYPE), rtol=RTOL, atol=ATOL, msg=msg)


# --------------------------------------------------------------------------- shift + target distribution
def test_shift_left_with_zero_exact():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert torch.equal(_shift_left_with_zero(ids), torch.tensor([[2, 3, 0], [5, 6, 0]]))
    mask = torch.tensor([[True, False, True], [False, True, True]])
    assert torch.equal(_shift_left_with_zero(mask), torch.tensor([[False, True, False], [True, True, False]]))
    x = torch.arange(12, dtype=torch.float32).view(1, 3, 2, 2)
    expected = torch.tensor([[[[4.0, 5.0], [6.0, 7.0]], [[8.0, 9.0], [10.0, 11.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    assert torch.equal(_shift_left_with_zero(x), expected)
    topk = TopKLogProbs(token_ids=torch.tensor([[[1, 2], [3, 4]]]), logprobs=torch.tensor([[[-0.1, -2.0], [-0.5, -1.0]]]))
    shifted = _shift_left_with_zero(topk)
    assert isinstance(shifted, TopKLogProbs)
    assert torch.equal(shifted.token_ids, torch.tensor([[[3, 4], [0, 0]]]))
    assert torch.equal(shifted.logprobs, torch.tensor([[[-0.5, -1.0], [0.0, 0.0]]]))
    sparse = SparseTargetDistribution(draft_ids=torch.tensor([[[1], [2]]]), probs=torch.tensor([[[1.0], [0.5]]]))
    s2 = _shift_left_with_zero(sparse)
    assert torch.equal(s2.draft_ids, torch.tensor([[[2], [0]]])) and torch.equal(s2.probs, torch.tensor([[[0.5], [0.0]]]))
    with pytest.raises(ValueError):
        _shift_left_with_zero(torch.tensor([1, 2, 3]))


def test_compute_target_distribution_dense_and_topk():
    vocab, selected = 6, torch.tensor([1, 3, 4])
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[selected] = True
    logits = torch.tensor(
        [[[9.0, 1.0, 2.0, 3.0, 0.0, 0.0],  # argmax 0: out of draft vocab -> excluded
          [0.0, 1.0, 0.0, 5.0, 2.0, 0.0],  # argmax 3: in draft vocab -> supervised
          [0.0, 4.0, 0.0, 0.0, 0.0, 0.0]]]  # in vocab but loss_mask 0
    )
    loss_mask = torch.tensor([[1, 1, 0]])
    probs, pmask = _compute_target_distribution(logits, selected, mask, loss_mask)
    assert torch.equal(pmask, torch.tensor([[False, True, False]]))
    assert probs.dtype == torch.float32 and not probs.requires_grad
    torch.testing.assert_close(probs, torch.softmax(logits[..., selected], -1))

    # Top-k (k=3) version: logprobs normalised over the full vocab; unsorted entries.
    lp = torch.log_softmax(logits, -1)
    tok = torch.tensor([[[2, 0, 1], [4, 3, 5], [1, 0, 2]]])
    topk = TopKLogProbs(tok, lp.gather(-1, tok))
    sparse, pmask_k = _compute_target_distribution(topk, selected, mask, loss_mask)
    assert torch.equal(pmask_k, torch.tensor([[False, True, False]]))
    assert torch.equal(sparse.draft_ids, torch.tensor([[[0, 0, 0], [2, 1, 0], [0, 0, 0]]]))
    e = lp.exp()
    expected = torch.tensor([[[0.0, 0.0, 1.0],
                              [e[0, 1, 4] / (e[0, 1, 4] + e[0, 1, 3]), e[0, 1, 3] / (e[0, 1, 4] + e[0, 1, 3]), 0.0],
                              [1.0, 0.0, 0.0]]])
    torch.testing.assert_close(sparse.probs, expected)
    assert torch.equal(sparse.argmax(), torch.tensor([[0, 1, 0]]))


# --------------------------------------------------------------------------- module vs reference
@pytest.fixture(scope="module")
def setup_k3():
    draft, selected = make_draft()
    raw = plant_chains(draft, selected, make_raw_batch(), ttt_steps=3)
    return draft, selected, raw


BACKENDS = pytest.mark.parametrize("backend", ["eager", "flex"])


@BACKENDS
def test_module_matches_reference_k3_forward_and_grads(setup_k3, backend):
    draft, selected, raw = setup_k3
    draft = copy.deepcopy(draft)
    draft.set_attention_backend(backend)
    module = make_module(draft, selected, ttt_steps=3)
    metrics = module(**module_inputs(raw))
    assert isinstance(metrics, Eagle3StepMetrics)
    metrics.loss.backward()

    p = ref_params(draft)
    ref = ref_unroll(p, selected, raw, ttt_steps=3)
    ref["loss"].backward()

    assert_close(metrics.loss, ref["loss"], "loss")
    assert_close(metrics.step_losses, torch.stack(ref["step_losses"]), "step losses")
    assert_close(metrics.step_accuracies, ref["step_acc"], "step accuracies")
    assert metrics.step_valid_tokens.tolist() == ref["step_valid"]
    assert int(metrics.valid_tokens) == ref["valid_tokens"]
    assert_close(metrics.accuracy, ref["accuracy"], "accuracy")
    assert metrics.prefix_hits.tolist() == ref["prefix_hits"]
    assert metrics.prefix_valid.tolist() == ref["prefix_valid"]
    assert_close(metrics.simulated_acceptance_length, ref["tau"], "tau_sim")
    # The planted chains make every depth score, so tau_sim is exercised beyond 1.
    assert all(h > 0 for h in ref["prefix_hits"]) and ref["tau"] > 1.2
    correct = (metrics.step_accuracies * metrics.step_valid_tokens).round().long()
    assert int(correct[1]) > int(metrics.prefix_hits[1])  # a non-prefix hit exists at depth 1

    for name, param in draft.named_parameters():
        if name == "embed_tokens.weight":
            assert not param.requires_grad and param.grad is None
            continue
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, p[name].grad, rtol=RTOL, atol=1e-6, msg=name)


@BACKENDS
def test_multiple_optimizer_steps_match_reference(setup_k3, backend):
    draft, selected, raw = setup_k3
    draft = copy.deepcopy(draft)
    draft.set_attention_backend(backend)
    module = make_module(draft, selected, ttt_steps=3)
    p = ref_params(draft)
    trainable = [n for n, q in draft.named_parameters() if q.requires_grad]
    opt_mod = torch.optim.AdamW([q for q in draft.parameters() if q.requires_grad], lr=1e-2, weight_decay=0.01)
    opt_ref = torch.optim.AdamW([p[n] for n in trainable], lr=1e-2, weight_decay=0.01)
    inputs = module_inputs(raw)
    losses = []
    for _ in range(3):
        opt_mod.zero_grad()
        opt_ref.zero_grad()
        loss_mod = module(**inputs).loss
        loss_ref = ref_unroll(p, selected, raw, ttt_steps=3)["loss"]
        assert_close(loss_mod, loss_ref)
        losses.append(float(loss_mod.detach()))
        loss_mod.backward()
        loss_ref.backward()
        opt_mod.step()
        opt_ref.step()
        for name, param in draft.named_parameters():
            torch.testing.assert_close(param, p[name], rtol=1e-5, atol=1e-6, msg=name)
    assert losses[-1] < losses[0]


def test_single_step_equals_plain_causal_layer(setup_k3):
    draft, selected, raw = setup_k3
    module = make_module(draft, selected, ttt_steps=1)
    with torch.no_grad():
        metrics = module(**module_inputs(raw))
        ref = ref_unroll(ref_params(draft), selected, raw, ttt_steps=1)
    assert_close(metrics.loss, ref["loss"])
    assert_close(metrics.accuracy, ref["accuracy"])
    assert int(metrics.valid_tokens) == ref["valid_tokens"]

    # Step-0 logits equal a plain causal Llama layer (SDPA is_causal) on each row's real tokens.
    ids, aux = shift(raw.ids), raw.aux
    with torch.no_grad():
        pos = torch.arange(T).expand(B, T)
        step0 = draft.compute_logits(
            draft.decoder_step(draft.embed(ids), draft.project_hidden(aux), [[], []], raw.attention_mask, pos)
        )
        layer = draft.midlayer
        for b, length in enumerate(LENGTHS):
            e, g = draft.embed(ids[b, :length]), draft.project_hidden(aux[b, :length])
            u = torch.cat([layer.input_layernorm(e), layer.hidden_norm(g)], -1)
            attn = layer.self_attn
            q = attn.q_proj(u).view(length, N_HEADS, HEAD_DIM)
            k = attn.k_proj(u).view(length, N_KV, HEAD_DIM)
            v = attn.v_proj(u).view(length, N_KV, HEAD_DIM).transpose(0, 1)
            q = torch.stack([torch.stack([ref_rope(q[t, h], t) for h in range(N_HEADS)]) for t in range(length)]).transpose(0, 1)
            k = torch.stack([torch.stack([ref_rope(k[t, h], t) for h in range(N_KV)]) for t in range(length)]).transpose(0, 1)
            o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]
            h1 = g + attn.o_proj(o.transpose(0, 1).reshape(length, -1))
            h2 = h1 + layer.mlp(layer.post_attention_layernorm(h1))
            torch.testing.assert_close(step0[b, :length], draft.compute_logits(h2), rtol=RTOL, atol=1e-6)


def test_multi_step_differs_from_independent_steps(setup_k3):
    draft, selected, raw = setup_k3
    module = make_module(draft, selected, ttt_steps=2)
    p = ref_params(draft)
    with torch.no_grad():
        metrics = module(**module_inputs(raw))
        chained = ref_unroll(p, selected, raw, ttt_steps=2)
        independent = ref_unroll(p, selected, raw, ttt_steps=2, reset_cache=True)
    assert_close(metrics.step_losses[1], chained["step_losses"][1])
    assert_close(metrics.step_losses[0], independent["step_losses"][0])
    assert abs(float(metrics.step_losses[1]) - float(independent["step_losses"][1])) > 1e-4


@BACKENDS
def test_step1_attends_to_step0_kv_causally(backend):
    """Through the cache alone, step-1 slot t depends on step-0 slots <= t and never on later ones."""
    draft, _ = make_draft()
    draft.set_attention_backend(backend)
    gen = torch.Generator().manual_seed(3)
    attn_mask = torch.ones(1, T, dtype=torch.long)
    pos = torch.arange(T)[None]
    e0 = torch.randn(1, T, H, generator=gen, dtype=DTYPE, requires_grad=True)
    g0 = torch.randn(1, T, H, generator=gen, dtype=DTYPE)
    e1 = torch.randn(1, T, H, generator=gen, dtype=DTYPE)
    g1 = torch.randn(1, T, H, generator=gen, dtype=DTYPE)  # fixed: isolates the K/V path
    t = 3
    cache: list[list[torch.Tensor]] = [[], []]
    draft.decoder_step(e0, g0, cache, attn_mask, pos)
    out1 = draft.decoder_step(e1, g1, cache, attn_mask, pos)
    # eager caches GQA-expanded K/V; flex caches K/V per KV head, padded to whole tiles.
    expected = (1, N_HEADS, T, HEAD_DIM) if backend == "eager" else (1, N_KV, -(-T // FLEX_TILE) * FLEX_TILE, HEAD_DIM)
    assert len(cache[0]) == 2 and cache[0][1].shape == expected
    (grad,) = torch.autograd.grad(out1[0, t].sum(), e0)
    per_slot = grad[0].abs().sum(-1)
    assert torch.all(per_slot[: t + 1] > 0)
    assert torch.all(per_slot[t + 1 :] == 0)

    # With a fresh cache there is no path at all.
    out_fresh = draft.decoder_step(e1, g1, [[], []], attn_mask, pos)
    assert not out_fresh.requires_grad or torch.autograd.grad(out_fresh[0, t].sum(), e0, allow_unused=True)[0] is None


@BACKENDS
def test_left_padding_masks_keys_and_stays_finite(backend):
    """Key padding is honoured (checked against the reference) and fully masked rows give no NaN."""
    draft, selected = make_draft()
    draft.set_attention_backend(backend)
    raw = make_raw_batch()
    raw.attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    raw.loss_mask = raw.loss_mask * raw.attention_mask
    # Slot t at step k is supervised by m[t+k+1]; keep padded-query slots (t < 2) unsupervised for K=2.
    raw.loss_mask[0, :4] = 0
    raw.ids = raw.ids * raw.attention_mask
    module = make_module(draft, selected, ttt_steps=2)
    metrics = module(**module_inputs(raw))
    metrics.loss.backward()
    assert torch.isfinite(metrics.loss)
    assert all(torch.isfinite(q.grad).all() for q in draft.parameters() if q.grad is not None)
    with torch.no_grad():
        ref = ref_unroll(ref_params(draft), selected, raw, ttt_steps=2)
        cache: list[list[torch.Tensor]] = [[], []]
        hidden = draft.project_hidden(raw.aux)
        ids = shift(raw.ids)
        for k in range(2):
            hidden = draft.decoder_step(draft.embed(ids), hidden, cache, raw.attention_mask, torch.arange(T).expand(B, T))
            logits = draft.compute_logits(hidden)
            assert torch.isfinite(logits).all()
            torch.testing.assert_close(logits[0, 2:], ref["logits"][k][0, 2:], rtol=RTOL, atol=1e-6)
            ids = shift(ids)
    assert_close(metrics.loss, ref["loss"])


@BACKENDS
def test_padding_tail_does_not_change_loss(setup_k3, backend):
    draft, selected, raw = setup_k3

    def run(batch: RawBatch):
        d = copy.deepcopy(draft)
        d.set_attention_backend(backend)
        m = make_module(d, selected, ttt_steps=3)(**module_inputs(batch))
        m.loss.backward()
        return m, {n: q.grad.clone() for n, q in d.named_parameters() if q.grad is not None}

    base, base_grads = run(raw)
    gen = torch.Generator().manual_seed(99)
    pad = slice(LENGTHS[1], T)
    other = replace(raw, ids=raw.ids.clone(), aux=raw.aux.clone(), logits=raw.logits.clone())
    other.ids[1, pad] = torch.randint(1, V, (T - LENGTHS[1],), generator=gen)
    other.aux[1, pad] = 10 * torch.randn(T - LENGTHS[1], 3 * H_T, generator=gen, dtype=DTYPE)
    other.logits[1, pad] = 10 * torch.randn(T - LENGTHS[1], V, generator=gen, dtype=DTYPE)
    changed, changed_grads = run(other)
    assert torch.equal(base.loss, changed.loss)
    assert torch.equal(base.step_valid_tokens, changed.step_valid_tokens)
    assert torch.equal(base.prefix_hits, changed.prefix_hits)
    for name, g in base_grads.items():
        torch.testing.assert_close(g, changed_grads[name], rtol=0, atol=1e-12, msg=name)


# --------------------------------------------------------------------------- top-k path
class _ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor produced by an aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for r in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(r, torch.Tensor):
                self.shapes.append(tuple(r.shape))
        return result


def _run_with_grads(draft, selected, inputs, ttt_steps=3):
    d = copy.deepcopy(draft)
    recorder = _ShapeRecorder()
    with recorder:
        metrics = make_module(d, selected, ttt_steps)(**inputs)
        metrics.loss.backward()
    grads = {n: q.grad.clone() for n, q in d.named_parameters() if q.grad is not None}
    full_vocab = any(len(s) >= 2 and V in s for s in recorder.shapes)
    return metrics, grads, full_vocab


def _assert_same_metrics(a: Eagle3StepMetrics, b: Eagle3StepMetrics, grads_a, grads_b) -> None:
    assert_close(a.loss, b.loss)
    assert_close(a.step_losses, b.step_losses)
    assert torch.equal(a.step_valid_tokens, b.step_valid_tokens)
    assert torch.equal(a.prefix_hits, b.prefix_hits) and torch.equal(a.prefix_valid, b.prefix_valid)
    assert_close(a.accuracy, b.accuracy)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-9, atol=1e-12, msg=name)


def test_topk_with_full_vocab_equals_dense(setup_k3):
    draft, selected, raw = setup_k3
    gen = torch.Generator().manual_seed(5)
    perm = torch.stack([torch.stack([torch.randperm(V, generator=gen) for _ in range(T)]) for _ in range(B)])
    lp = torch.log_softmax(raw.logits, -1).gather(-1, perm)
    dense_inputs = module_inputs(raw)
    topk_inputs = dict(dense_inputs, target_logits=TopKLogProbs(shift(perm), shift(lp)))
    dense, dense_grads, dense_full = _run_with_grads(draft, selected, dense_inputs)
    sparse, sparse_grads, _ = _run_with_grads(draft, selected, topk_inputs)
    _assert_same_metrics(sparse, dense, sparse_grads, dense_grads)


def test_topk_subset_equals_dense_on_masked_logits(setup_k3):
    """k < V: renormalise over in-draft top-k entries == dense path with the rest at -inf."""
    draft, selected, raw = setup_k3
    gen = torch.Generator().manual_seed(11)
    k = 12
    in_draft = torch.zeros(V, dtype=torch.bool)
    in_draft[selected] = True
    token_ids = torch.empty(B, T, k, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            while True:
                cand = torch.randperm(V, generator=gen)[:k]
                if in_draft[cand].any():
                    break
            token_ids[b, t] = cand
    # Include each slot's true argmax for half the slots so both in- and out-of-draft modes occur.
    token_ids[:, ::2, 0] = raw.logits[:, ::2].argmax(-1)
    lp = torch.log_softmax(raw.logits, -1).gather(-1, token_ids)
    masked = torch.full_like(raw.logits, float("-inf")).scatter(-1, token_ids, lp)
    dense_inputs = dict(module_inputs(raw), target_logits=shift(masked))
    topk_inputs = dict(module_inputs(raw), target_logits=TopKLogProbs(shift(token_ids), shift(lp)))
    dense, dense_grads, _ = _run_with_grads(draft, selected, dense_inputs)
    sparse, sparse_grads, sparse_full = _run_with_grads(draft, selected, topk_inputs)
    assert not sparse_full, "top-k path materialised a tensor with a full-vocab dimension"
    with _ShapeRecorder() as recorder:  # the detector itself does see such tensors
        torch.zeros(B, T, V).softmax(-1)
    assert any(V in s for s in recorder.shapes)
    _assert_same_metrics(sparse, dense, sparse_grads, dense_grads)
    # Out-of-draft greedy entries exist and are excluded from supervision.
    best = token_ids.gather(-1, lp.argmax(-1, keepdim=True)).squeeze(-1)
    assert (~in_draft[best] & raw.loss_mask.bool()).any()


# --------------------------------------------------------------------------- draft model / config
def test_draft_state_dict_layout():
    cfg = make_config()
    draft = Eagle3DraftModel(cfg)
    shapes = {n: tuple(t.shape) for n, t in draft.state_dict().items()}
    assert shapes == {
        "embed_tokens.weight": (V, H),
        "fc.weight": (H, 3 * H_T),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (N_HEADS * HEAD_DIM, 2 * H),
        "midlayer.self_attn.k_proj.weight": (N_KV * HEAD_DIM, 2 * H),
        "midlayer.self_attn.v_proj.weight": (N_KV * HEAD_DIM, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, N_HEADS * HEAD_DIM),
        "midlayer.mlp.gate_proj.weight": (INTER, H),
        "midlayer.mlp.up_proj.weight": (INTER, H),
        "midlayer.mlp.down_proj.weight": (H, INTER),
        "norm.weight": (H,),
        "lm_head.weight": (V_D, H),
        "d2t": (V_D,),
        "t2d": (V,),
    }
    assert draft.d2t.dtype == torch.long and draft.t2d.dtype == torch.bool
    assert not draft.embed_tokens.weight.requires_grad
    assert torch.equal(draft.norm.weight, torch.ones(H))

    selected = make_selected()
    draft.set_vocab_mapping(selected)
    assert torch.equal(torch.arange(V_D) + draft.d2t, selected)
    assert torch.equal(draft.draft_to_target_ids(), selected)
    assert torch.equal(draft.t2d.nonzero().squeeze(-1), selected)
    with pytest.raises(ValueError):
        draft.set_vocab_mapping(selected.flip(0))
    with pytest.raises(ValueError):
        draft.load_target_embeddings(torch.zeros(V, H + 1))


def test_trainer_rejects_mismatched_vocab_mapping():
    draft = Eagle3DraftModel(make_config())  # still the identity mapping
    with pytest.raises(ValueError, match="set_vocab_mapping"):
        make_module(draft, make_selected(), ttt_steps=2)


def test_rope_inverse_frequencies_survive_bf16_cast():
    draft = Eagle3DraftModel(make_config(rope_theta=500000.0))
    before = draft.midlayer.self_attn.rotary_emb.inv_freq.clone()
    draft = draft.to(torch.bfloat16)
    rotary = draft.midlayer.self_attn.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, before)
    assert draft.fc.weight.dtype == torch.bfloat16
    module = make_module(draft, torch.arange(V_D), ttt_steps=2)
    raw = make_raw_batch()
    inputs = module_inputs(raw)
    inputs["aux_hidden_states"] = inputs["aux_hidden_states"].bfloat16()
    inputs["target_logits"] = inputs["target_logits"].bfloat16()
    metrics = module(**inputs)
    assert metrics.loss.dtype == torch.float32 and torch.isfinite(metrics.loss)


def test_draft_config_roundtrip_and_validation():
    target = LlamaConfig(
        hidden_size=H,
        intermediate_size=INTER,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        vocab_size=V,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    cfg = DraftConfig.from_target_config(target, draft_vocab_size=V_D)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.head_dim == H // N_HEADS and cfg.target_hidden_size == H and cfg.max_position_embeddings == 131072
    d = cfg.to_hf_dict()
    json.dumps(d)
    assert d["architectures"] == ["LlamaForCausalLMEagle3"] and d["num_hidden_layers"] == 1
    assert d["tie_word_embeddings"] is False and d["draft_vocab_size"] == V_D and d["torch_dtype"] == "bfloat16"
    assert d["rope_parameters"]["rope_type"] == "llama3" and d["rope_parameters"]["rope_theta"] == 500000.0
    assert DraftConfig.from_hf_dict({**d, "unknown_key": 1}) == cfg
    Eagle3DraftModel(cfg)  # llama3 rotary builds

    plain = make_config()
    assert plain.to_hf_dict()["rope_scaling"] is None
    assert DraftConfig.from_hf_dict(plain.to_hf_dict()) == plain
    # Old-style target config without head_dim / rope_parameters.
    legacy = SimpleNamespace(
        hidden_size=H, intermediate_size=INTER, num_attention_heads=N_HEADS, num_key_value_heads=N_KV,
        rms_norm_eps=1e-5, vocab_size=V, max_position_embeddings=2048, rope_theta=10000.0, rope_scaling=None,
    )
    assert DraftConfig.from_target_config(legacy, V_D).head_dim == H // N_HEADS

    with pytest.raises(ValueError, match="divisible"):
        make_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        make_config(draft_vocab_size=V + 1)
    with pytest.raises(ValueError, match="positive"):
        make_config(hidden_size=0)


def test_block_causal_bool_mask_equals_padding_mask():
    """A 4-D boolean allowed-mask (the packing hook) reproduces the 2-D padding mask exactly."""
    draft, selected = make_draft()
    raw = make_raw_batch()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask4d = (causal[None] & raw.attention_mask.bool()[:, None, :])[:, None]
    inputs = module_inputs(raw)
    module = make_module(draft, selected, ttt_steps=3)
    with torch.no_grad():
        a = module(**inputs)
        b = module(**dict(inputs, attention_mask=mask4d))
    assert torch.equal(a.step_losses, b.step_losses)
    with pytest.raises(ValueError, match="attention_mask"):
        module(**dict(inputs, attention_mask=mask4d.float()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_kernel_matches_eager_on_cuda(dtype):
    """The compiled flex kernel (CUDA only) against the eager backend: loss, metrics and gradients.

    T = 300 is not a multiple of the 128-token tile, rows are right-padded, GQA is on and K = 4.
    """
    torch.manual_seed(0)
    config = make_config(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=16, vocab_size=1000, draft_vocab_size=200, target_hidden_size=64,
                         max_position_embeddings=1024)
    seq, lengths = 300, (300, 211)
    eager = Eagle3DraftModel(config).cuda().to(dtype)
    flex = copy.deepcopy(eager)
    flex.set_attention_backend("flex")
    gen = torch.Generator().manual_seed(1)
    attn = torch.zeros(2, seq, dtype=torch.long)
    for b, length in enumerate(lengths):
        attn[b, :length] = 1
    ids = torch.randint(0, 1000, (2, seq), generator=gen) * attn
    inputs = dict(
        input_ids=_shift_left_with_zero(ids),
        attention_mask=attn,
        loss_mask=_shift_left_with_zero(attn),
        aux_hidden_states=torch.randn(2, seq, 192, generator=gen).to(dtype),
        target_logits=_shift_left_with_zero(TopKLogProbs(
            torch.randint(0, 1000, (2, seq, 8), generator=gen),
            torch.log_softmax(torch.randn(2, seq, 8, generator=gen), -1))),
    )
    selected = torch.arange(200)
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[:200] = True
    results = []
    for draft in (eager, flex):
        module = Eagle3TrainerModule(draft, selected_token_ids=selected, selected_token_mask=mask, ttt_steps=4).cuda()
        cuda_inputs = {k: (v.cuda() if torch.is_tensor(v) else TopKLogProbs(v.token_ids.cuda(), v.logprobs.cuda()))
                       for k, v in inputs.items()}
        metrics = module(**cuda_inputs)
        metrics.loss.backward()
        results.append((metrics, {n: p.grad.float() for n, p in draft.named_parameters() if p.grad is not None}))
    (m_eager, g_eager), (m_flex, g_flex) = results
    assert m_flex.step_valid_tokens.tolist() == m_eager.step_valid_tokens.tolist()
    if dtype == torch.float32:
        torch.testing.assert_close(m_flex.step_losses, m_eager.step_losses, rtol=2e-4, atol=2e-5)
        for name, grad in g_eager.items():
            scale = grad.abs().max().clamp_min(1e-6)
            torch.testing.assert_close(g_flex[name] / scale, grad / scale, rtol=2e-4, atol=2e-5, msg=name)
        return
    # bf16: the kernels round differently (flex keeps scores and P@V in fp32), so compare the
    # losses loosely and the gradients by direction.
    torch.testing.assert_close(m_flex.step_losses.float(), m_eager.step_losses.float(), rtol=2e-2, atol=2e-2)
    for name, grad in g_eager.items():
        cosine = F.cosine_similarity(g_flex[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, f"{name}: gradient cosine {float(cosine):.4f}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_kernel_stays_compiled_over_mixed_shapes(monkeypatch):
    """Rows, lengths (below, at and above one tile), TTT steps and grad mode vary in training;
    each must run the compiled kernel (a recompile-limit fallback raises here) and match eager."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True, raising=False)
    torch.manual_seed(0)
    config = make_config(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=16, vocab_size=1000, draft_vocab_size=200, max_position_embeddings=1024)
    eager = Eagle3DraftModel(config).cuda()
    flex = copy.deepcopy(eager)
    flex.set_attention_backend("flex")
    selected, mask = torch.arange(200), torch.zeros(1000, dtype=torch.bool)
    mask[:200] = True
    gen = torch.Generator().manual_seed(2)
    for rows, seq in ((1, 50), (3, 128), (2, 300), (1, 700), (4, 90)):
        ids = torch.randint(0, 1000, (rows, seq), generator=gen)
        inputs = dict(input_ids=ids, attention_mask=torch.ones(rows, seq, dtype=torch.long), loss_mask=torch.ones(rows, seq),
                      aux_hidden_states=torch.randn(rows, seq, 3 * H_T, generator=gen),
                      target_logits=TopKLogProbs(torch.randint(0, 1000, (rows, seq, 4), generator=gen),
                                                 torch.log_softmax(torch.randn(rows, seq, 4, generator=gen), -1)))
        inputs = {k: (v.cuda() if torch.is_tensor(v) else TopKLogProbs(v.token_ids.cuda(), v.logprobs.cuda()))
                  for k, v in inputs.items()}
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                losses = [Eagle3TrainerModule(d, selected_token_ids=selected, selected_token_mask=mask, ttt_steps=3)
                          .cuda()(**inputs).step_losses for d in (eager, flex)]
            torch.testing.assert_close(losses[1], losses[0], rtol=2e-4, atol=2e-5)


def test_auto_attention_picks_flex_only_where_the_cuda_kernel_fits():
    from pipeline.config import ConfigError
    from stage_train.trainer import resolve_attention

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_attention("auto", cuda, 64) == "flex"
    assert resolve_attention("auto", cuda, 8) == "eager"  # the compiled kernel needs heads of >= 16
    assert resolve_attention("auto", cpu, 64) == "eager"
    assert resolve_attention("flex", cpu, 8) == "flex"  # the CPU path is dense SDPA over the same layout
    with pytest.raises(ConfigError, match="head_dim >= 16"):
        resolve_attention("flex", cuda, 8)
