"""Training from a tiny cache: metrics, vocab mapping, export layout, and target checks."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import TrainConfig
from schemas.manifest import CacheError, read_manifest
from stage_train.draft import DraftConfig
from stage_train.export import expected_tensors, load_exported_draft, read_export_config
from stage_train.trainer import run_train
from stage_train.vocab import select_draft_vocab


def train_config(cache, out, **overrides) -> TrainConfig:
    values = dict(cache=cache, out=out, ttt_steps=3, draft_vocab=4096, max_steps=6, lr=1e-3,
                  batch_tokens=256, device="cpu", log_every=2, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def test_draft_vocab_takes_most_frequent_and_pads_with_lowest_unused():
    vocab = select_draft_vocab({7: 5, 3: 9, 11: 5, 2: 1}, vocab_size=20, draft_vocab_size=5)
    # 3 (9), then 7 and 11 (5 each), then 2 (1), then the lowest unused id, 0
    assert vocab.selected_token_ids.tolist() == [0, 2, 3, 7, 11]
    assert vocab.d2t.tolist() == [0, 1, 1, 4, 7]
    assert vocab.t2d(20).nonzero().flatten().tolist() == [0, 2, 3, 7, 11]
    assert vocab.coverage == pytest.approx(1.0)
    assert select_draft_vocab({7: 5, 3: 9, 11: 5, 2: 1}, 20, 2).coverage == pytest.approx(14 / 20)


def test_training_writes_metrics_and_a_servable_export(tiny_cache, tmp_path):
    summary = run_train(train_config(tiny_cache, tmp_path / "run"))
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [2, 4, 6]
    for line in lines:
        assert len(line["step_accuracy"]) == 3
        assert line["loss"] > 0 and line["lr"] > 0
        assert line["valid_tokens"] > 0
        assert 1.0 <= line["simulated_acceptance_length"] <= 4.0
    assert summary["steps"] == 6 and summary["draft_vocab"] == 4096

    export = tmp_path / "run" / "export"
    config = read_export_config(export)
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["draft_vocab_size"] == 4096 and config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is False
    assert config["rope_theta"] == 10000.0 and config["max_position_embeddings"] == 1024
    manifest = read_manifest(tiny_cache)
    assert config["talon"]["target"]["config_hash"] == manifest.target.config_hash
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]

    tensors = load_file(str(export / "model.safetensors"))
    expected = expected_tensors(DraftConfig.from_hf_dict(config))
    assert set(tensors) == set(expected)
    for name, (shape, dtype) in expected.items():
        assert tuple(tensors[name].shape) == shape, name
        assert tensors[name].dtype == dtype, name
    vocab = select_draft_vocab(manifest.assistant_token_counts, 49152, 4096)
    assert torch.equal(tensors["d2t"], vocab.d2t)
    assert torch.equal(tensors["t2d"], vocab.t2d(49152))

    embed = load_file(str(tiny_cache / "target_head.safetensors"))["embed_tokens.weight"]
    draft = load_exported_draft(export, embed)
    assert torch.equal(draft.lm_head.weight, tensors["lm_head.weight"].float())
    assert not draft.embed_tokens.weight.requires_grad


def test_loss_falls_on_a_repeated_batch(tiny_cache, tmp_path):
    summary = run_train(train_config(tiny_cache, tmp_path / "run", max_steps=40, log_every=10, lr=3e-3, warmup_ratio=0.0))
    assert summary["final"]["loss"] < 0.8 * summary["first"]["loss"]


def test_training_refuses_a_cache_from_another_target(tiny_cache, smollm2_dir, tmp_path):
    with pytest.raises(CacheError) as err:
        run_train(train_config(tiny_cache, tmp_path / "run", target=str(smollm2_dir)))
    message = str(err.value)
    assert "hidden_size: cache has 64, target has 576" in message
    assert "weights_fingerprint" in message


def test_training_accepts_its_own_target(tiny_cache, tiny_target_dir, tmp_path):
    summary = run_train(train_config(tiny_cache, tmp_path / "run", target=str(tiny_target_dir), max_steps=1))
    assert summary["steps"] == 1


def test_training_an_incomplete_cache_says_how_to_resume(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "extract.json").write_text("{}")
    with pytest.raises(CacheError, match="Rerun the same `talon extract`"):
        run_train(train_config(tmp_path / "cache", tmp_path / "run"))


def test_final_hidden_teacher_supervises_the_same_slots_as_topk(tiny_target_dir, chat_jsonl, tmp_path):
    from stage_extract.run import run_extract
    from tests.conftest import extract_config

    run_extract(extract_config(tmp_path / "cache", tiny_target_dir, chat_jsonl, teacher="both"))
    exact = run_train(train_config(tmp_path / "cache", tmp_path / "exact", teacher="final-hidden", max_steps=2, log_every=1))
    topk = run_train(train_config(tmp_path / "cache", tmp_path / "topk", teacher="topk", max_steps=2, log_every=1))
    auto = run_train(train_config(tmp_path / "cache", tmp_path / "auto", max_steps=1))
    assert (exact["teacher"], topk["teacher"], auto["teacher"]) == ("final-hidden", "topk", "final-hidden")
    # the supervised slots depend only on the full-vocab argmax, which top-k keeps exactly
    assert exact["first"]["valid_tokens"] == topk["first"]["valid_tokens"] > 0
    # the targets differ: top-8 drops the tail mass that the exact teacher keeps
    assert exact["first"]["loss"] != topk["first"]["loss"]


def test_fp8_cache_trains_exactly_as_from_cpu_decoded_batches(tiny_target_dir, chat_jsonl, tmp_path, monkeypatch):
    """The trainer reads fp8 caches raw and decodes after the device copy; the losses and
    accuracies equal those of training on the reader's CPU-decoded batches."""
    from stage_extract.run import run_extract
    from stage_train import trainer
    from tests.conftest import extract_config

    run_extract(extract_config(tmp_path / "cache", tiny_target_dir, chat_jsonl, feature_dtype="fp8"))
    seen = []
    original = trainer.shifted_inputs

    def spy(batch, device, teacher=None):
        seen.append(batch.is_raw)
        return original(batch, device, teacher)

    monkeypatch.setattr(trainer, "shifted_inputs", spy)
    cfg = dict(max_steps=3, log_every=1, val_fraction=0.2, eval_every=3)
    on_device = run_train(train_config(tmp_path / "cache", tmp_path / "raw", **cfg))
    assert seen and all(seen)  # training and validation batches both arrived raw

    seen.clear()
    for name in ("iterate_batches", "iterate_random_access"):
        monkeypatch.setattr(trainer, name, partial(_decoded, getattr(trainer, name)))
    on_cpu = run_train(train_config(tmp_path / "cache", tmp_path / "decoded", **cfg))
    assert seen and not any(seen)
    for key in ("first", "final", "validation"):
        assert on_device[key] is not None
        assert {k: v for k, v in on_device[key].items() if k != "tokens_per_second"} == \
            {k: v for k, v in on_cpu[key].items() if k != "tokens_per_second"}, key


def _decoded(function, *args, **kwargs):
    kwargs["raw"] = False
    return function(*args, **kwargs)
