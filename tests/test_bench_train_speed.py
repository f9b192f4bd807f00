"""The issue-#6 benchmarks stay runnable: the synthetic cache is a valid cache written by the real
writer, and bench/train_speed.py runs its three modes end to end (tiny shapes, CPU)."""

from __future__ import annotations

import json
import sys

import pytest

from bench.synthetic_cache import CacheRequest, Shape, ensure_cache
from schemas.validate import validate_cache

TINY = ["--device", "cpu", "--hidden", "64", "--layers", "4", "--vocab", "1000", "--draft-vocab", "256", "--seq", "64",
        "--min-length", "40", "--steps", "2", "--warmup", "1", "--batches", "2"]


def test_synthetic_cache_is_valid_and_reused(tmp_path):
    req = CacheRequest(shape=Shape(hidden=32, layers=4, heads=2, kv_heads=1, mlp=64, vocab=500), tokens=600, seq=64,
                       min_length=16, top_k=8, part_tokens=256)
    info = ensure_cache(tmp_path / "cache", req, "cpu", log=lambda line: None)
    assert not info["reused"] and info["tokens"] >= 600
    report = validate_cache(tmp_path / "cache", deep=True)
    report.require_ok()
    again = ensure_cache(tmp_path / "cache", req, "cpu", log=lambda line: None)
    assert again["reused"] and again["tokens"] == info["tokens"]


def test_train_speed_runs_all_modes(tmp_path, monkeypatch, capsys):
    import bench.train_speed as train_speed

    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["train_speed.py", *TINY, "--batch-tokens", "64,128", "--work", str(tmp_path),
                                      "--out", str(out), "--profile", "2"])
    train_speed.main()
    printed = capsys.readouterr().out
    assert "| batch tokens (shape) |" in printed
    results = json.loads(out.read_text())
    assert [row["batch_tokens"] for row in results["budgets"]] == [64, 128]
    for row in results["budgets"]:
        for mode in ("draft", "cache", "online"):
            assert row[mode]["tokens_per_second"] > 0
        assert row["ratios"]["cache_over_draft"] > 0
        profile = row["draft"]["profile"]  # --profile: where the draft step's time goes
        assert profile["steps"] == 2 and profile["ms_per_step"] > 0
        assert sum(profile["share_by_category"].values()) == pytest.approx(1.0, abs=1e-3)
        assert profile["share_by_category"]["matmul"] > 0.05  # the draft's projections are matmuls
        assert any(r["name"] == "aten::mm" for r in profile["top"])
    assert "anchor" not in results["budgets"][0]  # only on an H200
