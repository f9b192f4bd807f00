"""Multi-worker extraction: disjoint record shares, per-worker part stores, and a merge that
checks the workers agree and orders samples deterministically."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer import Typer
from typer.testing import CliRunner

from pipeline.cmd_cache import merge_command, validate_command
from schemas.manifest import CacheError, read_manifest
from schemas.store import CacheReader
from schemas.validate import validate_cache
from stage_extract.run import run_extract
from stage_extract.workers import Shard, merge_cache, resolve_shard
from tests.conftest import extract_config


def bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def cli() -> Typer:
    app = Typer()
    app.command("merge")(merge_command)
    app.command("validate")(validate_command)
    return app


def test_shard_comes_from_flags_then_torchrun_env():
    assert resolve_shard(1, 3, environ={"RANK": "0", "WORLD_SIZE": "2"}) == Shard(1, 3)
    assert resolve_shard(None, None, environ={"RANK": "1", "WORLD_SIZE": "4"}) == Shard(1, 4)
    assert resolve_shard(None, None, environ={}) == Shard(0, 1)
    assert [r for r in range(10) if Shard(2, 4).owns(r)] == [2, 6]
    assert Shard(0, 1).worker_dir("c").as_posix() == "c"
    assert Shard(1, 2).worker_dir("c").as_posix() == "c/workers/worker-1-of-2"
    with pytest.raises(ValueError):
        Shard(2, 2)


def test_two_workers_merge_into_the_single_worker_samples(tiny_target_dir, chat_jsonl, tiny_cache, tmp_path):
    out = tmp_path / "sharded"
    first = run_extract(extract_config(out, tiny_target_dir, chat_jsonl, shard_index=1, num_shards=2))
    assert first["merged"] is False and first["worker"] == "1 of 2"
    assert (out / "workers" / "worker-1-of-2" / "worker.json").is_file()
    with pytest.raises(CacheError, match="1 of the 1 started workers finished"):
        read_manifest(out)
    result = CliRunner().invoke(cli(), ["merge", str(out)])
    assert result.exit_code == 2 and "worker-0-of-2" in result.output

    second = run_extract(extract_config(out, tiny_target_dir, chat_jsonl, shard_index=0, num_shards=2))
    assert second["merged"] is True  # the last worker to finish merges
    manifest = read_manifest(out)
    assert manifest.settings.num_shards == 2
    workers = [p["worker"] for p in manifest.parts]
    assert workers == sorted(workers) and set(workers) == {0, 1}
    assert all(p["path"].startswith(f"workers/worker-{p['worker']}-of-2/parts/") for p in manifest.parts)
    assert manifest.parts[0]["name"].startswith("worker-0-of-2/part-")
    assert manifest.source_stats == read_manifest(tiny_cache).source_stats

    single, sharded = CacheReader(tiny_cache), CacheReader(out)
    by_record = {single.record_index(i): single.read_sample(i) for i in range(len(single))}
    records = [sharded.record_index(i) for i in range(len(sharded))]
    # worker 0's (even) records first, then worker 1's, each in source order
    assert records == sorted(r for r in by_record if r % 2 == 0) + sorted(r for r in by_record if r % 2 == 1)
    for i, record in enumerate(records):
        # Same samples, but batched with other neighbours (other padding), so the float
        # features agree to rounding only.
        got, expected = sharded.read_sample(i), by_record[record]
        assert np.array_equal(got["input_ids"], expected["input_ids"])
        assert np.array_equal(got["loss_mask"], expected["loss_mask"])
        np.testing.assert_allclose(bf16(got["aux_hidden"]), bf16(expected["aux_hidden"]), rtol=2e-2, atol=1e-3)
        np.testing.assert_allclose(got["topk_logprobs"], expected["topk_logprobs"], atol=1e-4)
        assert np.array_equal(got["topk_ids"][:, 0], expected["topk_ids"][:, 0])
    assert manifest.n_tokens == read_manifest(tiny_cache).n_tokens
    assert manifest.assistant_token_counts == read_manifest(tiny_cache).assistant_token_counts
    assert validate_cache(out, deep=True).ok

    # merging again is idempotent; a rerun of a finished worker changes nothing
    before = (out / "manifest.json").read_text()
    result = CliRunner().invoke(cli(), ["merge", str(out), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["workers"] == 2
    assert (out / "manifest.json").read_text() == before
    again = run_extract(extract_config(out, tiny_target_dir, chat_jsonl, shard_index=0, num_shards=2))
    assert again["merged"] and again["samples"] == manifest.n_samples

    # validate names damaged parts by their worker-qualified names
    skip = manifest.parts[-1]["name"]
    assert len(CacheReader(out, skip_parts={skip})) == len(sharded) - manifest.parts[-1]["n_samples"]
    result = CliRunner().invoke(cli(), ["validate", str(out), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["ok"] is True


def test_merge_refuses_workers_with_other_settings(tiny_target_dir, chat_jsonl, tmp_path):
    out = tmp_path / "mixed"
    for index in (0, 1):
        run_extract(extract_config(out, tiny_target_dir, chat_jsonl, shard_index=index, num_shards=2, max_samples=4))
    spec_path = out / "workers" / "worker-1-of-2" / "extract.json"
    spec = json.loads(spec_path.read_text())
    spec["settings"]["top_k"] = 4
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(CacheError, match="top_k: existing 8, requested 4|top_k: existing 4, requested 8"):
        merge_cache(out)
    with pytest.raises(CacheError, match="other settings"):
        run_extract(extract_config(out, tiny_target_dir, chat_jsonl, shard_index=1, num_shards=2, max_samples=4, top_k=4))


def test_worker_counts_cannot_be_mixed_in_one_cache(tiny_target_dir, chat_jsonl, tiny_cache, tmp_path):
    with pytest.raises(CacheError, match="num_shards: existing 1, requested 2"):
        run_extract(extract_config(tiny_cache, tiny_target_dir, chat_jsonl, shard_index=0, num_shards=2))


def test_single_worker_cache_is_the_n1_case(tiny_cache):
    manifest = read_manifest(tiny_cache)
    assert manifest.settings.num_shards == 1
    assert [p["path"] for p in manifest.parts] == [f"parts/{p['name']}.zarr" for p in manifest.parts]
    assert {p["worker"] for p in manifest.parts} == {0}
    assert (tiny_cache / "worker.json").is_file() and not (tiny_cache / "workers").exists()
