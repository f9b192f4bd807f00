"""The fused sparse soft cross-entropy (``soft_ce="fused"``) against the reference path:
the loss, argmax and logit gradients of the function itself, and the loss, metrics, gradients
and AdamW trajectory of the whole TTT unroll, with and without gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch

from stage_train.core import Eagle3TrainerModule
from stage_train.soft_ce import sparse_soft_cross_entropy
from tests.test_checkpointing import assert_same, planted, teacher_inputs  # noqa: F401  (fixture)


def reference(logits, ids, probs, mask):
    """The reference path of ``stage_train.core``: upcast to at least fp32, log-softmax, gather."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    ce = -(probs * torch.log_softmax(x, -1).gather(-1, ids)).sum(-1)
    ce = torch.where(mask, ce, torch.zeros_like(ce))
    return ce.sum() / mask.sum().clamp_min(1), x.argmax(-1)


def teacher(shape, vocab, k, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (*shape, k), generator=gen)
    ids[..., -1] = ids[..., 0]  # a column twice in one row: its gradients add up
    probs = torch.softmax(torch.randn(*shape, k, generator=gen, dtype=torch.float64), -1)
    probs[..., 1] = 0.0  # an out-of-draft entry (clamped id, zero mass)
    mask = torch.rand(shape, generator=gen) > 0.3
    mask[0, 0] = True
    return ids, probs, mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_argmax_and_gradient_equal_the_reference(dtype):
    ids, probs, mask = teacher((3, 5), 50, 6, seed=1)
    logits = torch.randn(3, 5, 50, dtype=dtype, generator=torch.Generator().manual_seed(2), requires_grad=True)
    ref_logits = logits.detach().clone().requires_grad_(True)
    loss, argmax = sparse_soft_cross_entropy(logits, ids, probs.to(dtype), mask)
    ref_loss, ref_argmax = reference(ref_logits, ids, probs.to(dtype), mask)
    (2.5 * loss).backward()
    (2.5 * ref_loss).backward()
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.to(ref_loss.dtype), ref_loss, **tol)
    assert torch.equal(argmax, ref_argmax)
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad, ref_logits.grad, **tol)
    assert torch.all(logits.grad[~mask] == 0)  # masked rows get no gradient
    assert float(logits.grad.abs().sum()) > 0


def test_bf16_logits_give_the_fp32_reference_of_the_same_values():
    """Under autocast the head returns bf16 logits: the loss is the fp32 reference of those exact
    values, and the gradient comes back in bf16 (the reference's fp32 gradient, rounded)."""
    ids, probs, mask = teacher((4, 6), 64, 8, seed=3)
    logits = (torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(4)) * 3).bfloat16().requires_grad_(True)
    as_fp32 = logits.detach().float().requires_grad_(True)
    loss, argmax = sparse_soft_cross_entropy(logits, ids, probs.float(), mask)
    ref_loss, ref_argmax = reference(as_fp32, ids, probs.float(), mask)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    assert torch.equal(argmax, ref_argmax)
    assert logits.grad.dtype == torch.bfloat16
    assert torch.equal(logits.grad, as_fp32.grad.bfloat16())


def test_a_non_finite_masked_row_stays_out_of_the_loss():
    ids, probs, mask = teacher((2, 4), 30, 5, seed=6)
    mask[1, 2] = False
    logits = torch.randn(2, 4, 30, dtype=torch.float64)
    logits[1, 2, 7] = float("inf")  # a padded slot's logits may be anything
    loss, _ = sparse_soft_cross_entropy(logits, ids, probs, mask)
    ref_loss, _ = reference(logits, ids, probs, mask)
    assert torch.isfinite(loss) and torch.isfinite(ref_loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)


def test_an_all_masked_batch_gives_zero_loss_and_gradient():
    ids, probs, _ = teacher((2, 3), 20, 4, seed=5)
    logits = torch.randn(2, 3, 20, dtype=torch.float64, requires_grad=True)
    loss, _ = sparse_soft_cross_entropy(logits, ids, probs, torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(logits.grad == 0)


def _module(draft, selected, soft_ce: str, checkpointing: bool = False) -> Eagle3TrainerModule:
    mask = torch.zeros(draft.config.vocab_size, dtype=torch.bool)
    mask[selected] = True
    return Eagle3TrainerModule(draft, selected_token_ids=selected, selected_token_mask=mask, ttt_steps=3,
                               gradient_checkpointing=checkpointing, soft_ce=soft_ce)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_unroll_equals_the_reference_unroll(planted, checkpointing):  # noqa: F811
    draft, selected, raw = planted
    inputs = teacher_inputs(raw, selected, "topk")
    results = {}
    for impl in ("reference", "fused"):
        copied = copy.deepcopy(draft)
        metrics = _module(copied, selected, impl, checkpointing)(**inputs)
        metrics.loss.backward()
        results[impl] = (metrics, {n: p.grad for n, p in copied.named_parameters() if p.requires_grad})
    (fused, fused_grads), (ref, ref_grads) = results["fused"], results["reference"]
    assert_same(fused, ref, fused_grads, ref_grads, rtol=1e-11, atol=1e-13)
    assert int(ref.prefix_hits[0]) > 0  # the planted chains hit, so the accuracies are not all zero


def test_fused_unroll_keeps_the_adamw_trajectory(planted):  # noqa: F811
    draft, selected, raw = planted
    inputs = teacher_inputs(raw, selected, "topk")
    drafts = {impl: copy.deepcopy(draft) for impl in ("reference", "fused")}
    modules = {impl: _module(d, selected, impl) for impl, d in drafts.items()}
    optims = {impl: torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=1e-2) for impl, d in drafts.items()}
    losses = []
    for _ in range(3):
        step = {}
        for impl in drafts:
            optims[impl].zero_grad()
            step[impl] = modules[impl](**inputs)
            step[impl].loss.backward()
            optims[impl].step()
        torch.testing.assert_close(step["fused"].loss, step["reference"].loss, rtol=1e-11, atol=1e-13)
        for (name, a), (_, b) in zip(drafts["fused"].named_parameters(), drafts["reference"].named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
        losses.append(float(step["reference"].loss.detach()))
    assert losses[-1] < losses[0]


def test_dense_teachers_ignore_the_option(planted):  # noqa: F811
    draft, selected, raw = planted
    inputs = teacher_inputs(raw, selected, "dense")
    a = _module(copy.deepcopy(draft), selected, "fused")(**inputs)
    b = _module(copy.deepcopy(draft), selected, "reference")(**inputs)
    assert torch.equal(a.loss, b.loss)
    with pytest.raises(ValueError, match="soft_ce must be one of"):
        _module(draft, selected, "triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_kernels_match_the_reference_on_cuda():
    """bf16 logits of a realistic width through the compiled CUDA passes, twice with other row
    counts (dynamic shapes), against the fp32 reference of the same values."""
    for rows, vocab in ((300, 32000), (1000, 32000)):
        gen = torch.Generator(device="cuda").manual_seed(rows)
        ids = torch.randint(0, vocab, (1, rows, 64), device="cuda", generator=gen)
        probs = torch.softmax(torch.randn(1, rows, 64, device="cuda", generator=gen), -1)
        mask = torch.rand(1, rows, device="cuda", generator=gen) > 0.2
        logits = (torch.randn(1, rows, vocab, device="cuda", generator=gen) * 4).bfloat16().requires_grad_(True)
        as_fp32 = logits.detach().float().requires_grad_(True)
        loss, argmax = sparse_soft_cross_entropy(logits, ids, probs, mask)
        ref_loss, ref_argmax = reference(as_fp32, ids, probs, mask)
        loss.backward()
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert torch.equal(argmax, ref_argmax)
        torch.testing.assert_close(logits.grad.float(), as_fp32.grad.bfloat16().float(), rtol=0.02, atol=1e-6)


def test_training_with_the_fused_loss_follows_the_reference_run(tiny_cache, tmp_path):
    """`talon train --soft-ce fused` on the tiny cache: the same loss trace, to fp32 rounding."""
    import json

    from stage_train.trainer import run_train
    from tests.test_train import train_config

    traces = {}
    for impl in ("reference", "fused"):
        summary = run_train(train_config(tiny_cache, tmp_path / impl, soft_ce=impl, val_fraction=0.25))
        assert summary["soft_ce"] == impl
        traces[impl] = [json.loads(line) for line in (tmp_path / impl / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in traces["fused"]] == [r["step"] for r in traces["reference"]] == [2, 4, 6]
    for fused, ref in zip(traces["fused"], traces["reference"]):
        assert fused["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert fused["step_accuracy"] == ref["step_accuracy"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_unroll_matches_the_reference_on_cuda_under_autocast(checkpointing):
    """The compiled passes inside the unroll, under bf16 autocast and (non-reentrant)
    checkpointing: the same step losses and metrics, and gradients pointing the same way."""
    from stage_train.core import TopKLogProbs
    from stage_train.draft import Eagle3DraftModel
    from tests.test_core import H_T, make_config

    torch.manual_seed(0)
    config = make_config(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=16, vocab_size=1000, draft_vocab_size=200, max_position_embeddings=1024)
    template = Eagle3DraftModel(config).cuda()
    selected, mask = torch.arange(200), torch.zeros(1000, dtype=torch.bool)
    mask[:200] = True
    gen = torch.Generator().manual_seed(3)
    rows, seq = 2, 160
    top_ids = torch.randint(0, 1000, (rows, seq, 8), generator=gen)
    inputs = dict(input_ids=torch.randint(0, 1000, (rows, seq), generator=gen),
                  attention_mask=torch.ones(rows, seq, dtype=torch.long), loss_mask=torch.ones(rows, seq),
                  aux_hidden_states=torch.randn(rows, seq, 3 * H_T, generator=gen),
                  target_logits=TopKLogProbs(top_ids, torch.log_softmax(torch.randn(rows, seq, 8, generator=gen), -1)))
    inputs = {k: (v.cuda() if torch.is_tensor(v) else TopKLogProbs(v.token_ids.cuda(), v.logprobs.cuda()))
              for k, v in inputs.items()}
    out = {}
    for impl in ("reference", "fused"):
        draft = copy.deepcopy(template)
        module = Eagle3TrainerModule(draft, selected_token_ids=selected, selected_token_mask=mask, ttt_steps=3,
                                     gradient_checkpointing=checkpointing, soft_ce=impl).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            metrics = module(**inputs)
        metrics.loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in draft.parameters() if p.requires_grad and p.grad is not None])
        out[impl] = (metrics, grads)
    (fused, g_fused), (ref, g_ref) = out["fused"], out["reference"]
    torch.testing.assert_close(fused.step_losses, ref.step_losses, rtol=1e-4, atol=1e-5)
    assert torch.equal(fused.prefix_valid, ref.prefix_valid)
    assert torch.cosine_similarity(g_fused, g_ref, dim=0) > 0.999
