"""Gradient checkpointing of the TTT unroll (``Eagle3TrainerModule(gradient_checkpointing=True)``).

Checkpointing must change memory only: the loss, every per-step metric, every gradient and the
AdamW trajectory are compared with the plain unroll, and the bytes kept alive between forward
and backward are measured to show that the [B, T, V_d] activations are gone and that each extra
TTT step adds only its K/V and hidden state.
"""

from __future__ import annotations

import copy
import gc
import json

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import stage_train.core as core
from pipeline.config import ConfigError, TrainConfig, train_config_from_dict
from stage_train.core import DraftVocabLogits, Eagle3StepMetrics, Eagle3TrainerModule, TopKLogProbs
from stage_train.draft import Eagle3DraftModel
from tests.test_core import B, DTYPE, V, make_config, make_draft, make_raw_batch, module_inputs, plant_chains, shift


def make_module(draft, selected, ttt_steps: int, checkpointing: bool) -> Eagle3TrainerModule:
    mask = torch.zeros(draft.config.vocab_size, dtype=torch.bool)
    mask[selected] = True
    return Eagle3TrainerModule(draft, selected_token_ids=selected, selected_token_mask=mask,
                               ttt_steps=ttt_steps, gradient_checkpointing=checkpointing)


def teacher_inputs(raw, selected, teacher: str) -> dict:
    """Module inputs of the padded test batch with a dense, top-k or draft-vocab-logit teacher."""
    inputs = module_inputs(raw)
    if teacher == "topk":
        top = raw.logits.topk(12, dim=-1)  # about half the entries fall outside the draft vocab
        logprobs = torch.log_softmax(raw.logits, -1).gather(-1, top.indices)
        inputs["target_logits"] = TopKLogProbs(shift(top.indices), shift(logprobs))
    elif teacher == "draft-logits":
        in_draft = torch.zeros(V, dtype=torch.bool)
        in_draft[selected] = True
        inputs["target_logits"] = DraftVocabLogits(shift(raw.logits[..., selected]), shift(in_draft[raw.logits.argmax(-1)]))
    return inputs


def run(draft, selected, inputs, ttt_steps: int, checkpointing: bool):
    """Forward + backward on a copy of ``draft``; metrics, gradients and midlayer forward calls."""
    draft = copy.deepcopy(draft)
    calls = []
    handle = draft.midlayer.mlp.register_forward_hook(lambda *_: calls.append(1))
    metrics = make_module(draft, selected, ttt_steps, checkpointing)(**inputs)
    metrics.loss.backward()
    handle.remove()
    grads = {n: p.grad for n, p in draft.named_parameters() if p.requires_grad}
    return metrics, grads, len(calls)


def assert_same(a: Eagle3StepMetrics, b: Eagle3StepMetrics, grads_a, grads_b, rtol=1e-12, atol=1e-14) -> None:
    close = dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(a.loss, b.loss, **close)
    torch.testing.assert_close(a.step_losses, b.step_losses, **close)
    torch.testing.assert_close(a.step_accuracies, b.step_accuracies, rtol=0, atol=0)
    torch.testing.assert_close(a.accuracy, b.accuracy, rtol=0, atol=0)
    torch.testing.assert_close(a.simulated_acceptance_length, b.simulated_acceptance_length, rtol=0, atol=0)
    for name in ("valid_tokens", "step_valid_tokens", "prefix_hits", "prefix_valid"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name] is not None and grads_b[name] is not None, name
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name, **close)


@pytest.fixture(scope="module")
def planted():
    """The tiny fp64 draft and a padded batch (lengths 7 and 5) whose chains hit at K=3."""
    draft, selected = make_draft()
    return draft, selected, plant_chains(draft, selected, make_raw_batch(), ttt_steps=3)


@pytest.mark.parametrize("teacher", ["dense", "topk", "draft-logits"])
@pytest.mark.parametrize("ttt_steps", [1, 3])
def test_checkpointing_gives_the_same_loss_metrics_and_gradients(planted, teacher, ttt_steps):
    draft, selected, raw = planted
    inputs = teacher_inputs(raw, selected, teacher)
    plain, plain_grads, plain_calls = run(draft, selected, inputs, ttt_steps, checkpointing=False)
    ckpt, ckpt_grads, ckpt_calls = run(draft, selected, inputs, ttt_steps, checkpointing=True)
    assert plain.loss.dtype == DTYPE
    # Each step really was recomputed in backward (and only then).
    assert (plain_calls, ckpt_calls) == (ttt_steps, 2 * ttt_steps)
    assert_same(ckpt, plain, ckpt_grads, plain_grads)
    assert int(plain.valid_tokens) > 0 and int(plain.prefix_hits[0]) > 0
    if ttt_steps == 3:
        assert int(plain.prefix_hits[-1]) > 0  # the planted chain scores at every depth

    # Without autograd (validation) checkpointing is skipped and the metrics are unchanged.
    with torch.no_grad():
        evaluated = make_module(copy.deepcopy(draft), selected, ttt_steps, checkpointing=True)(**inputs)
    assert not evaluated.loss.requires_grad
    torch.testing.assert_close(evaluated.step_losses, plain.step_losses, rtol=1e-12, atol=1e-14)
    assert torch.equal(evaluated.prefix_hits, plain.prefix_hits)


def test_checkpointing_gives_the_same_gradients_in_fp32(planted):
    draft, selected, raw = planted
    draft = copy.deepcopy(draft).float()
    inputs = teacher_inputs(raw, selected, "topk")
    topk = inputs["target_logits"]
    inputs.update(aux_hidden_states=inputs["aux_hidden_states"].float(),
                  target_logits=TopKLogProbs(topk.token_ids, topk.logprobs.float()))
    plain, plain_grads, _ = run(draft, selected, inputs, 3, checkpointing=False)
    ckpt, ckpt_grads, _ = run(draft, selected, inputs, 3, checkpointing=True)
    assert plain.loss.dtype == torch.float32
    assert_same(ckpt, plain, ckpt_grads, plain_grads, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("teacher", ["dense", "topk"])
def test_checkpointing_keeps_the_adamw_trajectory(planted, teacher):
    draft, selected, raw = planted
    inputs = teacher_inputs(raw, selected, teacher)
    drafts = {on: copy.deepcopy(draft) for on in (False, True)}
    modules = {on: make_module(drafts[on], selected, 3, checkpointing=on) for on in (False, True)}
    optims = {on: torch.optim.AdamW([p for p in drafts[on].parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
              for on in (False, True)}
    losses = []
    for _ in range(3):
        metrics = {}
        for on in (False, True):
            optims[on].zero_grad()
            metrics[on] = modules[on](**inputs)
            metrics[on].loss.backward()
            optims[on].step()
        torch.testing.assert_close(metrics[True].loss, metrics[False].loss, rtol=1e-12, atol=1e-14)
        assert torch.equal(metrics[True].prefix_hits, metrics[False].prefix_hits)
        for (name, a), (_, b) in zip(drafts[True].named_parameters(), drafts[False].named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
        losses.append(float(metrics[False].loss.detach()))
    assert losses[-1] < losses[0]


def test_flex_attention_backend_checkpoints_the_same(planted):
    """The flex attention backend (its CPU fallback) caches un-expanded K/V; same contract."""
    draft, selected, raw = planted
    if not hasattr(draft, "set_attention_backend"):
        pytest.skip("this draft has a single attention backend")
    draft = copy.deepcopy(draft)
    draft.set_attention_backend("flex")
    inputs = teacher_inputs(raw, selected, "topk")
    plain, plain_grads, _ = run(draft, selected, inputs, 3, checkpointing=False)
    ckpt, ckpt_grads, calls = run(draft, selected, inputs, 3, checkpointing=True)
    assert calls == 6
    assert_same(ckpt, plain, ckpt_grads, plain_grads)


# --------------------------------------------------------------------------- memory kept for backward
class _StorageRecorder(TorchDispatchMode):
    """Weak references to the storage of every tensor an aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: list[tuple[StorageWeakRef, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for r in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(r, torch.Tensor):
                storage = r.untyped_storage()
                self.storages.append((StorageWeakRef(storage), storage.nbytes()))
        return result


def _tensors(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    return [t for t in vars(value).values() if torch.is_tensor(t)] if hasattr(value, "__dict__") else []


def kept_for_backward(module: Eagle3TrainerModule, inputs: dict) -> tuple[int, int]:
    """Bytes that one forward leaves alive for backward, measured two ways.

    ``saved``: tensors autograd saves during the forward, as seen by ``saved_tensors_hooks``
    (unique storages). Inside a step a non-reentrant checkpoint's own hooks take over and save
    nothing, and the step's inputs are saved through the outer hooks (so they are counted).
    ``retained``: every storage created during the forward that is still alive once the forward
    has returned (only the loss's graph and the metrics are held), however it is held; it does
    not depend on how checkpointing keeps its inputs. Parameters, buffers and the batch itself
    are excluded from both.
    """
    existing = {StorageWeakRef(t.untyped_storage()).cdata
                for t in [*module.parameters(), *module.buffers(), *(x for v in inputs.values() for x in _tensors(v))]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ref = StorageWeakRef(t.untyped_storage())
        if ref.cdata not in existing:
            saved[ref.cdata] = t.untyped_storage().nbytes()
        return t

    recorder = _StorageRecorder()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
        metrics = module(**inputs)
    gc.collect()
    alive = {ref.cdata: nbytes for ref, nbytes in recorder.storages if not ref.expired() and ref.cdata not in existing}
    metrics.loss.backward()  # the graph was complete and usable
    return sum(saved.values()), sum(alive.values())


BIG_V, BIG_V_D, BIG_T = 4096, 2048, 64


@pytest.fixture(scope="module")
def big_vocab():
    """fp32 draft with H=32 and a 2048-token draft vocab; padded batch B=2, T=64 (lengths 64, 40)."""
    torch.manual_seed(0)
    draft = Eagle3DraftModel(make_config(vocab_size=BIG_V, draft_vocab_size=BIG_V_D, max_position_embeddings=256))
    selected = torch.arange(0, BIG_V, 2)
    draft.set_vocab_mapping(selected)
    gen = torch.Generator().manual_seed(1)
    attn = torch.zeros(B, BIG_T, dtype=torch.long)
    attn[0], attn[1, :40] = 1, 1
    logits = torch.randn(B, BIG_T, BIG_V, generator=gen)
    top = logits.topk(16, dim=-1)
    batch = dict(input_ids=torch.randint(0, BIG_V, (B, BIG_T), generator=gen) * attn, attention_mask=attn,
                 loss_mask=attn.clone(), aux_hidden_states=torch.randn(B, BIG_T, 3 * draft.config.target_hidden_size, generator=gen))
    teachers = {"dense": logits, "topk": TopKLogProbs(top.indices, torch.log_softmax(logits, -1).gather(-1, top.indices))}
    # What one step adds to the cache plus its new hidden state: the floor of any unroll.
    cache: list[list[torch.Tensor]] = [[], []]
    with torch.no_grad():
        hidden = draft.decoder_step(draft.embed(batch["input_ids"]), draft.project_hidden(batch["aux_hidden_states"]),
                                    cache, attn, torch.arange(BIG_T).expand(B, BIG_T))
    step_state = sum(t.nbytes for t in cache[0] + cache[1]) + hidden.nbytes
    return draft, selected, batch, teachers, step_state


MEASURED: dict = {}


@pytest.mark.parametrize("teacher", ["topk", "dense"])
def test_checkpointing_keeps_only_step_inputs_and_kv_for_backward(big_vocab, teacher):
    draft, selected, batch, teachers, step_state = big_vocab
    inputs = dict(batch, target_logits=teachers[teacher])
    kept = {(k, on): kept_for_backward(make_module(draft, selected, k, on), inputs) for k in (2, 4) for on in (False, True)}
    MEASURED[teacher] = {f"K={k} {'ckpt' if on else 'plain'}": {"saved": s, "retained": r} for (k, on), (s, r) in kept.items()}
    print(json.dumps({teacher: MEASURED[teacher], "step_state_bytes": step_state}))
    log_probs = B * BIG_T * BIG_V_D * 4  # one fp32 [B, T, V_d] tensor
    for k in (2, 4):
        (saved_plain, retained_plain), (saved_ckpt, retained_ckpt) = kept[(k, False)], kept[(k, True)]
        assert saved_ckpt < 0.5 * saved_plain and retained_ckpt < 0.5 * retained_plain, (k, kept)
    # Without checkpointing every step keeps at least its fp32 log-probs (the measure sees them) ...
    plain_growth = (kept[(4, False)][1] - kept[(2, False)][1]) / 2
    assert plain_growth >= log_probs
    # ... with it a step adds only its K/V and hidden state (plus [B, T] ids and masks).
    ckpt_growth = (kept[(4, True)][1] - kept[(2, True)][1]) / 2
    assert step_state <= ckpt_growth <= 1.1 * step_state + 16 * B * BIG_T, (ckpt_growth, step_state)


# --------------------------------------------------------------------------- config and trainer wiring
def test_train_config_accepts_gradient_checkpointing(tmp_path):
    base = {"cache": str(tmp_path), "out": str(tmp_path / "run")}
    assert train_config_from_dict(base, where="t").gradient_checkpointing is False
    assert train_config_from_dict({**base, "gradient_checkpointing": True}, where="t").gradient_checkpointing is True
    with pytest.raises(ConfigError, match="--gradient-checkpointing"):
        train_config_from_dict({**base, "gradient_checkpointing": "yes"}, where="t")


def test_cli_option_and_config_file_reach_the_trainer(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import stage_train.trainer as trainer
    from pipeline.cli import app

    seen: list[TrainConfig] = []
    monkeypatch.setattr(trainer, "run_train", lambda cfg, resume=False: seen.append(cfg) or {})
    (tmp_path / "train.toml").write_text("gradient_checkpointing = true\n")
    runner = CliRunner()
    common = ["train", "--cache", str(tmp_path), "--out", str(tmp_path / "run")]
    for extra in ([], ["--gradient-checkpointing"], ["--config", str(tmp_path / "train.toml")],
                  ["--config", str(tmp_path / "train.toml"), "--no-gradient-checkpointing"]):
        seen.clear()
        runner.invoke(app, common + extra + ["--json"])
        assert len(seen) == 1, extra
        assert seen[0].gradient_checkpointing is (extra in (["--gradient-checkpointing"], ["--config", str(tmp_path / "train.toml")])), extra
    help_text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"}).output
    assert "--gradient-checkpointing" in help_text and "--no-gradient-checkpointing" in help_text


def test_trainer_checkpoints_and_logs_the_same_losses(tiny_cache, tmp_path, monkeypatch):
    from stage_train.trainer import run_train
    from tests.test_train import train_config

    calls = []
    original = core.checkpoint
    monkeypatch.setattr(core, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    summaries = {on: run_train(train_config(tiny_cache, tmp_path / f"run-{on}", max_steps=4, gradient_checkpointing=on))
                 for on in (False, True)}
    assert len(calls) == 4 * 3  # every TTT step of every optimizer step, and only when asked
    lines = {on: [json.loads(line) for line in (tmp_path / f"run-{on}" / "metrics.jsonl").read_text().splitlines()]
             for on in (False, True)}
    assert [line["step"] for line in lines[True]] == [line["step"] for line in lines[False]] == [2, 4]
    for a, b in zip(lines[True], lines[False]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["step_accuracy"] == pytest.approx(b["step_accuracy"], abs=1e-6)
    assert json.loads((tmp_path / "run-True" / "config.json").read_text())["train"]["gradient_checkpointing"] is True
    assert summaries[True]["final"]["loss"] == pytest.approx(summaries[False]["final"]["loss"], rel=1e-5)
