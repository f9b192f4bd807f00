"""Extraction on a tiny random Llama: what is stored is exactly what the target produced,
interrupted runs resume to identical bytes, and bad input fails with the place named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import schemas.store
import stage_extract.writer
from schemas.manifest import CacheError, read_manifest
from schemas.store import CacheReader
from stage_extract.features import capture_layer_outputs, default_aux_layers
from stage_extract.run import run_extract
from tests.conftest import extract_config


def assert_same_samples(a: CacheReader, b: CacheReader) -> None:
    """Two caches hold the same samples, record for record and array for array, bit-exact."""
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a.read_sample(i), b.read_sample(i)
        assert sorted(x) == sorted(y), i
        for name in x:
            assert np.array_equal(x[name], y[name]), (i, name)
        assert a.record_index(i) == b.record_index(i)


def test_default_layers_follow_eagle3_convention():
    assert default_aux_layers(32) == (1, 15, 28)
    assert default_aux_layers(30) == (1, 14, 26)


def test_hooks_capture_output_of_layer(tiny_target_dir):
    """Our capture equals HF hidden_states[i + 1] (the convention recorded in the manifest)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_target_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 9))
    with torch.no_grad(), capture_layer_outputs(model, (1, 3, 4)) as captured:
        reference = model(ids, output_hidden_states=True).hidden_states
    for layer in (1, 3, 4):
        assert torch.equal(captured[layer], reference[layer + 1])


def test_manifest_describes_the_cache(tiny_cache):
    manifest = read_manifest(tiny_cache)
    assert manifest.settings.layer_ids == (1, 3, 4)
    assert manifest.target.hidden_size == 64 and manifest.target.vocab_size == 49152
    # 10 conversations: one has no assistant turn
    assert manifest.n_samples == 9
    assert manifest.source_stats["no_assistant"] == 1
    assert len(manifest.parts) >= 2  # part_tokens=120 forces several parts
    assert sum(manifest.assistant_token_counts.values()) == manifest.n_assistant_tokens
    reader = CacheReader(tiny_cache)
    assert int(reader.lengths.sum()) == manifest.n_tokens
    assert reader.read_sample(0)["aux_hidden"].shape[1] == 3 * 64


def test_stored_features_equal_what_the_target_produced(tiny_target_dir, chat_jsonl, tmp_path, monkeypatch):
    produced = []
    original = schemas.store.write_part_group

    def spy(cache_dir, name, arrays, vocab_size, **settings):
        produced.append({k: v.copy() for k, v in arrays.items()})
        return original(cache_dir, name, arrays, vocab_size, **settings)

    monkeypatch.setattr(stage_extract.writer, "write_part_group", spy)
    run_extract(extract_config(tmp_path / "c", tiny_target_dir, chat_jsonl))
    reader = CacheReader(tmp_path / "c")
    sample = 0
    for arrays in produced:
        offsets = arrays["sample_offsets"]
        for local in range(len(offsets) - 1):
            got = reader.read_sample(sample)
            rows = slice(offsets[local], offsets[local + 1])
            assert np.array_equal(got["aux_hidden"], arrays["aux_hidden"][rows])
            assert np.array_equal(got["topk_logprobs"].view(np.uint32), arrays["topk_logprobs"][rows].astype(np.float32).view(np.uint32))
            assert np.array_equal(got["topk_ids"].astype(np.int64), arrays["topk_ids"][rows])
            assert np.array_equal(got["input_ids"].astype(np.int64), arrays["input_ids"][rows])
            sample += 1
    assert sample == len(reader)


def test_stored_features_match_an_unbatched_forward(tiny_target_dir, tiny_cache):
    """Independent check of the numbers: one sample, run alone through HF, matches the cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_target_dir), dtype=torch.float32).eval()
    row = CacheReader(tiny_cache).read_sample(1)
    ids = torch.from_numpy(row["input_ids"].astype(np.int64))[None]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    expected_aux = torch.cat([out.hidden_states[i + 1][0] for i in (1, 3, 4)], dim=-1)
    stored_aux = torch.from_numpy(row["aux_hidden"].view(np.int16)).view(torch.bfloat16).float()
    torch.testing.assert_close(stored_aux, expected_aux, atol=0, rtol=2 ** -7)  # bf16 rounding only
    logprobs = torch.log_softmax(out.logits[0].float(), -1)
    top = torch.topk(logprobs, 8, dim=-1)
    assert torch.equal(torch.from_numpy(row["topk_ids"].astype(np.int64))[:, 0], top.indices[:, 0])
    torch.testing.assert_close(torch.from_numpy(row["topk_logprobs"]), top.values, atol=1e-4, rtol=0)


def failing_at_call(call: int):
    """``write_part_group``, except that its ``call``-th call fails as a full disk does."""
    original = schemas.store.write_part_group
    calls = {"n": 0}

    def write_part_group(cache_dir, name, arrays, vocab_size, **settings):
        calls["n"] += 1
        if calls["n"] == call:
            raise OSError(28, "No space left on device")
        return original(cache_dir, name, arrays, vocab_size, **settings)

    return write_part_group


def test_interrupted_extraction_resumes_to_identical_bytes(tiny_target_dir, chat_jsonl, tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(stage_extract.writer, "write_part_group", failing_at_call(3))
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="No space left"):
        run_extract(extract_config(out, tiny_target_dir, chat_jsonl))
    with pytest.raises(CacheError, match="incomplete"):
        read_manifest(out)
    monkeypatch.setattr(stage_extract.writer, "write_part_group", schemas.store.write_part_group)
    summary = run_extract(extract_config(out, tiny_target_dir, chat_jsonl))
    assert summary["resumed_parts"] == 2
    fresh, resumed = CacheReader(tiny_cache), CacheReader(out)
    assert len(fresh) == len(resumed)
    for i in range(len(fresh)):
        a, b = fresh.read_sample(i), resumed.read_sample(i)
        for name in a:
            assert np.array_equal(a[name], b[name]), name
        assert fresh.record_index(i) == resumed.record_index(i)


def test_a_schema_2_cache_resumed_stays_schema_2_with_zlib_crc32(tiny_target_dir, chat_jsonl, tiny_cache, tmp_path,
                                                                 monkeypatch):
    """A cache started by a Talon that wrote schema 2 (zlib's CRC-32) and resumed by this one
    keeps its version and checksum, so the Talon that started it can still validate it; a new
    cache is schema 3 with CRC32C."""
    import stage_extract.run
    from schemas.manifest import part_seal_path, read_seal
    from schemas.validate import validate_cache

    out = tmp_path / "old"
    monkeypatch.setattr(stage_extract.run, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(stage_extract.writer, "write_part_group", failing_at_call(3))
    with pytest.raises(RuntimeError, match="No space left"):
        run_extract(extract_config(out, tiny_target_dir, chat_jsonl))
    monkeypatch.undo()  # this version's schema and writer from here on
    summary = run_extract(extract_config(out, tiny_target_dir, chat_jsonl))
    assert summary["resumed_parts"] == 2
    manifest = read_manifest(out)
    assert manifest.schema_version == 2
    checksums = {record.checksum for entry in manifest.parts
                 for record in read_seal(part_seal_path(out, entry)).arrays.values()}
    assert checksums == {"crc32"}
    assert validate_cache(out, deep=True).ok
    assert read_manifest(tiny_cache).schema_version == 3
    assert {record.checksum for entry in read_manifest(tiny_cache).parts
            for record in read_seal(part_seal_path(tiny_cache, entry)).arrays.values()} == {"crc32c"}


def test_rerun_with_other_settings_is_refused(tiny_target_dir, chat_jsonl, tiny_cache):
    with pytest.raises(CacheError, match="top_k: existing 8, requested 4"):
        run_extract(extract_config(tiny_cache, tiny_target_dir, chat_jsonl, top_k=4))


def test_malformed_line_names_file_and_line(tiny_target_dir, tmp_path):
    from stage_extract.records import DataError

    data = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    data.write_text(good + "\n" + "{not json\n" + good + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        run_extract(extract_config(tmp_path / "c", tiny_target_dir, data))
    summary = run_extract(extract_config(tmp_path / "c2", tiny_target_dir, data, skip_bad_records=True))
    assert summary["samples"] == 2
    assert summary["source_stats"]["bad_records"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("feature_dtype", ["bf16", "fp8"])
def test_async_device_copies_store_what_a_synchronous_copy_stores(tiny_target_dir, chat_jsonl, tmp_path, monkeypatch, feature_dtype):
    """On CUDA the features reach the writer through pinned buffers on a side stream; the bytes
    must equal those of a plain synchronous ``.cpu()`` copy of the same forwards."""
    import stage_extract.run
    from stage_extract.transfer import HostBatch

    async_out = tmp_path / "async"
    run_extract(extract_config(async_out, tiny_target_dir, chat_jsonl, device="cuda", feature_dtype=feature_dtype, teacher="both"))

    class SynchronousTransfer:
        def __init__(self, device):
            pass

        def submit(self, tensors, lengths, samples):
            return HostBatch({k: v.cpu() for k, v in tensors.items()}, list(lengths), list(samples))

    monkeypatch.setattr(stage_extract.run, "HostTransfer", SynchronousTransfer)
    sync_out = tmp_path / "sync"
    run_extract(extract_config(sync_out, tiny_target_dir, chat_jsonl, device="cuda", feature_dtype=feature_dtype, teacher="both"))
    a, b = CacheReader(async_out), CacheReader(sync_out)
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        x, y = a.read_sample(i, raw=True), b.read_sample(i, raw=True)
        for name in x:
            assert np.array_equal(x[name], y[name]), (i, name)


def test_parallel_part_writers_write_the_same_cache(tiny_target_dir, chat_jsonl, tiny_cache, tmp_path, monkeypatch):
    """Several writer threads finish parts out of order, but seals go down in order (no seal
    before part 0's) and the bytes equal the single-writer cache."""
    import stage_extract.run

    original = schemas.store.write_part_group
    order = []

    def slow_first_part(worker_dir, name, arrays, vocab_size, **settings):
        import time

        if name == "part-000000":
            time.sleep(2.0)  # part 0 finishes after its successors
        records = original(worker_dir, name, arrays, vocab_size, **settings)
        order.append((name, sorted(p.name for p in (worker_dir / "parts").glob("*.json"))))
        return records

    monkeypatch.setattr(stage_extract.run, "writer_parallelism", lambda device: {"threads": 3, "max_pending": 3})
    monkeypatch.setattr(stage_extract.writer, "write_part_group", slow_first_part)
    out = tmp_path / "parallel"
    run_extract(extract_config(out, tiny_target_dir, chat_jsonl))
    names = [name for name, _ in order]
    assert names != sorted(names)  # groups really were finished out of order
    assert all(seals == [] for name, seals in order if name != "part-000000" and names.index(name) < names.index("part-000000"))
    assert_same_samples(CacheReader(tiny_cache), CacheReader(out))


def test_aux_compression_changes_the_bytes_not_the_features(tiny_target_dir, chat_jsonl, tiny_cache, tmp_path):
    """--aux-compression is recorded in the cache and in each array's zarr.json, so readers need
    no flag; every codec stores the same features; resuming with another codec is refused, and
    the default (auto) resumes with the cache's own codec."""
    default = read_manifest(tiny_cache)
    assert default.settings.aux_compression == "lz4"  # auto, for bf16
    out = tmp_path / "raw"
    run_extract(extract_config(out, tiny_target_dir, chat_jsonl, aux_compression="none"))
    manifest = read_manifest(out)
    assert manifest.settings.aux_compression == "none"
    assert manifest.stored_bytes > default.stored_bytes
    meta = json.loads((out / manifest.parts[0]["path"] / "aux_hidden" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]] == ["bytes"]
    b = CacheReader(out)
    assert_same_samples(CacheReader(tiny_cache), b)
    with pytest.raises(CacheError, match="aux_compression: existing 'none', requested 'zstd'"):
        run_extract(extract_config(out, tiny_target_dir, chat_jsonl, aux_compression="zstd"))
    # The default (auto) continues a cache with the codec it was started with.
    again = run_extract(extract_config(out, tiny_target_dir, chat_jsonl))
    assert again["samples"] == len(b) and read_manifest(out).settings.aux_compression == "none"
