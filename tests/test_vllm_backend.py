"""The vLLM extraction backend, checked on the CPU without vLLM.

vLLM itself is replaced by a fake engine that behaves like ``ExampleHiddenStatesConnector``:
one safetensors file per request (``hidden_states [T, P, H]``, ``token_ids [T]``) plus its
``.lock``, results in an order of its choosing.  What is checked: the layer-id translation
(against HF's own hidden states), that results are keyed by request id whatever order they arrive
in, that token-id disagreements name the record, that a connector file converts to exactly what
the HF path computes, that the HF adapter equals ``extract_batch``, and that ``--backend vllm``
without vLLM says how to install it.
"""

from __future__ import annotations

import fcntl
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.batching import length_sorted_batches
from stage_extract.backends import BackendUnavailable, HFBackend, open_backend
from stage_extract.features import capture_layer_outputs, default_aux_layers, extract_batch, extract_packed
from stage_extract.packed_attention import pack_samples
from stage_extract.vllm_backend import (
    FinishedRequest,
    TargetHead,
    VLLMBackend,
    VLLMOptions,
    capture_plan,
    planes_from_captures,
    read_capture_file,
    require_vllm,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def write_connector_file(path: Path, hidden_states: torch.Tensor, token_ids) -> str:
    """What ExampleHiddenStatesConnector leaves behind once its write is done."""
    save_file({"hidden_states": hidden_states.contiguous(), "token_ids": torch.as_tensor(token_ids, dtype=torch.long)}, str(path))
    Path(f"{path}.lock").touch()
    return str(path)


class FakeEngine:
    """A stand-in for vLLM: writes each request's capture file and reports the requests finished in
    a shuffled order.  ``tamper`` lets a test corrupt one request's file or reported ids."""

    def __init__(self, folder: Path, captures: dict[tuple[int, ...], torch.Tensor], *, seed: int = 0, tamper=None):
        self.folder = folder
        self.captures = captures
        self.rng = random.Random(seed)
        self.tamper = tamper or {}
        self.submitted: list[tuple[str, list[int]]] = []
        self.finish_order: list[str] = []
        self.closed = False

    def submit(self, request_id, token_ids):
        self.submitted.append((request_id, list(token_ids)))

    def finished(self):
        pending, self.submitted = self.submitted, []
        order = pending[:]
        self.rng.shuffle(order)
        for request_id, ids in order:
            hidden = self.captures[tuple(ids)]
            file_ids, reported_ids, cached = list(ids), list(ids), 0
            change = self.tamper.get(request_id, {})
            if "file_ids" in change:
                file_ids = change["file_ids"](file_ids)
            if "reported_ids" in change:
                reported_ids = change["reported_ids"](reported_ids)
            if "hidden" in change:
                hidden = change["hidden"](hidden)
            cached = change.get("cached", 0)
            request_id = change.get("request_id", request_id)
            path = write_connector_file(self.folder / f"{request_id}-x1y2z3.safetensors", hidden, file_ids)
            self.finish_order.append(request_id)
            yield FinishedRequest(request_id, reported_ids, path, cached)

    def close(self):
        self.closed = True


def small_head(hidden: int = 16, vocab: int = 50, seed: int = 0) -> TargetHead:
    g = torch.Generator().manual_seed(seed)
    return TargetHead(1 + 0.1 * torch.randn(hidden, generator=g), torch.randn(vocab, hidden, generator=g), eps=1e-5)


def random_samples(records, lengths, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    return [(r, rng.integers(0, vocab, size=n).astype(np.int64)) for r, n in zip(records, lengths)]


@pytest.fixture(scope="module")
def tiny_model(tiny_target_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_target_dir), dtype=torch.float32).eval()


def vllm_layout_capture(model, ids: torch.Tensor, plan) -> torch.Tensor:
    """The [T, P, H] planes vLLM's extract_hidden_states writes for one sample, built from HF:
    vLLM id k < L is HF ``hidden_states[k]`` (the input of layer k), and k = L is the *pre-norm*
    final state, i.e. the output of the last layer (HF's ``hidden_states[L]`` is post-norm)."""
    num_layers = model.config.num_hidden_layers
    with torch.no_grad(), capture_layer_outputs(model, (num_layers - 1,)) as last:
        hidden_states = model(ids[None], output_hidden_states=True).hidden_states
    planes = [hidden_states[k][0] if k < num_layers else last[num_layers - 1][0] for k in plan.vllm_layer_ids]
    return torch.stack(planes, dim=1)


# --------------------------------------------------------------------------- layer convention


def test_capture_plan_adds_one_and_appends_the_final_state():
    plan = capture_plan(default_aux_layers(30), 30)  # ours (1, 14, 26)
    assert plan.vllm_layer_ids == (2, 15, 27, 30)
    assert plan.aux_planes == (0, 1, 2) and plan.final_plane == 3
    plan = capture_plan(default_aux_layers(32), 32)  # Llama-3-8B: ours (1, 15, 28)
    assert plan.vllm_layer_ids == (2, 16, 29, 32)


def test_capture_plan_keeps_our_layer_order_and_shares_the_last_layer_plane():
    # vLLM writes planes in ascending layer order; our aux order is what was asked for.
    plan = capture_plan((26, 1, 14), 30)
    assert plan.vllm_layer_ids == (2, 15, 27, 30)
    assert plan.aux_planes == (2, 0, 1)
    # The output of our last layer is the pre-norm final state: one plane serves both.
    plan = capture_plan((1, 14, 29), 30)
    assert plan.vllm_layer_ids == (2, 15, 30)
    assert plan.aux_planes == (0, 1, 2) and plan.final_plane == 2
    with pytest.raises(ValueError, match="out of range"):
        capture_plan((1, 14, 30), 30)
    with pytest.raises(ValueError, match="distinct"):
        capture_plan((1, 1, 14), 30)


def test_vllm_ids_select_the_states_our_hooks_capture(tiny_model):
    """vLLM index k is HF hidden_states[k]; ours is the output of layer i = hidden_states[i + 1]."""
    layer_ids = default_aux_layers(8)
    plan = capture_plan(layer_ids, 8)
    ids = torch.randint(0, 2048, (11,), generator=torch.Generator().manual_seed(3))
    planes = vllm_layout_capture(tiny_model, ids, plan)
    with torch.no_grad(), capture_layer_outputs(tiny_model, layer_ids + (7,)) as ours:
        post_norm = tiny_model(ids[None], output_hidden_states=True).hidden_states[8][0]
    for layer, plane in zip(layer_ids, plan.aux_planes):
        assert torch.equal(planes[:, plane], ours[layer][0])
    assert torch.equal(planes[:, plan.final_plane], ours[7][0])
    assert not torch.allclose(planes[:, plan.final_plane], post_norm)  # the trap: HF's last entry is normed


# --------------------------------------------------------------------------- schema mapping


@pytest.mark.parametrize("feature_dtype, teacher", [("bf16", "topk"), ("fp8", "both"), ("bf16", "final-hidden")])
def test_connector_file_converts_to_what_extract_batch_computes(tiny_model, tiny_target_dir, tmp_path, feature_dtype, teacher):
    layer_ids, top_k = default_aux_layers(8), 8
    plan = capture_plan(layer_ids, 8)
    head = TargetHead.from_hf_folder(tiny_target_dir, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    samples = [torch.randint(0, 2048, (n,), generator=g) for n in (13, 6)]
    captures = []
    for i, ids in enumerate(samples):
        path = write_connector_file(tmp_path / f"req{i}.safetensors", vllm_layout_capture(tiny_model, ids, plan), ids)
        hidden, token_ids = read_capture_file(path)
        assert hidden.shape == (len(ids), 4, 64) and torch.equal(token_ids, ids)
        assert not Path(path).exists() and not Path(path + ".lock").exists()  # cleaned up after reading
        captures.append(hidden)

    got = planes_from_captures(captures, plan, head, top_k=top_k, feature_dtype=feature_dtype, teacher=teacher)
    # The HF path on the same two samples as one right-padded batch.
    ids = torch.zeros((2, 13), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(samples):
        ids[row, : len(sample)], mask[row, : len(sample)] = sample, 1
    ref = extract_batch(tiny_model, ids, mask, layer_ids=layer_ids, top_k=top_k, feature_dtype=feature_dtype, teacher=teacher).tensors()
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape, name
    bits = {torch.bfloat16: torch.int16}
    for name in ("aux_hidden", "final_hidden", "finite", "topk_ids", "aux_scale"):
        if name in ref:  # bit-identical (same fp32 states in, same ops)
            assert torch.equal(got[name].view(bits.get(got[name].dtype, got[name].dtype)), ref[name].view(bits.get(ref[name].dtype, ref[name].dtype))), name
    if "topk_logprobs" in ref:
        torch.testing.assert_close(got["topk_logprobs"], ref["topk_logprobs"], rtol=0, atol=1e-6)
    assert got["aux_hidden"].shape[1] == 3 * 64 and bool(got["finite"].all())


def test_target_head_reads_only_norm_and_head(tiny_model, tiny_target_dir, smollm2_dir, tmp_path):
    head = TargetHead.from_hf_folder(tiny_target_dir, dtype=torch.float32)
    assert torch.equal(head.head_weight, tiny_model.lm_head.weight)
    assert torch.equal(head.norm_weight, tiny_model.model.norm.weight)
    assert head.eps == tiny_model.config.rms_norm_eps
    # A sharded checkpoint (index file) reads the same weights.
    sharded = tmp_path / "sharded"
    tiny_model.save_pretrained(str(sharded), max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert torch.equal(TargetHead.from_hf_folder(sharded, dtype=torch.float32).head_weight, tiny_model.lm_head.weight)
    # SmolLM2 ties its head to the input embedding and stores no lm_head.weight.
    from transformers import AutoModelForCausalLM

    smol = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    assert smol.config.tie_word_embeddings
    tied = TargetHead.from_hf_folder(smollm2_dir, dtype=torch.float32)
    assert torch.equal(tied.head_weight, smol.get_output_embeddings().weight)
    assert torch.equal(tied.norm_weight, smol.model.norm.weight)


# --------------------------------------------------------------------------- request keying


def make_backend(tmp_path, samples, *, teacher="topk", tamper=None, seed=0, group_tokens=4096, hidden=16):
    plan = capture_plan((1, 3, 4), 8)
    g = torch.Generator().manual_seed(seed + 100)
    captures = {tuple(int(t) for t in ids): torch.randn(len(ids), plan.num_planes, hidden, generator=g) for _, ids in samples}
    engine = FakeEngine(tmp_path, captures, seed=seed, tamper=tamper)
    head = small_head(hidden)
    backend = VLLMBackend(
        engine, head, plan, top_k=5, hidden_size=hidden, max_prompt_len=64, teacher=teacher, group_tokens=group_tokens
    )
    return backend, engine, captures, plan, head


def test_results_are_keyed_by_request_id_not_arrival_order(tmp_path):
    samples = random_samples([40, 7, 13, 2, 99, 5], [9, 4, 12, 7, 3, 10])
    backend, engine, captures, plan, head = make_backend(tmp_path, samples, group_tokens=8)
    results = backend.compute(samples)
    submitted = [f"talon0-r{r}" for r, _ in samples]
    assert engine.finish_order != submitted  # the fake really did return them out of order
    assert sorted(results) == sorted(r for r, _ in samples)
    for record, ids in samples:
        expected = planes_from_captures([captures[tuple(ids.tolist())]], plan, head, top_k=5)
        got = results[record]
        assert got.aux_hidden.shape == (len(ids), 3 * 16)
        assert torch.equal(got.aux_hidden.view(torch.int16), expected["aux_hidden"].view(torch.int16)), record
        assert torch.equal(got.topk_ids, expected["topk_ids"]), record
        torch.testing.assert_close(got.topk_logprobs, expected["topk_logprobs"], rtol=0, atol=1e-6)
    assert not list(tmp_path.glob("*.safetensors*"))  # every capture file was consumed
    # A second call issues fresh request ids.
    more = random_samples([3, 4], [5, 6], seed=1)
    backend.engine = FakeEngine(tmp_path, {tuple(ids.tolist()): torch.randn(len(ids), 4, 16) for _, ids in more})
    backend.compute(more)
    assert backend.engine.finish_order and all(rid.startswith("talon1-") for rid in backend.engine.finish_order)


def test_vllm_batches_fill_a_part_in_record_order(tmp_path):
    """The hand-over run.py does: FeatureBatches -> HostTransfer -> PartBuilder.collect."""
    from stage_extract.transfer import HostTransfer
    from stage_extract.writer import PartBuilder, PendingSample

    samples = random_samples([40, 41, 43, 44, 47], [9, 4, 12, 7, 3])
    backend, engine, captures, plan, head = make_backend(tmp_path, samples, group_tokens=10, seed=3)
    builder = PartBuilder(index=0, first_record=40)
    builder.pending = [PendingSample(r, ids, np.ones(len(ids), np.uint8)) for r, ids in samples]
    transfer = HostTransfer(backend.device)
    batches = list(backend.feature_batches(samples))
    assert len(batches) > 1 and any(b.positions != sorted(b.positions) or len(b.positions) > 1 for b in batches)
    for batch in batches:
        builder.batches.append(transfer.submit(batch.planes, batch.lengths, batch.positions))
    builder.collect()
    assert [s.record_index for s in builder.samples] == [40, 41, 43, 44, 47]
    for sample, (record, ids) in zip(builder.samples, samples):
        expected = planes_from_captures([captures[tuple(ids.tolist())]], plan, head, top_k=5)
        assert np.array_equal(sample.input_ids, ids)
        assert np.array_equal(sample.aux_hidden, expected["aux_hidden"].view(torch.int16).numpy().view(np.uint16)), record
        assert np.array_equal(sample.topk_ids, expected["topk_ids"].numpy()), record


def test_final_hidden_teacher_needs_no_head(tmp_path):
    samples = random_samples([1, 2], [6, 3])
    backend, _, captures, plan, _ = make_backend(tmp_path, samples, teacher="final-hidden")
    backend.head = None
    results = backend.compute(samples)
    for record, ids in samples:
        out = results[record]
        assert out.topk_ids is None and out.topk_logprobs is None
        assert torch.equal(out.final_hidden, captures[tuple(ids.tolist())][:, plan.final_plane].to(torch.bfloat16))
        assert bool(out.finite.all())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"file_ids": lambda ids: ids[:3] + [ids[3] + 1] + ids[4:]}, r"record 13: the token ids in vLLM's hidden-states file differ .*position 3"),
        ({"reported_ids": lambda ids: ids[:-1]}, r"record 13: the prompt token ids vLLM reports differ .*11 tokens instead of 12"),
        ({"hidden": lambda h: h[:-1], "file_ids": lambda ids: ids[:-1]}, r"record 13: .*11 tokens instead of 12"),
        ({"hidden": lambda h: h[:, :3]}, r"record 13: vLLM's hidden states have shape \(12, 3, 16\), expected \(12, 4, 16\)"),
        ({"cached": 16}, r"record 13: vLLM served 16 tokens from its prefix cache"),
    ],
)
def test_token_or_shape_mismatch_names_the_record(tmp_path, change, message):
    samples = random_samples([40, 7, 13, 2], [9, 4, 12, 7])
    backend, *_ = make_backend(tmp_path, samples, tamper={"talon0-r13": change})
    with pytest.raises((ValueError, RuntimeError), match=message):
        backend.compute(samples)


def test_unknown_duplicate_and_missing_requests_are_errors(tmp_path):
    samples = random_samples([1, 2, 3], [4, 5, 6])
    backend, *_ = make_backend(tmp_path, samples, tamper={"talon0-r2": {"request_id": "talon0-r77"}})
    with pytest.raises(RuntimeError, match="talon0-r77.*never submitted"):
        backend.compute(samples)

    backend, engine, *_ = make_backend(tmp_path / "b", samples)
    (tmp_path / "b").mkdir()
    original = engine.finished
    engine.finished = lambda: (r for r in original() if r.request_id != "talon0-r3")
    with pytest.raises(RuntimeError, match="never returned 1 request.*records 3"):
        backend.compute(samples)

    with pytest.raises(ValueError, match="record 1 was passed twice"):
        backend.compute([samples[0], samples[0]])
    with pytest.raises(ValueError, match="record 9: 65 tokens exceed the 64"):
        backend.compute(random_samples([9], [65]))


def test_reader_waits_for_the_writer_lock(tmp_path):
    path = tmp_path / "r.safetensors"
    lock_fd = os.open(f"{path}.lock", os.O_CREAT | os.O_WRONLY, 0o644)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    reader_started = threading.Event()
    outcome = {}

    def read():
        reader_started.set()
        try:
            outcome["value"] = read_capture_file(path, timeout_s=60)
        except BaseException as err:  # pragma: no cover - reported below
            outcome["error"] = err

    thread = threading.Thread(target=read)
    thread.start()
    reader_started.wait()
    save_file({"hidden_states": torch.ones(3, 2, 4), "token_ids": torch.arange(3)}, str(path))
    os.close(lock_fd)  # what the connector's writer thread does when the write is done
    thread.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    assert torch.equal(outcome["value"][1], torch.arange(3))

    held = tmp_path / "held.safetensors"
    fd = os.open(f"{held}.lock", os.O_CREAT | os.O_WRONLY, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(TimeoutError, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
            read_capture_file(held, timeout_s=0.2)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- without vLLM


def test_backend_vllm_without_vllm_gives_the_install_hint(monkeypatch, tiny_target_dir, tiny_model):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails, installed or not
    with pytest.raises(BackendUnavailable, match=r"pip install '\.\[vllm\]'.*vllm==0\.26\.0"):
        require_vllm()
    with pytest.raises(BackendUnavailable, match=r"--backend vllm needs vLLM.*pip install '\.\[vllm\]'"):
        open_backend(
            "vllm", target_path=str(tiny_target_dir), layer_ids=(1, 3, 4), top_k=8, batch_tokens=256,
            max_length=64, device=torch.device("cpu"),
        )
    assert isinstance(BackendUnavailable("x"), RuntimeError)  # the CLI reports RuntimeErrors as clean errors
    hf = open_backend("hf", model=tiny_model, layer_ids=(1, 3, 4), top_k=8, batch_tokens=256, max_length=64, device=torch.device("cpu"))
    assert isinstance(hf, HFBackend) and hf.name == "hf"
    with pytest.raises(ValueError, match="--backend must be one of hf, vllm"):
        open_backend("trt", layer_ids=(1, 3, 4), top_k=8, batch_tokens=256, max_length=64, device=torch.device("cpu"))


def test_hf_path_never_imports_vllm(tmp_path):
    """A vllm package that explodes on import must not be touched by the HF path."""
    poisoned = tmp_path / "poison" / "vllm"
    poisoned.mkdir(parents=True)
    (poisoned / "__init__.py").write_text("raise RuntimeError('the HF path imported vllm')\n")
    code = (
        "import sys\n"
        "import stage_extract.run, stage_extract.backends, stage_extract.vllm_backend as vb\n"
        "vb.capture_plan((1, 14, 26), 30); vb.VLLMOptions()\n"
        "assert 'vllm' not in sys.modules, 'vllm was imported'\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "poison"), str(REPO)]))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_vllm_options_are_validated():
    with pytest.raises(ValueError, match="gpu-memory-utilization"):
        VLLMOptions(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="tensor-parallel-size"):
        VLLMOptions(tensor_parallel_size=0)


# --------------------------------------------------------------------------- the HF adapter


@pytest.mark.parametrize("batching", ["packed", "padded"])
@pytest.mark.parametrize("feature_dtype, teacher", [("bf16", "topk"), ("fp8", "both")])
def test_hf_backend_equals_extract_batch(tiny_model, feature_dtype, teacher, batching):
    layer_ids, top_k, batch_tokens = (1, 3, 4), 8, 64
    lengths = [17, 5, 30, 9, 12, 30, 3]
    samples = random_samples([10, 11, 12, 14, 15, 16, 20], lengths, vocab=2048, seed=2)
    backend = HFBackend(
        tiny_model, layer_ids=layer_ids, top_k=top_k, batch_tokens=batch_tokens, device=torch.device("cpu"),
        feature_dtype=feature_dtype, teacher=teacher, batching=batching,
    )
    batches = list(backend.feature_batches(samples))
    if batching == "packed":  # in order, up to 64 real tokens: [17, 5, 30, 9], [12, 30, 3]
        expected_batches = [np.arange(0, 4), np.arange(4, 7)]
    else:
        expected_batches = length_sorted_batches(np.array(lengths), batch_tokens)
    assert len(batches) == len(expected_batches) > 1 and max(len(b) for b in expected_batches) > 1
    for got, batch in zip(batches, expected_batches):
        # Reference: extract_batch (extract_packed) called directly on the same padded (packed) batch.
        if batching == "packed":
            ref = extract_packed(tiny_model, pack_samples([samples[i][1] for i in batch]), layer_ids=layer_ids,
                                 top_k=top_k, feature_dtype=feature_dtype, teacher=teacher)
        else:
            width = max(lengths[i] for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, : lengths[i]] = torch.from_numpy(samples[i][1])
                mask[row, : lengths[i]] = 1
            ref = extract_batch(tiny_model, ids, mask, layer_ids=layer_ids, top_k=top_k, feature_dtype=feature_dtype, teacher=teacher)
        assert got.positions == [int(i) for i in batch]
        assert got.record_indices == [samples[i][0] for i in batch] and got.lengths == ref.lengths
        assert sorted(got.planes) == sorted(ref.tensors())
        for name, tensor in ref.tensors().items():
            view = torch.int16 if tensor.dtype == torch.bfloat16 else tensor.dtype
            assert torch.equal(got.planes[name].view(view), tensor.view(view)), name

    # compute() keys the same rows by record; each record's rows are its own (an unpadded forward).
    keyed = backend.compute(samples)
    assert sorted(keyed) == [10, 11, 12, 14, 15, 16, 20]
    for record, ids in samples:
        alone = extract_batch(tiny_model, torch.from_numpy(ids)[None], torch.ones(1, len(ids), dtype=torch.long),
                              layer_ids=layer_ids, top_k=top_k, feature_dtype=feature_dtype, teacher=teacher)
        assert keyed[record].aux_hidden.shape[0] == len(ids)
        assert torch.equal(keyed[record].topk_ids[:, 0], alone.topk_ids[:, 0]), record
        if feature_dtype == "bf16":
            torch.testing.assert_close(keyed[record].aux_hidden.float(), alone.aux_hidden.float(), rtol=2 ** -7, atol=1e-5)
        else:
            torch.testing.assert_close(keyed[record].aux_scale, alone.aux_scale, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- the benchmark's comparison


def test_benchmark_comparison_tolerates_near_ties_only(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vllm_vs_hf", REPO / "bench" / "vllm_vs_hf.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "vllm_vs_hf", bench)
    spec.loader.exec_module(bench)
    from stage_extract.backends import SampleOutput

    aux = torch.randn(3, 12).to(torch.bfloat16)
    ids = torch.tensor([[5, 6, 7, 8]] * 3, dtype=torch.int32)
    lp = torch.tensor([[-0.5, -1.5, -1.52, -3.0]] * 3)  # ranks 1 and 2 are a near-tie (gap 0.02)
    ref = {4: SampleOutput(aux, ids, lp)}
    swapped_tie = ids.clone()
    swapped_tie[0, 1], swapped_tie[0, 2] = 7, 6
    same = bench.compare_outputs(ref, {4: SampleOutput(aux, swapped_tie, lp)}, gap_tol=0.1)
    assert same["topk_mismatched_slots"] == 0 and same["topk_compared_slots"] == 3  # only rank 0 is clear of ties
    assert same["aux_rel_l2_max"] == 0.0 and same["top1_agreement"] == 1.0
    swapped_top = ids.clone()
    swapped_top[2, 0], swapped_top[2, 1] = 6, 5
    bad = bench.compare_outputs(ref, {4: SampleOutput(aux * 1.01, swapped_top, lp)}, gap_tol=0.1)
    assert bad["topk_mismatched_slots"] == 1 and bad["topk_first_mismatch"]["position"] == 2
    assert 0.005 < bad["aux_rel_l2_max"] < 0.02
    with pytest.raises(ValueError, match="different records"):
        bench.compare_outputs(ref, {5: ref[4]}, gap_tol=0.1)
