"""The teacher's top-k log-probs (stage_extract.head_topk) against log_softmax then topk."""

from __future__ import annotations

import warnings

import pytest
import torch

from stage_extract.head_topk import _triton_kernel, row_logsumexp, topk_from_logits


def reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, ids = torch.topk(torch.log_softmax(logits.double(), dim=-1), k=k, dim=-1)
    return ids, values


def distinct_logits(rows: int, vocab: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """Logits with no ties (so the top-k order is unique) that ``dtype`` holds exactly: each row
    a random draw, without repeats, of the bf16 values in [-12, 12]."""
    bits = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).double()
    values = bits[torch.isfinite(bits) & (bits.abs() <= 12)].unique()
    assert vocab <= len(values)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.stack([values[torch.randperm(len(values), generator=gen)[:vocab]] for _ in range(rows)])
    return logits.to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_logprobs_equal_log_softmax_then_topk(dtype):
    logits = distinct_logits(6, 500, dtype)
    ids, logprobs = topk_from_logits(logits, 16)
    want_ids, want = reference(logits, 16)
    assert ids.dtype == torch.int32 and logprobs.dtype == torch.float32
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(logprobs.double(), want, atol=2e-6, rtol=0)
    # sorted by decreasing log-prob, and the k largest of a distribution
    assert bool((logprobs[:, :-1] > logprobs[:, 1:]).all())
    assert bool((logprobs.exp().sum(-1) < 1).all())


def test_a_row_with_nan_gives_nan_log_probs():
    logits = distinct_logits(3, 300, torch.float32)
    logits[1, 17] = float("nan")
    _, logprobs = topk_from_logits(logits, 4)
    assert torch.isfinite(logprobs[[0, 2]]).all()
    assert not torch.isfinite(logprobs[1]).any()


def test_empty_input_gives_empty_outputs():
    ids, logprobs = topk_from_logits(torch.zeros((0, 50)), 8)
    assert ids.shape == (0, 8) and logprobs.shape == (0, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_fused_row_logsumexp_equals_torch_on_cuda(dtype):
    assert _triton_kernel() is not None, "Triton is missing: this would compare torch.logsumexp with itself"
    gen = torch.Generator().manual_seed(1)
    # widths below, at and across the kernel's 2,048-lane block, and the two real vocabularies
    for vocab in (7, 2048, 2049, 49152, 128256):
        logits = (torch.randn(37, vocab, generator=gen) * 6).to(dtype)
        logits[3, : vocab // 2] = float("-inf")  # a half-masked row
        logits[4] = float("-inf")  # an all -inf row: -inf, as torch.logsumexp
        logits[5, vocab - 1] = float("nan")
        logits[6, 0] = 60.0  # one dominant logit
        logits[7, vocab // 3] = float("inf")
        if dtype != torch.float16:  # magnitudes near the dtype's largest (float16's would overflow)
            logits[8] = logits[8].sign() * 3e38
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = row_logsumexp(logits.cuda()).cpu()
        assert not [w for w in caught if "log-sum-exp kernel failed" in str(w.message)]  # the kernel ran
        want = torch.logsumexp(logits.double(), dim=-1)
        assert torch.isnan(got[5]) and got[4] == float("-inf") and not torch.isfinite(got[7])
        keep = [i for i in range(37) if i not in (4, 5, 7)]
        torch.testing.assert_close(got[keep].double(), want[keep], atol=1e-5, rtol=1e-6)
    # a strided view (rows of a wider buffer) reads only its own columns
    wide = torch.randn(8, 600, generator=gen).to(dtype).cuda()
    torch.testing.assert_close(row_logsumexp(wide[:, :500]).double().cpu(),
                               torch.logsumexp(wide[:, :500].double(), dim=-1).cpu(), atol=1e-5, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_topk_logprobs_on_cuda_equal_log_softmax_then_topk():
    logits = distinct_logits(64, 49152 // 16, torch.bfloat16, device="cuda", seed=2)
    ids, logprobs = topk_from_logits(logits, 64)
    want_ids, want = reference(logits.cpu(), 64)
    assert torch.equal(ids.long().cpu(), want_ids)
    torch.testing.assert_close(logprobs.double().cpu(), want, atol=5e-6, rtol=0)
