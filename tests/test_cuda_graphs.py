"""CUDA graphs of the packed forward (``--cuda-graphs``).

The padding that gives a batch a static shape must leave every real token's features as its own
forward computes them, and the replay machinery (static buffers, one graph per shape, copies of
the real rows) must hand each batch its own features even after later replays.  On the CPU the
graphs are stood in for by a recorder whose "replay" reruns the recorded function: it reads the
static input buffers and writes the output buffers exactly as a replayed graph does, so all of the
logic but the CUDA capture itself runs here; the GPU test captures for real.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, ExtractConfig
from stage_extract.cuda_graphs import GraphedPackedForward, StaticShape, pad_to_shape, static_shape, use_cuda_graphs
from stage_extract.features import extract_packed
from stage_extract.packed_attention import pack_samples

KWARGS = dict(layer_ids=(0, 1, 3), top_k=6, teacher="both")


@pytest.fixture(scope="module")
def gqa_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(8)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=512)
    return LlamaForCausalLM(config).double().eval()  # float64: no near-ties between rows computed at other widths


def assert_same_features(got, want) -> None:
    """Equal up to rounding (the padded row's matmuls have other shapes); ids exactly."""
    assert got.lengths == want.lengths and got.tensors().keys() == want.tensors().keys()
    for name, tensor in want.tensors().items():
        other = got.tensors()[name]
        if tensor.is_floating_point():  # bf16 planes may round a last bit (up to 2^-7) the other way
            torch.testing.assert_close(other.double(), tensor.double(), rtol=2 ** -7, atol=1e-5)
        else:
            assert torch.equal(other, tensor), name


class RerunRecorder:
    """Stands in for CUDA graphs on the CPU: the replay reruns what was recorded."""

    def __init__(self, fail: bool = False):
        self.recorded = 0
        self.fail = fail

    def warm_up(self, fn):
        return fn()

    def record(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        self.recorded += 1
        return fn


def test_static_shape_rounds_up_within_the_budget():
    assert static_shape([300, 200], 1000) == StaticShape(tokens=500, sequences=8, max_length=512)
    # 510 tokens round up to 625 (a step is 1000 / 8): one pseudo-sample of 115 tokens
    assert static_shape([300, 210], 1000) == StaticShape(tokens=625, sequences=8, max_length=512)
    # twenty short samples and the pseudo-sample need 21 sequences: 32
    assert static_shape([10] * 20, 1000) == StaticShape(tokens=250, sequences=32, max_length=128)
    assert static_shape([600, 401], 1000) is None  # over the budget: eager
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(1, 700, rng.integers(1, 12)).tolist()
        shape = static_shape(lengths, 4096)
        if sum(lengths) > 4096:
            assert shape is None
            continue
        assert sum(lengths) <= shape.tokens <= 4096 and (shape.tokens % 512 == 0 or shape.tokens == 4096)
        assert shape.max_length >= max(lengths) and shape.max_length & (shape.max_length - 1) == 0
        pseudo = -(-(shape.tokens - sum(lengths)) // shape.max_length)
        assert shape.sequences >= len(lengths) + pseudo and shape.sequences & (shape.sequences - 1) == 0


def test_pad_to_shape_appends_pseudo_samples_and_empty_sequences():
    packed = pack_samples([np.array([7, 8, 9]), np.array([4, 5])])
    padded = pad_to_shape(packed, StaticShape(tokens=12, sequences=8, max_length=4))
    assert padded.input_ids.tolist() == [[7, 8, 9, 4, 5] + [0] * 7]
    # the 7 padding tokens: pseudo-samples of at most max_length, positions restarting in each
    assert padded.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]
    assert padded.lengths == [3, 2, 4, 3] and padded.max_length == 4
    assert padded.cu_seq_lens.dtype == torch.int32
    assert padded.cu_seq_lens.tolist() == [0, 3, 5, 9, 12, 12, 12, 12, 12]
    with pytest.raises(ValueError, match="does not fit"):
        pad_to_shape(packed, StaticShape(tokens=4, sequences=8, max_length=4))
    with pytest.raises(ValueError, match="do not fit"):
        pad_to_shape(packed, StaticShape(tokens=12, sequences=2, max_length=4))


def test_the_padding_leaves_the_real_tokens_their_own_features(gqa_model):
    rng = np.random.default_rng(1)
    packed = pack_samples([rng.integers(1, 300, n) for n in (40, 7, 90)])
    shape = static_shape(packed.lengths, 256)
    assert shape.tokens == 160 and shape.sequences == 8  # 137 real tokens, one 23-token pseudo-sample
    alone = extract_packed(gqa_model, packed, **KWARGS)
    padded = extract_packed(gqa_model, pad_to_shape(packed, shape), **KWARGS)
    assert padded.aux_hidden.shape[0] == 160
    assert padded.lengths[:3] == alone.lengths
    real = type(alone)(**{name: getattr(padded, name)[:137] for name in alone.tensors()}, lengths=alone.lengths)
    assert_same_features(real, alone)


def _batches(rng):
    """Rows of several shapes, two of them repeated, one over the budget of 256."""
    lengths = [(40, 7, 90), (100, 100), (40, 7, 90), (3,), (200, 50), (300,), (100, 100), (64, 64, 64, 64)]
    return [[rng.integers(1, 300, n) for n in row] for row in lengths]


def test_replays_give_every_batch_its_own_features(gqa_model):
    forward = functools.partial(extract_packed, gqa_model, **KWARGS)
    recorder = RerunRecorder()
    graphed = GraphedPackedForward(forward, budget=256, device=torch.device("cpu"), recorder=recorder, max_graphs=2)
    rows = _batches(np.random.default_rng(2))
    results = [graphed(pack_samples(row)) for row in rows]  # kept: later replays must not overwrite them
    for row, got in zip(rows, results):
        assert_same_features(got, forward(pack_samples(row)))
    # shapes: (137 -> 160), (200 -> 224), again 160, (3 -> 32), (250 -> 256), 300 eager, 224 again
    # (evicted: only two graphs are kept), (256 -> 256, a new sequence count)
    stats = graphed.stats()
    assert stats == {"captures": 6, "replays": 7, "eager": 1, "graphs": 2, "disabled_because": None}
    assert recorder.recorded == 6


def test_the_least_recently_replayed_graph_is_evicted(gqa_model):
    forward = functools.partial(extract_packed, gqa_model, **KWARGS)
    graphed = GraphedPackedForward(forward, budget=256, device=torch.device("cpu"), recorder=RerunRecorder(), max_graphs=2)
    rng = np.random.default_rng(5)
    shape_a, shape_b, shape_c = (100, 100), (3,), (200, 50)  # 224, 32 and 256 tokens
    for row in (shape_a, shape_b, shape_a, shape_c, shape_a):  # C evicts B (least recent), not A (oldest)
        graphed(pack_samples([rng.integers(1, 300, n) for n in row]))
    assert graphed.stats()["captures"] == 3 and graphed.stats()["replays"] == 5
    assert set(graphed.graphs) == {static_shape(shape_a, 256), static_shape(shape_c, 256)}
    with pytest.raises(ValueError, match="must be positive"):
        GraphedPackedForward(forward, budget=256, device=torch.device("cpu"), max_graphs=0)


def test_a_failed_capture_warns_once_and_runs_eagerly(gqa_model, recwarn):
    forward = functools.partial(extract_packed, gqa_model, **KWARGS)
    graphed = GraphedPackedForward(forward, budget=256, device=torch.device("cpu"), recorder=RerunRecorder(fail=True))
    rows = _batches(np.random.default_rng(3))[:3]
    first = graphed(pack_samples(rows[0]))
    rest = [graphed(pack_samples(row)) for row in rows[1:]]
    warned = [w for w in recwarn.list if issubclass(w.category, RuntimeWarning)]
    assert len(warned) == 1 and "CUDA graph capture failed" in str(warned[0].message)
    assert "stream is capturing" in str(warned[0].message)
    assert graphed.stats()["eager"] == 3 and graphed.stats()["captures"] == 0 and not graphed.replaying
    assert graphed.disabled_because == "RuntimeError: operation not permitted when stream is capturing"
    for row, got in zip(rows, [first, *rest]):
        assert_same_features(got, forward(pack_samples(row)))


def test_real_graphs_are_recorded_by_default(gqa_model):
    from stage_extract.cuda_graphs import CudaGraphRecorder

    graphed = GraphedPackedForward(lambda packed: None, budget=64, device=torch.device("cpu"))
    assert isinstance(graphed.recorder, CudaGraphRecorder)


def test_when_graphs_apply():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_cuda_graphs("auto", device=cuda, batching="packed", parameters=135_000_000)  # SmolLM2
    assert not use_cuda_graphs("auto", device=cuda, batching="packed", parameters=8_000_000_000)  # compute-bound
    assert use_cuda_graphs("on", device=cuda, batching="packed", parameters=8_000_000_000)
    assert not use_cuda_graphs("auto", device=cpu, batching="packed")
    assert not use_cuda_graphs("auto", device=cuda, batching="padded")
    assert not use_cuda_graphs("auto", device=cuda, batching="packed", backend="vllm")
    assert not use_cuda_graphs("off", device=cuda, batching="packed")
    with pytest.raises(ValueError, match="needs the hf backend's packed forwards on a CUDA device"):
        use_cuda_graphs("on", device=cpu, batching="packed")
    with pytest.raises(ConfigError, match="--cuda-graphs must be one of auto, on, off"):
        ExtractConfig(out="x", cuda_graphs="yes")
    with pytest.raises(ConfigError, match="--cuda-graphs on replays .* --batching padded \\(a resumed cache"):
        ExtractConfig(out="x", cuda_graphs="on", batching="padded")
    assert ExtractConfig(out="x", cuda_graphs="on").cuda_graphs == "on"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("feature_dtype", ["bf16", "fp8"])
def test_cuda_graph_replays_match_eager_forwards(feature_dtype):
    """Real captures of a GQA Llama in bf16 (the varlen flash kernel inside the graph), shapes
    replayed on new ids, two replays in flight and the asynchronous copies to the host queued
    behind them, as an extraction runs them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stage_extract.backends import HFBackend
    from stage_extract.quant import dequantize_fp8
    from stage_extract.transfer import HostTransfer

    torch.manual_seed(12)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=8192)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    rng = np.random.default_rng(6)
    lengths = [1000, 900, 1100] * 6 + [700, 3, 1500, 64, 129, 5000, 40]  # six batches of one shape, then others
    samples = [(i, rng.integers(0, 1000, n)) for i, n in enumerate(lengths)]
    kwargs = dict(layer_ids=(0, 1, 3), top_k=8, batch_tokens=4096, device=torch.device("cuda"), feature_dtype=feature_dtype)
    graphed = HFBackend(model, cuda_graphs=True, **kwargs)
    transfer = HostTransfer(torch.device("cuda"))
    queued = [(batch, transfer.submit(batch.planes, batch.lengths, batch.positions))
              for batch in graphed.feature_batches(samples)]  # nothing waited for until all are queued
    want = HFBackend(model, **kwargs).compute(samples)
    stats = graphed.graph_stats()
    assert stats["replays"] > stats["captures"] >= 2 and stats["eager"] == 1 and stats["disabled_because"] is None
    seen = 0
    for batch, host in queued:
        host.wait()
        start = 0
        for record, n in zip(batch.record_indices, batch.lengths):
            rows, start = slice(start, start + n), start + n
            b = want[record]
            aux, eager = host.tensors["aux_hidden"][rows], b.aux_hidden
            if feature_dtype == "fp8":  # ~6 % steps: compare the values the codes stand for
                aux = dequantize_fp8(aux, host.tensors["aux_scale"][rows])
                eager = dequantize_fp8(eager, b.aux_scale)
            assert (aux.float() - eager.float()).norm() / eager.float().norm() < (1e-2 if feature_dtype == "bf16" else 5e-2)
            assert (host.tensors["topk_ids"][rows, 0] == b.topk_ids[:, 0]).float().mean() > 0.97
            torch.testing.assert_close(host.tensors["topk_logprobs"][rows, 0], b.topk_logprobs[:, 0], rtol=0, atol=0.1)
            assert bool(host.tensors["finite"][rows].all())
            seen += 1
    assert seen == len(samples)
