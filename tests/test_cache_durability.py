"""Durability of the feature cache: a SIGKILL at any point resumes to identical bytes, bad
values are refused and listed, damage is found and named, and a failing disk never leaves a
manifest that claims missing data."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import schemas.store
import stage_extract.backends
import stage_extract.run
import stage_extract.writer
from schemas.manifest import CacheError, part_group_path, read_manifest
from schemas.store import CacheReader
from schemas.validate import validate_cache
from stage_extract.run import run_extract
from stage_extract.writer import CacheWriteError
from tests.conftest import CONVERSATIONS, extract_config

REPO = Path(__file__).resolve().parents[1]


def assert_same_samples(expected: CacheReader, got: CacheReader) -> None:
    assert len(expected) == len(got)
    for i in range(len(expected)):
        a, b = expected.read_sample(i, raw=True), got.read_sample(i, raw=True)
        assert set(a) == set(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), (i, name)
        assert expected.record_index(i) == got.record_index(i)


@pytest.fixture(scope="module")
def long_chats(tmp_path_factory) -> Path:
    """40 conversations: enough parts (~12 at part_tokens=120) for a run to be killed mid-way."""
    path = tmp_path_factory.mktemp("long") / "chats.jsonl"
    lines = []
    for i in range(4):
        for conversation in CONVERSATIONS:
            text = json.dumps(conversation).replace("?", f" (variant {i})?")
            lines.append(text + "\n")
    path.write_text("".join(lines))
    return path


def _cli(out: Path, target: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "extract", "--out", str(out), "--target", str(target), "--data", str(data),
            "--max-length", "64", "--top-k", "8", "--batch-tokens", "256", "--part-tokens", "120", "--device", "cpu"]


# One intra-op thread for the runs that are compared bit for bit.  With two, torch 2.13 on a
# 2-core CPU gave the first part computed by a resumed run 1-ulp differences in a few elements in
# about a third of the runs (an uninterrupted run was identical every time, under load too, and
# with one thread so was every resumed run): the CPU kernels, not the cache, vary.
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run_and_kill(cmd: list[str], cache: Path, after_seals: int, timeout: float = 120.0) -> int:
    """Start the CLI and SIGKILL it as soon as ``after_seals`` seals exist; returns the seal
    count seen at the kill (the process must still have been running)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **_ONE_THREAD}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            seals = len(list((cache / "parts").glob("part-*.json"))) if (cache / "parts").is_dir() else 0
            if seals >= after_seals:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return seals
            if proc.poll() is not None:
                raise AssertionError(f"extract ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.005)
        raise AssertionError("extract did not seal parts in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_mid_run_resumes_to_identical_bytes(tiny_target_dir, long_chats, tmp_path):
    reference = tmp_path / "reference"
    one_thread = {**os.environ, **_ONE_THREAD}
    subprocess.run(_cli(reference, tiny_target_dir, long_chats), cwd=REPO, env=one_thread, check=True, capture_output=True, timeout=300)
    total_parts = len(read_manifest(reference).parts)
    assert total_parts >= 8

    killed = tmp_path / "killed"
    cmd = _cli(killed, tiny_target_dir, long_chats)
    sealed = _run_and_kill(cmd, killed, after_seals=2)
    assert sealed < total_parts and not (killed / "manifest.json").exists()
    done = subprocess.run(cmd + ["--json"], cwd=REPO, env=one_thread, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["resumed_parts"] >= sealed
    assert summary["samples"] == read_manifest(reference).n_samples
    assert_same_samples(CacheReader(reference), CacheReader(killed))
    assert validate_cache(killed, deep=True).ok


def test_each_failure_point_resumes(tiny_target_dir, chat_jsonl, tiny_cache, tmp_path, monkeypatch):
    """Dying after a group is written but before its seal, while writing the manifest, and
    leaving stale temp files behind: the rerun cleans up and ends with the same bytes."""
    out = tmp_path / "c"
    original_seal = stage_extract.writer.write_seal
    calls = {"n": 0}

    def dies_before_second_seal(worker_dir, seal):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the part's group is on disk, its seal is not
        original_seal(worker_dir, seal)

    monkeypatch.setattr(stage_extract.writer, "write_seal", dies_before_second_seal)
    with pytest.raises(CacheWriteError):
        run_extract(extract_config(out, tiny_target_dir, chat_jsonl))
    monkeypatch.setattr(stage_extract.writer, "write_seal", original_seal)
    assert (out / "parts" / "part-000001.zarr").is_dir() and not (out / "parts" / "part-000001.json").exists()

    # Leftovers of atomic writes killed half-way: a seal, the target head (old and new names).
    (out / "parts" / ".part-000001.json.x1y2.tmp").write_text("{half")
    (out / ".target_head.abcd.tmp").write_bytes(b"\0" * 10)
    (out / "target_head.tmp").write_bytes(b"\0" * 10)

    def manifest_write_dies(cache_dir, manifest):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stage_extract.workers, "write_manifest", manifest_write_dies)
    with pytest.raises(CacheWriteError, match="disk is full"):
        run_extract(extract_config(out, tiny_target_dir, chat_jsonl))
    assert not (out / "manifest.json").exists()
    monkeypatch.undo()

    summary = run_extract(extract_config(out, tiny_target_dir, chat_jsonl))
    assert summary["merged"] and summary["resumed_parts"] == len(read_manifest(tiny_cache).parts)
    assert not list(out.rglob("*.tmp"))
    assert_same_samples(CacheReader(tiny_cache), CacheReader(out))


def test_nonfinite_sample_is_dropped_counted_and_listed(tiny_target_dir, chat_jsonl, tiny_cache, tmp_path, monkeypatch):
    original = stage_extract.backends.extract_packed
    reference = CacheReader(tiny_cache)
    poisoned_record = reference.record_index(3)
    poisoned_ids = reference.read_sample(3)["input_ids"]

    @torch.inference_mode()
    def poisons_one_sample(model, packed, **kwargs):
        features = original(model, packed, **kwargs)
        row = packed.input_ids[0].cpu().numpy()
        start = 0
        for n in features.lengths:
            if n == len(poisoned_ids) and bool((row[start : start + n] == poisoned_ids).all()):
                features.aux_hidden[start + n // 2, 5] = float("nan")
                features.finite[start + n // 2] = torch.isfinite(features.aux_hidden[start + n // 2]).all()
            start += n
        return features

    monkeypatch.setattr(stage_extract.backends, "extract_packed", poisons_one_sample)
    out = tmp_path / "nan"
    summary = run_extract(extract_config(out, tiny_target_dir, chat_jsonl))
    manifest = read_manifest(out)
    assert summary["dropped"] == {"nonfinite": 1}
    assert manifest.dropped["nonfinite"] == 1 and manifest.nonfinite_records == (poisoned_record,)
    got = CacheReader(out)
    assert len(got) == len(reference) - 1
    kept = [i for i in range(len(reference)) if i != 3]
    for j, i in enumerate(kept):
        assert got.record_index(j) == reference.record_index(i)
        a, b = reference.read_sample(i), got.read_sample(j)
        for name in a:
            assert np.array_equal(a[name], b[name]), name


def test_healthy_cache_validates_cheap_and_deep(tiny_cache):
    for deep in (False, True):
        report = validate_cache(tiny_cache, deep=deep)
        assert report.ok, [d.describe() for d in report.damage]
        assert report.n_parts == len(read_manifest(tiny_cache).parts)
    assert validate_cache(tiny_cache, deep=True).checked_bytes > 0
    report.require_ok()


@pytest.fixture
def cache_copy(tiny_cache, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_cache, copy)
    return copy


def _shard_file(cache: Path, part: int, array: str) -> Path:
    entry = read_manifest(cache).parts[part]
    files = [p for p in (part_group_path(cache, entry) / array).rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(files) == 1
    return files[0]


def test_deep_validation_names_the_damaged_part_array_and_sample(cache_copy, tiny_cache):
    path = _shard_file(cache_copy, 1, "topk_logprobs")
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    name = read_manifest(cache_copy).parts[1]["name"]

    assert validate_cache(cache_copy, deep=False).ok  # same size, same metadata: only checksums see it
    report = validate_cache(cache_copy, deep=True)
    assert not report.ok and report.damaged_parts == [name]
    damage = report.damage[0]
    assert damage.array == "topk_logprobs" and damage.sample is not None
    reader = CacheReader(tiny_cache)
    assert damage.global_sample == sum(p["n_samples"] for p in read_manifest(tiny_cache).parts[:1]) + damage.sample
    assert damage.record_index == reader.record_index(damage.global_sample)
    try:  # the named sample really is the damaged one (or cannot be decoded any more)
        damaged_rows = CacheReader(cache_copy).read_sample(damage.global_sample)["topk_logprobs"]
        assert not np.array_equal(damaged_rows, reader.read_sample(damage.global_sample)["topk_logprobs"])
    except CacheError:
        pass
    with pytest.raises(CacheError, match=f"--skip-parts {name}"):
        report.require_ok()
    report.require_ok(skip_parts={name})

    skipping = CacheReader(cache_copy, skip_parts={name})
    n_skipped = read_manifest(cache_copy).parts[1]["n_samples"]
    assert len(skipping) == len(reader) - n_skipped and skipping.skipped_parts == (name,)
    assert skipping.manifest.n_samples == len(skipping)
    assert sum(skipping.manifest.assistant_token_counts.values()) == skipping.manifest.n_assistant_tokens
    kept = [i for i in range(len(reader)) if reader.locate(i).part != 1]
    for j, i in enumerate(kept):
        assert skipping.record_index(j) == reader.record_index(i)
        assert np.array_equal(skipping.read_sample(j)["aux_hidden"], reader.read_sample(i)["aux_hidden"])
    with pytest.raises(CacheError, match="unknown part"):
        CacheReader(cache_copy, skip_parts={"part-999999"})


def _reseal_with_zlib_crc32(cache: Path) -> None:
    """Rewrite every seal as a cache written before CRC32C records it: zlib's CRC-32, no
    ``checksum`` key."""
    import dataclasses

    import zarr

    from schemas.checksum import checksum, running_sample_checksums
    from schemas.jsonio import write_json_atomic
    from schemas.manifest import part_seal_path, read_seal

    for entry in read_manifest(cache).parts:
        path = part_seal_path(cache, entry)
        seal = read_seal(path)
        group = zarr.open_group(str(part_group_path(cache, entry)), mode="r")
        offsets = np.asarray(group["sample_offsets"][...])
        arrays = {}
        for name, record in seal.arrays.items():
            data = np.asarray(group[name][...])
            if record.sample_crc32:
                values = running_sample_checksums(data, offsets, "crc32")
                arrays[name] = dataclasses.replace(record, crc32=values[-1], sample_crc32=values, checksum="crc32")
            else:
                arrays[name] = dataclasses.replace(record, crc32=checksum(data, 0, "crc32"), checksum="crc32")
        legacy = dataclasses.replace(seal, arrays=arrays).to_dict()
        assert all("checksum" not in record for record in legacy["arrays"].values())
        write_json_atomic(path, legacy)


def test_parts_sealed_with_zlib_crc32_still_validate_and_name_damage(cache_copy):
    _reseal_with_zlib_crc32(cache_copy)
    assert validate_cache(cache_copy, deep=True).ok
    path = _shard_file(cache_copy, 0, "aux_hidden")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = validate_cache(cache_copy, deep=True)
    assert not report.ok and report.damaged_parts == [read_manifest(cache_copy).parts[0]["name"]]
    assert report.damage[0].array == "aux_hidden"


def test_cheap_validation_catches_truncation_missing_seals_and_bad_offsets(cache_copy):
    manifest = read_manifest(cache_copy)
    path = _shard_file(cache_copy, 0, "aux_hidden")
    path.write_bytes(path.read_bytes()[:-7])
    seal = part_group_path(cache_copy, manifest.parts[2]).with_suffix(".json")
    seal.unlink()
    report = validate_cache(cache_copy, deep=False)
    problems = {(d.part, d.array): d.problem for d in report.damage}
    assert "bytes on disk" in problems[(manifest.parts[0]["name"], "aux_hidden")]
    assert "seal is missing" in problems[(manifest.parts[2]["name"], None)]
    assert report.damaged_parts == sorted([manifest.parts[0]["name"], manifest.parts[2]["name"]])


def test_full_disk_leaves_sealed_parts_and_no_manifest(tiny_target_dir, chat_jsonl, tmp_path, monkeypatch):
    original = schemas.store.write_part_group
    calls = {"n": 0}

    def disk_fills_on_second_part(worker_dir, name, arrays, vocab_size, **settings):
        calls["n"] += 1
        if calls["n"] == 2:
            (Path(worker_dir) / "parts" / f"{name}.zarr").mkdir(parents=True)  # a half-written group
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(worker_dir, name, arrays, vocab_size, **settings)

    monkeypatch.setattr(stage_extract.writer, "write_part_group", disk_fills_on_second_part)
    out = tmp_path / "full"
    with pytest.raises(CacheWriteError, match="writing part .*part-000001.zarr failed: the disk is full.*rerun the same command to resume"):
        run_extract(extract_config(out, tiny_target_dir, chat_jsonl))
    assert not (out / "manifest.json").exists() and not (out / "worker.json").exists()
    assert sorted(p.name for p in (out / "parts").glob("*.json")) == ["part-000000.json"]
    with pytest.raises(CacheError, match="incomplete"):
        read_manifest(out)


def test_unwritable_path_is_a_clear_error(tiny_target_dir, chat_jsonl, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheWriteError, match=f"preparing the cache {blocker / 'cache'} failed"):
        run_extract(extract_config(blocker / "cache", tiny_target_dir, chat_jsonl))
