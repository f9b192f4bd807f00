"""Packed extraction (``--batching packed``): a batch's samples in one row, no padding.

The features of every sample must be what a forward of that sample alone computes: positions
restart per sample and no token attends across samples.  The reference is the model's own
attention on one unpadded sample, which shares no code with the packed attention function.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.batching import consecutive_batches
from schemas.manifest import CacheError, ExtractSettings, read_manifest
from schemas.store import CacheReader
from stage_extract import packed_attention
from stage_extract.features import extract_batch, extract_packed
from stage_extract.packed_attention import PACKED_ATTENTION, _causal_varlen, pack_samples, packed_attention_forward
from tests.conftest import extract_config


@pytest.fixture(scope="module")
def gqa_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def test_consecutive_batches_keep_order_and_budget():
    cut = consecutive_batches(np.array([5, 3, 8, 2, 9, 1]), 10)
    assert [b.tolist() for b in cut] == [[0, 1], [2, 3], [4, 5]]
    # a sample over the budget goes alone; an exact fit closes the batch
    assert [b.tolist() for b in consecutive_batches(np.array([4, 12, 6, 4]), 10)] == [[0], [1], [2, 3]]
    assert consecutive_batches(np.array([], dtype=int), 10) == []


def test_pack_samples_restarts_positions_per_sample():
    packed = pack_samples([np.array([7, 8, 9]), np.array([4]), np.array([5, 6])])
    assert packed.input_ids.tolist() == [[7, 8, 9, 4, 5, 6]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert packed.cu_seq_lens.dtype == torch.int32 and packed.cu_seq_lens.tolist() == [0, 3, 4, 6]
    assert packed.max_length == 3 and packed.lengths == [3, 1, 2]
    with pytest.raises(ValueError, match="no empty sample"):
        pack_samples([np.array([1]), np.array([], dtype=np.int64)])


@pytest.mark.parametrize("teacher", ["topk", "both"])
def test_packed_features_equal_each_sample_alone(gqa_model, teacher):
    rng = np.random.default_rng(3)
    samples = [rng.integers(0, 300, n) for n in (9, 1, 33, 17, 2)]
    kwargs = dict(layer_ids=(0, 1, 3), top_k=6, teacher=teacher)
    packed = extract_packed(gqa_model, pack_samples(samples), **kwargs)
    assert packed.lengths == [9, 1, 33, 17, 2] and packed.aux_hidden.shape == (62, 3 * 64)
    start = 0
    for ids in samples:
        rows = slice(start, start + len(ids))
        start += len(ids)
        alone = extract_batch(gqa_model, torch.from_numpy(ids)[None], torch.ones(1, len(ids), dtype=torch.long), **kwargs)
        # a token that saw another sample would differ by O(1), rounding by ~1e-7
        torch.testing.assert_close(packed.aux_hidden[rows].float(), alone.aux_hidden.float(), rtol=2 ** -8, atol=1e-6)
        torch.testing.assert_close(packed.topk_logprobs[rows], alone.topk_logprobs, rtol=0, atol=1e-5)
        assert torch.equal(packed.topk_ids[rows], alone.topk_ids)
        if teacher == "both":
            torch.testing.assert_close(packed.final_hidden[rows].float(), alone.final_hidden.float(), rtol=2 ** -8, atol=1e-6)
    assert bool(packed.finite.all())


def test_packing_changes_what_a_padded_batch_would_mix(gqa_model):
    """The check above can fail: the same row without sample boundaries (one long sequence)
    gives the later samples different features."""
    rng = np.random.default_rng(4)
    samples = [rng.integers(0, 300, n) for n in (12, 10)]
    packed = extract_packed(gqa_model, pack_samples(samples), layer_ids=(0, 1, 3), top_k=4)
    joined = np.concatenate(samples)
    merged = extract_batch(gqa_model, torch.from_numpy(joined)[None], torch.ones(1, 22, dtype=torch.long),
                           layer_ids=(0, 1, 3), top_k=4)
    assert torch.equal(packed.aux_hidden[:12], merged.aux_hidden[:12])
    assert (packed.aux_hidden[12:].float() - merged.aux_hidden[12:].float()).abs().max() > 0.05


def test_packed_attention_is_scoped_and_refuses_a_forward_without_boundaries(gqa_model):
    before = gqa_model.config._attn_implementation
    with packed_attention.packed_attention(gqa_model):
        assert gqa_model.config._attn_implementation == PACKED_ATTENTION
        with packed_attention.packed_attention(gqa_model):  # re-entrant
            pass
        assert gqa_model.config._attn_implementation == PACKED_ATTENTION
        with pytest.raises(RuntimeError, match="sample boundaries"):
            gqa_model.model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)
    assert gqa_model.config._attn_implementation == before


def _reference_attention(query, key, value, bounds, scale):
    """Plain per-sample causal softmax attention, [T, H, D], GQA by repetition."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.zeros_like(query)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[start:stop].transpose(0, 1) for t in (query, key, value))
        scores = (q @ k.transpose(1, 2)) * scale
        causal = torch.ones(stop - start, stop - start, dtype=torch.bool).tril()
        out[start:stop] = (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v).transpose(0, 1)
    return out


def _fake_old_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    """The first released signature: causal flag, no scale, no GQA."""
    assert is_causal and key.shape[1] == query.shape[1] and max_q == max_k
    return _reference_attention(query, key, value, cu_seq_q.tolist(), query.shape[-1] ** -0.5)


def _fake_new_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """The later signature: causal as a window, a scale, GQA in the kernel."""
    assert window_size == (-1, 0) and enable_gqa and key.shape[1] < query.shape[1]
    return _reference_attention(query, key, value, cu_seq_q.tolist(), query.shape[-1] ** -0.5 if scale is None else scale)


@pytest.mark.parametrize("scale", [0.3, 8 ** -0.5])  # 0.3 is not the kernel's default 1/sqrt(D): the old
@pytest.mark.parametrize("fake", [_fake_old_varlen, _fake_new_varlen])  # signature must fold it into the queries
def test_varlen_call_adapts_to_the_kernel_signature(fake, scale):
    import inspect

    torch.manual_seed(0)
    bounds = [0, 5, 6, 14]
    query, key, value = torch.randn(14, 4, 8), torch.randn(14, 2, 8), torch.randn(14, 2, 8)
    cu = torch.tensor(bounds, dtype=torch.int32)
    kernel = (fake, frozenset(inspect.signature(fake).parameters))
    got = _causal_varlen(query, key, value, cu, 8, scale, kernel)
    torch.testing.assert_close(got, _reference_attention(query, key, value, bounds, scale), rtol=1e-5, atol=1e-6)
    # and the per-sample SDPA fallback agrees with the same reference
    via_sdpa, _ = packed_attention_forward(None, query.transpose(0, 1)[None], key.transpose(0, 1)[None],
                                           value.transpose(0, 1)[None], None, scaling=scale, cu_seq_lens_q=cu, max_length_q=8)
    torch.testing.assert_close(via_sdpa[0], _reference_attention(query, key, value, bounds, scale), rtol=1e-5, atol=1e-6)


def test_batching_is_recorded_old_caches_read_padded_and_resume_keeps_it(tiny_target_dir, chat_jsonl, tiny_cache, tmp_path):
    from pipeline.config import ConfigError, ExtractConfig
    from stage_extract.cache_dir import resumed_setting
    from stage_extract.run import run_extract

    with pytest.raises(ConfigError, match="--batching must be one of"):
        ExtractConfig(out="x", batching="ragged")
    assert read_manifest(tiny_cache).settings.batching == "packed"  # the default for a new cache
    old = json.loads((tiny_cache / "extract.json").read_text())["settings"]
    del old["batching"]  # an extract.json written before the option
    assert ExtractSettings.from_dict(old).batching == "padded"

    padded = tmp_path / "padded"
    run_extract(extract_config(padded, tiny_target_dir, chat_jsonl, batching="padded"))
    assert resumed_setting(padded, "batching", "auto") == "padded"
    assert resumed_setting(padded, "batching", "packed") == "packed"
    assert run_extract(extract_config(padded, tiny_target_dir, chat_jsonl))["merged"]  # auto: resumes as padded
    with pytest.raises(CacheError, match="batching: existing 'padded', requested 'packed'"):
        run_extract(extract_config(padded, tiny_target_dir, chat_jsonl, batching="packed"))

    # The two layouts compute the same cache up to rounding: same samples, ids and masks exactly.
    a, b = CacheReader(tiny_cache), CacheReader(padded)
    assert len(a) == len(b) > 3
    for i in range(len(a)):
        x, y = a.read_sample(i), b.read_sample(i)
        assert np.array_equal(x["input_ids"], y["input_ids"]) and np.array_equal(x["loss_mask"], y["loss_mask"])
        torch.testing.assert_close(torch.as_tensor(x["aux_hidden"]).float(), torch.as_tensor(y["aux_hidden"]).float(),
                                   rtol=2 ** -7, atol=1e-5)
        assert np.array_equal(x["topk_ids"][:, 0], y["topk_ids"][:, 0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_features_on_cuda_match_each_sample_alone(dtype):
    """bf16 goes through PyTorch's varlen flash kernel, fp32 through per-sample SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to("cuda", dtype).eval()
    rng = np.random.default_rng(5)
    samples = [rng.integers(0, 1000, n) for n in (700, 3, 1500, 64, 129)]
    kwargs = dict(layer_ids=(0, 1, 3), top_k=8)
    packed = extract_packed(model, pack_samples(samples, pin=True).to(torch.device("cuda")), **kwargs)
    start, worst = 0, 0.0
    for ids in samples:
        rows = slice(start, start + len(ids))
        start += len(ids)
        alone = extract_batch(model, torch.from_numpy(ids)[None].cuda(), torch.ones(1, len(ids), dtype=torch.long, device="cuda"), **kwargs)
        diff = (packed.aux_hidden[rows].float() - alone.aux_hidden.float()).norm() / alone.aux_hidden.float().norm()
        worst = max(worst, float(diff))
        agree = (packed.topk_ids[rows, 0] == alone.topk_ids[:, 0]).float().mean()
        assert agree > (0.97 if dtype == torch.bfloat16 else 0.999)
    assert worst < (2e-2 if dtype == torch.bfloat16 else 5e-4)  # fp32: other kernels, other sums (8.8e-5 on an H200)
