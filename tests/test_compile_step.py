"""``compile_step=True`` (each TTT step's work around the attention through ``torch.compile``)
against the eager step: the same losses, metrics, gradients and optimizer trajectory over
several steps, with the reference and the fused loss, and on CUDA beside flex attention."""

from __future__ import annotations

import copy

import pytest
import torch

from stage_train.core import Eagle3TrainerModule
from tests.test_checkpointing import assert_same, planted, teacher_inputs  # noqa: F401  (fixture)


def _module(draft, selected, *, compile_step: bool, soft_ce: str = "reference", checkpointing: bool = False):
    mask = torch.zeros(draft.config.vocab_size, dtype=torch.bool)
    mask[selected] = True
    return Eagle3TrainerModule(draft, selected_token_ids=selected, selected_token_mask=mask, ttt_steps=3,
                               soft_ce=soft_ce, gradient_checkpointing=checkpointing, compile_step=compile_step)


@pytest.mark.parametrize("soft_ce,checkpointing", [("reference", False), ("fused", True)])
def test_compiled_step_follows_the_eager_step_for_three_optimizer_steps(planted, soft_ce, checkpointing):  # noqa: F811
    draft, selected, raw = planted
    inputs = teacher_inputs(raw, selected, "topk")
    drafts = {mode: copy.deepcopy(draft) for mode in ("eager", "compiled")}
    modules = {mode: _module(d, selected, compile_step=mode == "compiled", soft_ce=soft_ce, checkpointing=checkpointing)
               for mode, d in drafts.items()}
    # SGD, not AdamW: Adam divides by the gradient's running size, so fp32-level differences in
    # near-zero gradients would flip whole updates and hide what this test compares.
    optims = {mode: torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
              for mode, d in drafts.items()}
    losses = []
    for _ in range(3):
        out = {}
        for mode in drafts:
            optims[mode].zero_grad()
            metrics = modules[mode](**inputs)
            metrics.loss.backward()
            out[mode] = (metrics, {n: p.grad.clone() for n, p in drafts[mode].named_parameters() if p.requires_grad})
            optims[mode].step()
        (compiled, compiled_grads), (eager, eager_grads) = out["compiled"], out["eager"]
        # fp32 rounding, not fp64: the RoPE tables are computed in fp32, and inductor fuses their
        # cast into the rotation (a wrong step would be off by orders of magnitude more)
        assert_same(compiled, eager, compiled_grads, eager_grads, rtol=1e-5, atol=1e-7)
        losses.append(float(eager.loss.detach()))
    assert modules["compiled"].draft_model.midlayer.compiled and not modules["eager"].draft_model.midlayer.compiled
    assert losses[-1] < losses[0]
    with torch.no_grad():  # validation (no autograd) through the compiled step too
        evaluated = modules["compiled"](**inputs)
        reference = modules["eager"](**inputs)
    torch.testing.assert_close(evaluated.step_losses, reference.step_losses, rtol=1e-6, atol=1e-8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_step_with_flex_attention_matches_eager_on_cuda():
    """The compiled pieces around flex attention, bf16 autocast, two batch shapes (one graph for
    both): the same step losses and metrics, gradients pointing the same way."""
    from stage_train.core import TopKLogProbs
    from stage_train.draft import Eagle3DraftModel
    from tests.test_core import H_T, make_config

    torch.manual_seed(0)
    config = make_config(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=16, vocab_size=1000, draft_vocab_size=200, max_position_embeddings=1024)
    template = Eagle3DraftModel(config).cuda()
    template.set_attention_backend("flex")
    selected, mask = torch.arange(200), torch.zeros(1000, dtype=torch.bool)
    mask[:200] = True
    modules = {mode: Eagle3TrainerModule(copy.deepcopy(template), selected_token_ids=selected, selected_token_mask=mask,
                                         ttt_steps=3, soft_ce="fused", compile_step=mode == "compiled").cuda()
               for mode in ("eager", "compiled")}
    for rows, seq in ((2, 160), (3, 200)):
        gen = torch.Generator().manual_seed(rows)
        top_ids = torch.randint(0, 1000, (rows, seq, 8), generator=gen)
        attention = torch.ones(rows, seq, dtype=torch.long)
        attention[0, seq - 17:] = 0  # a padded row
        inputs = dict(input_ids=torch.randint(0, 1000, (rows, seq), generator=gen), attention_mask=attention,
                      loss_mask=attention.float(), aux_hidden_states=torch.randn(rows, seq, 3 * H_T, generator=gen),
                      target_logits=TopKLogProbs(top_ids, torch.log_softmax(torch.randn(rows, seq, 8, generator=gen), -1)))
        inputs = {k: (v.cuda() if torch.is_tensor(v) else TopKLogProbs(v.token_ids.cuda(), v.logprobs.cuda()))
                  for k, v in inputs.items()}
        out = {}
        for mode, module in modules.items():
            module.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                metrics = module(**inputs)
            metrics.loss.backward()
            grads = torch.cat([p.grad.flatten().float() for p in module.parameters() if p.grad is not None])
            out[mode] = (metrics, grads)
        (compiled, g_compiled), (eager, g_eager) = out["compiled"], out["eager"]
        torch.testing.assert_close(compiled.step_losses, eager.step_losses, rtol=2e-3, atol=1e-4)
        assert torch.equal(compiled.prefix_valid, eager.prefix_valid)
        assert torch.cosine_similarity(g_compiled, g_eager, dim=0) > 0.999


def test_training_with_compiled_steps_follows_the_eager_run(tiny_cache, tmp_path):
    """`talon train --compile-step` on the tiny cache: the same loss trace and accuracies."""
    import json

    from stage_train.trainer import run_train
    from tests.test_train import train_config

    traces = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        summary = run_train(train_config(tiny_cache, out, compile_step=compiled, val_fraction=0.25))
        assert summary["compile_step"] is compiled
        traces[compiled] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in traces[True]] == [r["step"] for r in traces[False]] == [2, 4, 6]
    for compiled, eager in zip(traces[True], traces[False]):
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
        assert compiled["step_accuracy"] == eager["step_accuracy"]


def test_compile_step_is_refused_with_fsdp():
    from pipeline.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="--compile-step is not supported with --fsdp"):
        TrainConfig(cache="c", out="o", compile_step=True, fsdp=True)
