"""The Zarr part store: bit-exact round trips, sealing, and readable errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from schemas.layout import SCHEMA_VERSION
from schemas.manifest import (
    CacheError,
    ExtractSettings,
    ExtractSpec,
    TargetIdentity,
    build_manifest,
    read_manifest,
    write_manifest,
)
from schemas.checksum import checksum
from schemas.store import CacheReader, write_part_group
from stage_extract.writer import PartBuilder, SampleFeatures


def _identity(**overrides) -> TargetIdentity:
    values = dict(source="t", hidden_size=4, vocab_size=70000, num_hidden_layers=8, config_hash="c",
                  tokenizer_hash="tok", chat_template_hash="tpl", weights_fingerprint="w")
    values.update(overrides)
    return TargetIdentity(**values)


def _settings() -> ExtractSettings:
    return ExtractSettings(data="d", max_length=64, top_k=3, layer_ids=(1, 3, 4), max_samples=None,
                           part_tokens=100, batch_tokens=256, skip_bad_records=False,
                           compute_dtype="float32", device_type="cpu")


def _random_samples(rng, n: int, vocab: int) -> list[SampleFeatures]:
    samples = []
    for record in range(n):
        length = int(rng.integers(1, 40))
        samples.append(SampleFeatures(
            record_index=record * 2,
            input_ids=rng.integers(0, vocab, length),
            loss_mask=rng.integers(0, 2, length).astype(np.uint8),
            # every uint16 bit pattern, NaN payloads included, must survive untouched
            aux_hidden=rng.integers(0, 1 << 16, (length, 12)).astype(np.uint16),
            topk_ids=rng.integers(0, vocab, (length, 3)),
            topk_logprobs=-rng.random((length, 3), dtype=np.float32) * 20,
        ))
    return samples


@pytest.mark.parametrize("vocab", [300, 70000])  # uint16 and uint32 token ids
def test_part_round_trip_is_bit_exact(tmp_path, vocab):
    rng = np.random.default_rng(0)
    builder = PartBuilder(index=0, first_record=0)
    builder.samples = _random_samples(rng, 7, vocab)
    arrays = builder.arrays()
    records = write_part_group(tmp_path, "part-000000", arrays, vocab)
    seal = builder.seal(arrays, records, {"records_read": 7})
    from schemas.manifest import write_seal

    write_seal(tmp_path, seal)
    spec = ExtractSpec(SCHEMA_VERSION, _identity(vocab_size=vocab), _settings())
    write_manifest(tmp_path, build_manifest(spec, [seal], {}))

    reader = CacheReader(tmp_path)
    assert len(reader) == 7
    for i, sample in enumerate(builder.samples):
        got = reader.read_sample(i)
        assert np.array_equal(got["input_ids"].astype(np.int64), sample.input_ids)
        assert np.array_equal(got["loss_mask"], sample.loss_mask)
        assert got["aux_hidden"].dtype == np.uint16 and np.array_equal(got["aux_hidden"], sample.aux_hidden)
        assert np.array_equal(got["topk_ids"].astype(np.int64), sample.topk_ids)
        assert np.array_equal(got["topk_logprobs"].view(np.uint32), sample.topk_logprobs.view(np.uint32))
        assert reader.record_index(i) == sample.record_index
    assert seal.arrays["aux_hidden"].crc32 == checksum(arrays["aux_hidden"])
    expected_counts = {}
    for s in builder.samples:
        for token in s.input_ids[s.loss_mask.astype(bool)]:
            expected_counts[int(token)] = expected_counts.get(int(token), 0) + 1
    assert seal.assistant_token_counts == expected_counts


def test_missing_and_incomplete_caches_explain_themselves(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "extract.json").write_text("{}")
    with pytest.raises(CacheError, match="incomplete cache.*resume"):
        read_manifest(tmp_path / "half")
    (tmp_path / "other").mkdir()
    with pytest.raises(CacheError, match="not a Talon feature cache"):
        read_manifest(tmp_path / "other")


def test_identity_mismatch_names_the_field():
    cache = _identity()
    other = _identity(source="elsewhere", tokenizer_hash="different", hidden_size=8)
    lines = cache.mismatches(other)
    assert lines == ["hidden_size: cache has 4, target has 8", "tokenizer_hash: cache has 'tok', target has 'different'"]
    assert cache.mismatches(_identity(source="same model, other path")) == []


def test_direct_shard_reads_equal_zarr_reads(tmp_path, monkeypatch):
    """The reader's own shard decoding (schemas.shard) returns zarr's bytes, for every array,
    for whole parts, single samples and ranges that cross inner chunks, with or without threads."""
    from schemas.manifest import write_seal
    from schemas.shard import ShardArray

    import schemas.store

    monkeypatch.setattr(schemas.store, "INNER_CHUNK_BYTES", 64 * 24)  # 64-row inner chunks
    rng = np.random.default_rng(3)
    builder = PartBuilder(index=0, first_record=0)
    builder.samples = _random_samples(rng, 40, 70000)
    arrays = builder.arrays()
    arrays["aux_hidden"][64:128] = 0  # an all-fill inner chunk: zarr does not store it
    records = write_part_group(tmp_path, "part-000000", arrays, 70000)
    write_seal(tmp_path, builder.seal(arrays, records, {}))
    spec = ExtractSpec(SCHEMA_VERSION, _identity(), _settings())
    write_manifest(tmp_path, build_manifest(spec, [builder.seal(arrays, records, {})], {}))
    direct, through_zarr = CacheReader(tmp_path, read_threads=3), CacheReader(tmp_path, direct_reads=False)
    aux = ShardArray.open(tmp_path / "parts" / "part-000000.zarr" / "aux_hidden")
    assert aux.chunk_rows == 64 and aux.n_chunks > 3
    assert (aux.index()[1] == np.iinfo(np.uint64).max).all()  # the empty chunk
    whole = direct.read_part(0)
    assert set(whole) == set(direct.sample_fields)
    for name, value in through_zarr.read_part(0).items():
        assert value.dtype == whole[name].dtype and np.array_equal(value, whole[name]), name
    for i in range(len(direct)):
        a, b = direct.read_sample(i), through_zarr.read_sample(i)
        for name in a:
            assert np.array_equal(a[name], b[name]), (i, name)
    shard = ShardArray.open(tmp_path / "parts" / "part-000000.zarr" / "topk_logprobs")
    n = shard.shape[0]
    for start, stop in [(0, 1), (63, 65), (5, n), (n - 1, n), (3, 3)]:
        assert np.array_equal(shard.read_rows(start, stop), arrays["topk_logprobs"][start:stop])


def test_fp8_part_decodes_to_the_reference_bits_for_any_read_path(tmp_path):
    from schemas.fp8 import dequantize_to_bf16_bits
    from schemas.manifest import write_seal

    rng = np.random.default_rng(5)
    builder = PartBuilder(index=0, first_record=0)
    for record, length in enumerate((1500, 3, 700)):
        builder.samples.append(SampleFeatures(
            record_index=record, input_ids=rng.integers(0, 300, length), loss_mask=np.ones(length, np.uint8),
            aux_hidden=rng.integers(0, 256, (length, 12)).astype(np.uint8) & 0x7E,  # finite codes only
            aux_scale=rng.random((length, 3), dtype=np.float32) * 100,
            topk_ids=rng.integers(0, 300, (length, 3)), topk_logprobs=-rng.random((length, 3), dtype=np.float32),
        ))
    arrays = builder.arrays()
    records = write_part_group(tmp_path, "part-000000", arrays, 300, feature_dtype="fp8")
    seal = builder.seal(arrays, records, {})
    write_seal(tmp_path, seal)
    settings = ExtractSettings(**{**_settings().to_dict(), "feature_dtype": "fp8"})
    write_manifest(tmp_path, build_manifest(ExtractSpec(SCHEMA_VERSION, _identity(vocab_size=300), settings), [seal], {}))
    pooled, single = CacheReader(tmp_path, read_threads=3), CacheReader(tmp_path, read_threads=1)
    for i, sample in enumerate(builder.samples):
        expected = dequantize_to_bf16_bits(sample.aux_hidden, sample.aux_scale)
        assert np.array_equal(pooled.read_sample(i)["aux_hidden"], expected)
        assert np.array_equal(single.read_sample(i)["aux_hidden"], expected)
    assert np.array_equal(pooled.read_part(0)["aux_hidden"], dequantize_to_bf16_bits(arrays["aux_hidden"], arrays["aux_scale"]))


@pytest.mark.parametrize("aux_compression", ["blosc-zstd", "zstd", "lz4", "none"])
@pytest.mark.parametrize("feature_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("writes", ["batched", "small batches, partial"])
def test_direct_shard_writes_equal_zarr_writes(tmp_path, monkeypatch, aux_compression, feature_dtype, writes):
    """write_part_group writes each shard itself (compressing on a thread pool); the files must
    be byte for byte those zarr's own `array[...] = data` writes: padded last chunks, all-fill
    chunks left out (no shard at all when every chunk is), -0.0 kept, uint16/uint32 ids.  Also
    when every pool task's chunks are written on their own, by ``writev`` calls that each write
    only part of what they are given."""
    import os

    import schemas.store
    from schemas.shard import ShardArray

    monkeypatch.setattr(schemas.store, "INNER_CHUNK_BYTES", 64 * 24)  # 64-row inner chunks
    calls = []
    if writes != "batched":
        monkeypatch.setattr(schemas.store, "ENCODE_TASK_BYTES", 1)  # one chunk per task
        monkeypatch.setattr(schemas.store, "WRITE_BATCH_BYTES", 4000)  # a few ~1.5 KB chunks a write
        real_writev = os.writev

        def short_writev(fd, views):
            calls.append(len(views))
            return real_writev(fd, [memoryview(views[0])[:777]])  # at most 777 bytes a call

        monkeypatch.setattr(os, "writev", short_writev)
    rng = np.random.default_rng(7)
    builder = PartBuilder(index=0, first_record=0)
    builder.samples = _random_samples(rng, 30, 70000)
    if feature_dtype == "fp8":
        for sample in builder.samples:
            sample.aux_hidden = sample.aux_hidden.astype(np.uint8)
            sample.aux_scale = rng.random((len(sample.input_ids), 3), dtype=np.float32)
    arrays = builder.arrays()
    aux_rows = schemas.store._inner_rows(arrays["aux_hidden"][0].nbytes, len(arrays["aux_hidden"]))
    arrays["aux_hidden"][aux_rows : 2 * aux_rows] = 0  # an all-fill inner chunk
    arrays["topk_logprobs"][:64] = -0.0  # not the fill value bit for bit: stored
    arrays["loss_mask"][:] = 0  # every chunk is fill: no shard file
    written = {}
    for direct in (True, False):
        out = tmp_path / ("direct" if direct else "zarr")
        records = write_part_group(out, "part-000000", arrays, 70000, feature_dtype=feature_dtype,
                                   aux_compression=aux_compression, pool=schemas.store.encode_pool(3), direct=direct)
        files = sorted(p for p in (out / "parts").rglob("*") if p.is_file())
        written[direct] = ({p.relative_to(out): p.read_bytes() for p in files}, records)
    assert written[True][0].keys() == written[False][0].keys()
    for path, data in written[True][0].items():
        assert data == written[False][0][path], path
    assert written[True][1] == written[False][1]
    if writes != "batched":  # several chunks per shard, each in several calls
        shards = [path for path in written[True][0] if path.name != "zarr.json"]
        assert len(calls) > 3 * len(shards) and max(calls) > 1
    group = tmp_path / "direct" / "parts" / "part-000000.zarr"
    assert not (group / "loss_mask" / "c").exists()
    aux = ShardArray.open(group / "aux_hidden")
    assert (aux.index()[1] == np.iinfo(np.uint64).max).all()
    assert np.array_equal(aux.read_rows(0, aux.shape[0]), arrays["aux_hidden"])
    codecs = json.loads((group / "aux_hidden" / "zarr.json").read_text())["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in codecs] == {"none": ["bytes"], "zstd": ["bytes", "zstd"]}.get(aux_compression, ["bytes", "blosc"])


@pytest.mark.parametrize("feature_dtype,teacher", [("bf16", "final-hidden"), ("fp8", "both")])
def test_direct_writes_of_an_empty_part_equal_zarr_writes(tmp_path, feature_dtype, teacher):
    """A part whose every sample was dropped: only metadata, of 0-row arrays, as zarr writes it."""
    from schemas.layout import array_specs, row_widths

    builder = PartBuilder(index=0, first_record=0, widths=row_widths(4, 3, feature_dtype, teacher))
    arrays = builder.arrays()
    written = {}
    for direct in (True, False):
        out = tmp_path / ("direct" if direct else "zarr")
        write_part_group(out, "part-000000", arrays, 70000, feature_dtype=feature_dtype, teacher=teacher, direct=direct)
        written[direct] = {p.relative_to(out): p.read_bytes() for p in sorted((out / "parts").rglob("*")) if p.is_file()}
    assert written[True] == written[False]
    assert {p.name for p in written[True]} == {"zarr.json"}
    assert len(written[True]) == 1 + len(array_specs(70000, feature_dtype, teacher))  # the group's and each array's


def test_aux_compression_is_recorded_and_old_specs_mean_blosc_zstd():
    from pipeline.config import ConfigError, ExtractConfig
    from schemas.layout import DEFAULT_AUX_COMPRESSION, resolve_aux_compression

    assert ExtractConfig(out="x").aux_compression == DEFAULT_AUX_COMPRESSION == "auto"
    assert resolve_aux_compression("auto", "bf16") == "lz4" and resolve_aux_compression("auto", "fp8") == "zstd"
    with pytest.raises(ConfigError, match="--aux-compression must be one of"):
        ExtractConfig(out="x", aux_compression="gzip")
    settings = _settings()
    assert settings.aux_compression == "lz4" and settings.to_dict()["aux_compression"] == "lz4"
    old = settings.to_dict()
    del old["aux_compression"]  # an extract.json written before the option
    legacy = ExtractSettings.from_dict(old)
    assert legacy.aux_compression == "blosc-zstd"
    spec = ExtractSpec(SCHEMA_VERSION, _identity(), settings)
    assert ExtractSpec(SCHEMA_VERSION, _identity(), legacy).differences(spec) == [
        "aux_compression: existing 'blosc-zstd', requested 'lz4'"]


def test_background_writer_releases_the_planes_it_has_copied(tmp_path):
    """Once a part's arrays are concatenated, its samples no longer refer to their batches'
    host buffers (pinned on CUDA), so those can be reused while the part is still written; the
    sealed part holds exactly the samples' values."""
    from stage_extract.writer import BackgroundPartWriter

    rng = np.random.default_rng(5)
    builder = PartBuilder(index=0, first_record=0)
    builder.samples = _random_samples(rng, 6, 300)
    expected = [s.aux_hidden.copy() for s in builder.samples]
    writer = BackgroundPartWriter(tmp_path, 300)
    writer.submit(builder, {"records_read": 6})
    writer.close()
    assert [seal.n_samples for seal in writer.sealed] == [6]
    assert all(s.aux_hidden is None and s.topk_ids is None for s in builder.samples)
    assert [s.record_index for s in builder.samples] == [2 * i for i in range(6)]
    part = tmp_path / "parts" / "part-000000.zarr"
    stored = np.asarray(zarr.open_array(str(part / "aux_hidden"), mode="r")[...])
    assert np.array_equal(stored.view(np.uint16), np.concatenate(expected))


def test_concatenated_planes_equal_numpys_concatenation():
    """PartBuilder.arrays copies each feature plane in one concatenation: every dtype (uint16 bit patterns with NaN payloads, int64 ids, float32, an fp8-style scale
    plane), empty samples, a sample that is a strided view, into fresh or reused buffers."""
    from stage_extract.writer import PlaneBuffers, concatenate_rows

    rng = np.random.default_rng(9)
    builder = PartBuilder(index=0, first_record=0)
    builder.samples = _random_samples(rng, 9, 70000)
    for sample in builder.samples:
        sample.aux_scale = rng.random((len(sample.input_ids), 3), dtype=np.float32)
    empty = builder.samples[4]
    empty.input_ids, empty.loss_mask = empty.input_ids[:0], empty.loss_mask[:0]
    for name in ("aux_hidden", "aux_scale", "topk_ids", "topk_logprobs"):
        setattr(empty, name, getattr(empty, name)[:0])
    wide = rng.integers(0, 1 << 16, (2 * len(builder.samples[2].input_ids), 12)).astype(np.uint16)
    builder.samples[2].aux_hidden = wide[::2]  # not contiguous
    expected = {name: np.concatenate([getattr(s, name) for s in builder.samples])
                for name in ("aux_hidden", "aux_scale", "topk_ids", "topk_logprobs")}
    buffers = PlaneBuffers()
    for _ in range(2):  # fresh buffers, then the same ones reused
        arrays = builder.arrays(buffers)
        for name, values in expected.items():
            assert arrays[name].dtype == values.dtype and np.array_equal(arrays[name], values), name
        buffers.give_back(builder.borrowed)
        builder.borrowed = []
    assert np.array_equal(builder.arrays()["aux_hidden"], expected["aux_hidden"])
    out = np.zeros((0, 5), np.float32)
    concatenate_rows([np.zeros((0, 5), np.float32)], out)  # nothing to copy
    builder.samples[5].topk_ids = builder.samples[5].topk_ids[1:]  # one row short of its tokens
    with pytest.raises(ValueError, match=f"record {builder.samples[5].record_index}: .* rows of topk_ids for"):
        builder.arrays()
