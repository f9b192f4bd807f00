"""Dense caches: fp8 aux states decode to bf16 planes close to the bf16 cache, the final-hidden
teacher equals the full-vocab top-k teacher, and the size arithmetic meets the 8B goals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from schemas.fp8 import E4M3FN_TABLE, bf16_bits_from_float32, dequantize_to_bf16_bits
from schemas.layout import raw_bytes_per_token
from schemas.manifest import read_manifest
from schemas.store import CacheReader
from schemas.validate import validate_cache
from stage_extract.quant import quantize_fp8
from stage_extract.run import run_extract
from stage_train.core import (
    DraftVocabLogits,
    SparseTargetDistribution,
    TopKLogProbs,
    _compute_target_distribution,
    _shift_left_with_zero,
)
from tests.conftest import CONVERSATIONS, extract_config


def bf16(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).float()


def per_token_relative_error(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (approx - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-12)


def test_fp8_table_and_bf16_rounding_match_torch():
    decoded = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(np.isnan(decoded), np.isnan(E4M3FN_TABLE))
    assert np.array_equal(np.nan_to_num(decoded), np.nan_to_num(E4M3FN_TABLE))
    values = torch.randn(4096) * torch.logspace(-30, 30, 4096)
    values[::97] = torch.tensor([1.0 + 2**-8])  # an exact tie: rounds to even (1.0)
    expected = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bf16_bits_from_float32(values.numpy()), expected)


def test_fp8_round_trip_is_within_the_format_precision():
    torch.manual_seed(0)
    values = torch.randn(300, 3 * 40) * torch.logspace(-3, 4, 300)[:, None]
    values[7, 50] = 25000.0  # one outlier channel, as in real aux states
    values[11, 40:80] = 0.0  # an all-zero group
    codes, scales = quantize_fp8(values, groups=3)
    assert codes.dtype == torch.uint8 and scales.shape == (300, 3)
    assert torch.all(scales[11, 1] == 1.0)
    decoded = bf16(dequantize_to_bf16_bits(codes.numpy(), scales.numpy()))
    assert torch.equal(decoded[11, 40:80], torch.zeros(40))
    # the group maximum maps to 448 exactly: only the final bf16 rounding remains
    assert decoded[7, 50] == torch.tensor(25000.0).to(torch.bfloat16).float()
    error = per_token_relative_error(decoded[:, :40], values[:, :40])
    assert error.max() < 0.05 and error.mean() < 0.04
    bad = values[:3].clone()
    bad[0, 3], bad[1, 50], bad[2, 100] = float("nan"), float("inf"), -float("inf")
    _, bad_scales = quantize_fp8(bad, groups=3)
    assert not torch.isfinite(bad_scales[0, 0]) and not torch.isfinite(bad_scales[1, 1]) and not torch.isfinite(bad_scales[2, 2])


def test_fp8_cache_decodes_close_to_the_bf16_cache(tiny_target_dir, chat_jsonl, tiny_cache, tmp_path):
    out = tmp_path / "fp8"
    summary = run_extract(extract_config(out, tiny_target_dir, chat_jsonl, feature_dtype="fp8"))
    assert summary["feature_dtype"] == "fp8"
    manifest = read_manifest(out)
    assert manifest.arrays["aux_hidden"] == {"storage": "uint8", "logical": "float8_e4m3fn"}
    assert manifest.arrays["aux_scale"] == {"storage": "float32", "logical": "float32"}
    assert validate_cache(out, deep=True).ok
    exact, quantised = CacheReader(tiny_cache), CacheReader(out)
    assert len(exact) == len(quantised)
    for i in range(len(exact)):
        a, b = exact.read_sample(i), quantised.read_sample(i)
        assert b["aux_hidden"].dtype == np.uint16 and b["aux_hidden"].shape == a["aux_hidden"].shape
        for name in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs"):
            assert np.array_equal(a[name], b[name]), name
        for layer in range(3):
            cols = slice(layer * 64, (layer + 1) * 64)
            assert per_token_relative_error(bf16(b["aux_hidden"][:, cols]), bf16(a["aux_hidden"][:, cols])).max() < 0.05
        raw = quantised.read_sample(i, raw=True)
        assert raw["aux_hidden"].dtype == np.uint8 and raw["aux_scale"].shape == (len(a["input_ids"]), 3)
    assert manifest.stored_bytes < read_manifest(tiny_cache).stored_bytes


def test_fp8_error_on_real_smollm2_features(smollm2_dir):
    """Per-token relative L2 error of fp8 aux states, on SmolLM2's own hidden states."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stage_extract.chat import tokenize_conversation
    from stage_extract.features import default_aux_layers, extract_batch
    from tests.conftest import CONVERSATIONS as chats

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    from stage_extract.records import _normalise_chat

    ids = [tokenize_conversation(tokenizer, _normalise_chat(c, "test"), max_length=128) for c in chats[:4]]
    ids = [torch.from_numpy(t.input_ids.astype(np.int64)) for t in ids if t is not None]
    width = max(len(t) for t in ids)
    batch = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, t in enumerate(ids):
        batch[row, : len(t)] = t
        mask[row, : len(t)] = 1
    layers = default_aux_layers(30)
    kwargs = dict(layer_ids=layers, top_k=4, teacher="topk", lengths=[len(t) for t in ids])
    exact = extract_batch(model, batch, mask, feature_dtype="bf16", **kwargs)
    fp8 = extract_batch(model, batch, mask, feature_dtype="fp8", **kwargs)
    decoded = bf16(dequantize_to_bf16_bits(fp8.aux_hidden.numpy(), fp8.aux_scale.numpy()))
    reference = exact.aux_hidden.float()
    assert reference.abs().max() > 1000  # SmolLM2's outlier channels are present
    for layer in range(3):
        cols = slice(layer * 576, (layer + 1) * 576)
        error = per_token_relative_error(decoded[:, cols], reference[:, cols])
        assert error.mean() < 0.04 and error.max() < 0.05, (layer, float(error.mean()), float(error.max()))


def _batch(reader: CacheReader, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    rows = [reader.read_sample(i, names) for i in range(len(reader))]
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for name in names:
        first = rows[0][name]
        array = np.zeros((len(rows), width) + first.shape[1:], dtype=first.dtype)
        for b, row in enumerate(rows):
            array[b, : len(row[name])] = row[name]
        out[name] = array
    out["valid"] = np.zeros((len(rows), width), dtype=bool)
    for b, row in enumerate(rows):
        out["valid"][b, : len(row["input_ids"])] = True
    return out


def test_full_vocab_topk_teacher_equals_the_final_hidden_teacher(tiny_target_dir, chat_jsonl, tmp_path):
    from stage_train.teacher import TargetHead, final_hidden_teacher

    out = tmp_path / "both"
    run_extract(extract_config(out, tiny_target_dir, chat_jsonl, teacher="both", top_k=49152,
                               max_samples=3, max_length=40, part_tokens=10_000))
    reader = CacheReader(out)
    assert reader.sample_fields == ("input_ids", "loss_mask", "aux_hidden", "topk_ids", "topk_logprobs", "final_hidden")
    batch = _batch(reader, ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "final_hidden"))
    loss_mask = torch.from_numpy(batch["loss_mask"].astype(bool) & batch["valid"])
    # a draft vocab holding about half of the target's likely greedy tokens (ids < 2048)
    selected = torch.cat([torch.arange(0, 2048, 2), torch.arange(2048, 3072)])
    mask = torch.zeros(49152, dtype=torch.bool)
    mask[selected] = True

    topk = TopKLogProbs(torch.from_numpy(batch["topk_ids"].astype(np.int64)), torch.from_numpy(batch["topk_logprobs"]))
    sparse, topk_positions = _compute_target_distribution(topk, selected, mask, loss_mask)
    assert isinstance(sparse, SparseTargetDistribution)
    dense_from_topk = torch.zeros(loss_mask.shape + (selected.numel(),))
    dense_from_topk.scatter_add_(-1, sparse.draft_ids, sparse.probs * (sparse.draft_ids >= 0))

    head = TargetHead.load(out)
    assert head.rms_norm_eps == pytest.approx(1e-6) and head.lm_head_weight.shape == (49152, 64)
    teacher = final_hidden_teacher(torch.from_numpy(batch["final_hidden"].view(np.int16)).view(torch.bfloat16),
                                   head, selected, mask, vocab_chunk=5000, token_chunk=16)
    probs, positions = _compute_target_distribution(teacher, selected, mask, loss_mask)
    valid = torch.from_numpy(batch["valid"])
    assert 0 < int(positions.sum()) < int(loss_mask.sum())  # some greedy tokens fall outside the draft vocab
    assert torch.equal(positions, topk_positions)
    torch.testing.assert_close(probs[valid], dense_from_topk[valid], atol=2e-5, rtol=1e-3)


def test_final_hidden_is_the_pre_norm_last_layer_output(tiny_target_dir, chat_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "final"
    run_extract(extract_config(out, tiny_target_dir, chat_jsonl, teacher="final-hidden", max_samples=2))
    reader = CacheReader(out)
    assert reader.sample_fields == ("input_ids", "loss_mask", "aux_hidden", "final_hidden")
    assert "topk_ids" not in read_manifest(out).arrays
    model = AutoModelForCausalLM.from_pretrained(str(tiny_target_dir), dtype=torch.float32).eval()
    row = reader.read_sample(0)
    with torch.no_grad():
        states = model(torch.from_numpy(row["input_ids"].astype(np.int64))[None], output_hidden_states=True).hidden_states
    final = model.model.norm  # HF's last hidden state is post-norm; ours is its input
    stored = bf16(row["final_hidden"])
    with torch.no_grad():
        torch.testing.assert_close(final(stored[None])[0], states[-1][0], atol=2e-2, rtol=2e-2)
    with safe_open(str(out / "target_head.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
        assert torch.equal(handle.get_tensor("norm.weight"), model.model.norm.weight.detach())
        assert float(handle.metadata()["rms_norm_eps"]) == model.config.rms_norm_eps


def test_draft_vocab_logits_give_the_dense_teacher_and_shift():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50)
    selected = torch.tensor([3, 7, 11, 20, 42])
    mask = torch.zeros(50, dtype=torch.bool)
    mask[selected] = True
    loss_mask = torch.ones(2, 5, dtype=torch.bool)
    dense_probs, dense_positions = _compute_target_distribution(logits, selected, mask, loss_mask)
    form = DraftVocabLogits(logits[..., selected], mask[logits.argmax(-1)])
    probs, positions = _compute_target_distribution(form, selected, mask, loss_mask)
    torch.testing.assert_close(probs, dense_probs)
    assert torch.equal(positions, dense_positions)
    shifted = _shift_left_with_zero(form)
    assert torch.equal(shifted.logits[:, :4], form.logits[:, 1:]) and not shifted.argmax_in_draft[:, 4].any()
    with pytest.raises(ValueError, match="must be"):
        DraftVocabLogits(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.bool))


def test_eight_b_layout_meets_the_density_goals():
    bf16_sizes = raw_bytes_per_token(4096, 128256, 64, "bf16", "topk")
    fp8_sizes = raw_bytes_per_token(4096, 128256, 64, "fp8", "topk")
    assert bf16_sizes["aux_hidden"] == 3 * 4096 * 2 and fp8_sizes["aux_hidden"] == 3 * 4096
    assert fp8_sizes["aux_scale"] == 12 and bf16_sizes["topk_ids"] == 64 * 4  # uint32 ids above 65536
    assert sum(bf16_sizes.values()) <= 25 * 1024  # raw, before any compression
    assert sum(fp8_sizes.values()) <= 13 * 1024
    both = raw_bytes_per_token(4096, 128256, 64, "bf16", "both")
    assert both["final_hidden"] == 4096 * 2


def test_estimate_projects_the_cache_it_predicts(tiny_target_dir, chat_jsonl, tiny_cache):
    from stage_extract.estimate import estimate_cache, estimate_tokens, target_shape

    manifest = read_manifest(tiny_cache)
    tokens = estimate_tokens(str(chat_jsonl), str(tiny_target_dir), max_length=64, max_samples=None, sample_records=100)
    assert tokens.records == len(CONVERSATIONS) - 1  # one has no assistant turn
    assert tokens.tokens == manifest.n_tokens  # every record sampled: the count is exact
    shape = target_shape(str(tiny_target_dir), None, None)
    assert (shape.hidden_size, shape.vocab_size) == (64, 49152)
    result = estimate_cache(shape, top_k=8, feature_dtype="bf16", teacher="topk", tokens=tokens)
    assert result["raw_bytes_per_token"] == 2 + 1 + 3 * 64 * 2 + 8 * 2 + 8 * 4
    assert manifest.stored_bytes <= result["projected_raw_bytes"] - result["target_head_bytes"] + 4096 * len(manifest.parts) * 7


def test_inspect_reports_fp8_arrays(tiny_target_dir, chat_jsonl, tmp_path):
    from pipeline.inspect_cache import describe_cache

    out = tmp_path / "fp8"
    run_extract(extract_config(out, tiny_target_dir, chat_jsonl, feature_dtype="fp8", max_samples=3))
    info = describe_cache(out)
    assert info["feature_dtype"] == "fp8" and info["teacher"] == "topk" and info["workers"] == 1
    assert set(info["arrays"]) == {"input_ids", "loss_mask", "aux_hidden", "aux_scale", "topk_ids", "topk_logprobs",
                                   "sample_offsets", "record_index"}
    assert info["arrays"]["aux_hidden"]["bytes_per_token"] < 3 * 64 * 1.1
    assert sum(a["stored_bytes"] for a in info["arrays"].values()) == info["stored_bytes"]


def test_torch_fp8_decode_is_bit_identical_to_the_numpy_reader():
    """The trainer's device-side decode (stage_extract.quant.dequantize_fp8) gives the very bf16
    bits the CPU reader gives, for every finite code and scales down to float32 subnormals."""
    from stage_extract.quant import dequantize_fp8

    codes = np.arange(256, dtype=np.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # the two NaN codes, which quantize_fp8 never emits
    rng = np.random.default_rng(0)
    scales = np.concatenate([rng.random(40, dtype=np.float32) * 100, rng.random(8, dtype=np.float32) * 1e-3,
                             np.float32([0.0, 1.0, 1 / 448, 448.0, 3e38 / 448, 1e-30, 1e-38, 2.0**-126])])
    grid = np.ascontiguousarray(np.broadcast_to(codes, (len(scales), 3, len(codes))).reshape(len(scales), -1))
    per_layer = np.ascontiguousarray(np.stack([scales, scales[::-1], scales * 0.5], axis=1), dtype=np.float32)
    expected = dequantize_to_bf16_bits(grid, per_layer)
    got = dequantize_fp8(torch.from_numpy(grid), torch.from_numpy(per_layer))
    assert got.dtype == torch.bfloat16
    assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16), expected)
    # leading batch dims, as in a padded [B, T, 3H] batch
    batched = dequantize_fp8(torch.from_numpy(grid).reshape(2, -1, grid.shape[1]), torch.from_numpy(per_layer).reshape(2, -1, 3))
    assert torch.equal(batched.reshape(got.shape).view(torch.int16), got.view(torch.int16))
    with pytest.raises(ValueError, match="do not fit"):
        dequantize_fp8(torch.zeros(4, 10, dtype=torch.uint8), torch.ones(4, 3))


def _same_batch(raw, decoded) -> None:
    from stage_train.trainer import shifted_inputs

    assert raw.is_raw and not decoded.is_raw and raw.aux_hidden_states is None
    assert raw.aux_codes.dtype == torch.uint8 and raw.aux_scale.dtype == torch.float32
    assert raw.aux_codes.shape == decoded.aux_hidden_states.shape and raw.aux_scale.shape == raw.aux_codes.shape[:2] + (3,)
    assert raw.aux_codes.element_size() * 2 == decoded.aux_hidden_states.element_size()  # half the bytes to copy
    # bit for bit, padding (zero codes, zero scales) included
    assert torch.equal(raw.aux_states().view(torch.int16), decoded.aux_states().view(torch.int16))
    assert torch.equal(raw.aux_states(), decoded.aux_hidden_states)
    for name in ("input_ids", "attention_mask", "loss_mask", "topk_ids", "topk_logprobs"):
        assert torch.equal(getattr(raw, name), getattr(decoded, name)), name
    assert raw.n_tokens == decoded.n_tokens
    a, b = shifted_inputs(raw, torch.device("cpu")), shifted_inputs(decoded, torch.device("cpu"))
    assert torch.equal(a["aux_hidden_states"], b["aux_hidden_states"]) and a["aux_hidden_states"].dtype == torch.float32


def test_raw_fp8_batches_decode_to_the_old_readers_values(tiny_target_dir, chat_jsonl, tmp_path):
    """The trainer's path (raw codes + scales collated, decoded after ``.to(device)``) gives the
    aux states the CPU-decoding reader gave, exactly, for ranged and windowed reads."""
    import itertools

    from stage_train.data import BatchPlan, iterate_batches, load_batch

    out = tmp_path / "fp8"
    run_extract(extract_config(out, tiny_target_dir, chat_jsonl, feature_dtype="fp8"))
    reader = CacheReader(out)
    assert len(reader.manifest.parts) > 1 and len(reader) > 4
    ids = np.arange(len(reader))
    for samples, max_length in [(ids, None), (ids[::-1][:5], 17), (ids[2:3], None)]:
        raw = load_batch(reader, samples, max_length, raw=True).to(torch.device("cpu"))
        decoded = load_batch(reader, samples, max_length)
        _same_batch(raw, decoded)
    plan = BatchPlan(reader, 96, seed=3, window_parts=2)
    n = plan.batches_per_epoch()
    raws = itertools.islice(iterate_batches(reader, plan, raw=True, max_length=40), n)
    olds = itertools.islice(iterate_batches(reader, plan, max_length=40), n)
    for (e1, i1, raw), (e2, i2, decoded) in zip(raws, olds, strict=True):
        assert (e1, i1) == (e2, i2)
        _same_batch(raw.to(torch.device("cpu")), decoded)
    # other callers (inspect, validate, evaluation) still get decoded bf16 bits by default
    assert reader.read_sample(0)["aux_hidden"].dtype == np.uint16 and "aux_scale" not in reader.read_sample(0)


def test_raw_bf16_batches_are_the_decoded_batches(tiny_cache):
    from stage_train.data import load_batch

    reader = CacheReader(tiny_cache)
    raw, plain = load_batch(reader, np.arange(4), raw=True), load_batch(reader, np.arange(4))
    assert not raw.is_raw and raw.aux_scale is None
    assert torch.equal(raw.aux_states().view(torch.int16), plain.aux_hidden_states.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_raw_fp8_batches_decode_on_the_gpu_to_the_cpu_readers_bits(tiny_target_dir, chat_jsonl, tmp_path):
    from stage_train.data import load_batch

    out = tmp_path / "fp8"
    run_extract(extract_config(out, tiny_target_dir, chat_jsonl, feature_dtype="fp8"))
    reader = CacheReader(out)
    samples = np.arange(len(reader))
    raw = load_batch(reader, samples, raw=True, pin_memory=True)
    assert raw.aux_codes.is_pinned() and raw.aux_scale.is_pinned() and raw.input_ids.is_pinned()
    on_gpu = raw.to(torch.device("cuda")).aux_states()
    assert on_gpu.is_cuda
    decoded = load_batch(reader, samples).aux_hidden_states
    assert torch.equal(on_gpu.cpu().view(torch.int16), decoded.view(torch.int16))
