"""Training at scale: exact resume after a kill, N-rank parity, non-finite handling, config
files, validation, sweeps and plots — all on the tiny cache, on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import stage_train.trainer as trainer
from pipeline.config import ConfigError, load_config_file, train_config_from_dict
from tests.test_train import train_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["--ttt-steps", "2", "--draft-vocab", "4096", "--batch-tokens", "256", "--lr", "1e-3",
              "--device", "cpu", "--log-every", "2", "--warmup-ratio", "0.1"]


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_killed_run_resumes_to_the_same_loss_trace(tiny_cache, tmp_path):
    steps = ["--max-steps", "120", "--save-every", "4"]
    reference = _cli(["train", "--cache", str(tiny_cache), "--out", str(tmp_path / "ref"), *TRAIN_ARGS, *steps])
    victim = _cli(["train", "--cache", str(tiny_cache), "--out", str(tmp_path / "run"), *TRAIN_ARGS, *steps])
    latest = tmp_path / "run" / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while not latest.is_file() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = json.loads(latest.read_text())["step"]
    assert killed_at < 120

    resumed = _cli(["train", "--resume", str(tmp_path / "run"), "--json"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert json.loads(out)["resumed_from_step"] >= killed_at
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    expected = _losses(tmp_path / "ref")
    assert len(expected) == 60
    assert _losses(tmp_path / "run") == expected  # bitwise, CPU


def test_two_ranks_match_one_process_with_accumulation(tiny_cache, tmp_path):
    single = _cli(["train", "--cache", str(tiny_cache), "--out", str(tmp_path / "one"), *TRAIN_ARGS,
                   "--max-steps", "6", "--grad-accum", "2"])
    assert single.wait(timeout=300) == 0, single.stderr.read()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
         "-m", "pipeline", "train", "--cache", str(tiny_cache), "--out", str(tmp_path / "two"), *TRAIN_ARGS,
         "--max-steps", "6"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == [2, 4, 6]
    for (_, a), (_, b) in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2


def _torchrun(args: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         "-m", "pipeline", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _trace(run: Path) -> list[tuple]:
    keys = ("step", "loss", "lr", "step_accuracy", "val_loss", "val_step_accuracy", "val_simulated_acceptance_length")
    return [tuple(r.get(k) for k in keys) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _state(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step-{step:08d}" / "state.pt", map_location="cpu", weights_only=False)


def test_fsdp_two_ranks_match_one_process_and_resume_exactly(tiny_cache, tmp_path):
    """FSDP2 (`fully_shard`, gloo): 2 ranks train, validate, checkpoint and export like 1 process
    with --grad-accum 2 on the same global batches, and a run resumed from a checkpoint reproduces
    the uninterrupted run exactly."""
    from safetensors.torch import load_file

    # One held-out batch: rank 0 validates it, rank 1 has none and must still pair rank 0's
    # all-gathers with padding forwards; the held-out set is counted whole, exactly once.
    args = [*TRAIN_ARGS, "--max-steps", "6", "--save-every", "2", "--val-fraction", "0.25", "--eval-every", "2"]
    args[args.index("--batch-tokens") + 1] = "128"
    single = _cli(["train", "--cache", str(tiny_cache), "--out", str(tmp_path / "one"), *args, "--grad-accum", "2"])
    sharded = _torchrun(["train", "--cache", str(tiny_cache), "--out", str(tmp_path / "two"), *args, "--fsdp"], 29527)
    _, err = sharded.communicate(timeout=300)
    assert sharded.returncode == 0, err[-3000:]
    assert single.wait(timeout=300) == 0, single.stderr.read()

    one, two = _trace(tmp_path / "one"), _trace(tmp_path / "two")
    assert [r[0] for r in one] == [r[0] for r in two] == [2, 4, 6]
    for a, b in zip(one, two):
        assert b[1] == pytest.approx(a[1], rel=1e-5)  # training loss, as in the DDP test
        assert b[4] == pytest.approx(a[4], rel=1e-5)  # validation loss: evaluated on the sharded model
        assert b[2] == a[2] and b[3] == a[3] and b[5] == a[5] and b[6] == a[6]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    reference = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["validation"]["valid_tokens"] > 0
    assert summary["validation"]["valid_tokens"] == reference["validation"]["valid_tokens"]

    # Checkpoints are gathered into the single-process format: full CPU tensors, position-keyed optimizer.
    ref, got = _state(tmp_path / "one", 4), _state(tmp_path / "two", 4)
    assert got["model"].keys() == ref["model"].keys()
    for name, tensor in got["model"].items():
        assert type(tensor) is torch.Tensor and tensor.device.type == "cpu", name
        torch.testing.assert_close(tensor, ref["model"][name], rtol=1e-4, atol=1e-6)
    assert got["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]
    assert got["optimizer"]["state"].keys() == ref["optimizer"]["state"].keys()
    for index, moments in got["optimizer"]["state"].items():
        for key, tensor in moments.items():
            assert type(tensor) is torch.Tensor, (index, key)
            torch.testing.assert_close(tensor, ref["optimizer"]["state"][index][key], rtol=1e-3, atol=1e-8)

    # The export is gathered from the shards: what one process exports, to bf16 rounding.
    exported = load_file(str(tmp_path / "two" / "export" / "model.safetensors"))
    expected = load_file(str(tmp_path / "one" / "export" / "model.safetensors"))
    assert exported.keys() == expected.keys()
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor.float(), expected[name].float(), rtol=2 ** -7, atol=1e-6, msg=name)

    # Rewind to the step-2 checkpoint (the state a kill between steps 2 and 4 leaves) and resume: the
    # sharded model and optimizer are reloaded, and steps 3..6 replay to the same trace and export.
    latest = tmp_path / "two" / "checkpoints" / "latest.json"
    latest.write_text(json.dumps({"step": 2, "path": "step-00000002"}))
    resumed = _torchrun(["train", "--resume", str(tmp_path / "two"), "--json"], 29528)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert json.loads(out)["resumed_from_step"] == 2
    assert _trace(tmp_path / "two") == two  # bitwise, CPU
    again = load_file(str(tmp_path / "two" / "export" / "model.safetensors"))
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)


def test_non_finite_loss_stops_or_is_skipped(tiny_cache, tmp_path, monkeypatch):
    original = trainer.shifted_inputs
    calls = {"n": 0}

    def poisoned(batch, device, teacher=None):
        calls["n"] += 1
        inputs = original(batch, device, teacher)
        if calls["n"] == 3:
            inputs["aux_hidden_states"] = torch.full_like(inputs["aux_hidden_states"], float("nan"))
        return inputs

    monkeypatch.setattr(trainer, "shifted_inputs", poisoned)
    with pytest.raises(trainer.NonFiniteLossError, match=r"step 3: non-finite loss"):
        trainer.run_train(train_config(tiny_cache, tmp_path / "a", max_steps=5))
    calls["n"] = 0
    summary = trainer.run_train(train_config(tiny_cache, tmp_path / "b", max_steps=5, skip_nonfinite=1))
    assert summary["skipped_nonfinite"] == 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) if r["step"] != 4)


def test_config_files_are_strict(tmp_path):
    good = tmp_path / "train.toml"
    good.write_text('[train]\nlr = 0.0005\nttt_steps = 4\n')
    values = load_config_file(good)
    cfg = train_config_from_dict({**values, "cache": "c", "out": "o"}, where=str(good))
    assert cfg.lr == 0.0005 and cfg.ttt_steps == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.001\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown train setting\(s\) \['learning_rate'\]"):
        train_config_from_dict({**load_config_file(bad), "cache": "c", "out": "o"}, where=str(bad))
    with pytest.raises(ConfigError, match="--ttt-steps must be between 1 and 32"):
        train_config_from_dict({"cache": "c", "out": "o", "ttt_steps": 0}, where="x")


def test_validation_split_and_plot(tiny_cache, tmp_path):
    summary = trainer.run_train(train_config(tiny_cache, tmp_path / "run", max_steps=4, val_fraction=0.3, eval_every=2))
    val = summary["validation"]
    assert len(val["step_accuracy"]) == 3 and val["valid_tokens"] > 0
    assert 1.0 <= val["simulated_acceptance_length"] <= 4.0
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("val_step_accuracy" in r for r in records)
    from stage_train.plots import plot_run

    png = plot_run(tmp_path / "run")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_runs_every_point_and_skips_finished_ones(tiny_cache, tmp_path):
    from stage_train.sweep import parse_grid, run_sweep

    base = {"cache": str(tiny_cache), "device": "cpu", "draft_vocab": 4096, "batch_tokens": 256,
            "max_steps": 2, "log_every": 1, "val_fraction": 0.3, "progress": False}
    grid = parse_grid(["lr=1e-3,3e-3", "ttt_steps=1,2"])
    rows = run_sweep(base, grid, tmp_path / "sweep")
    assert [r["status"] for r in rows] == ["ok"] * 4
    for row in rows:
        assert len(row["step_accuracy"]) == row["ttt_steps"]
        assert row["simulated_acceptance_length"] >= 1.0 and row["final_train_loss"] > 0
    table = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
    assert len(table) == 5
    assert (tmp_path / "sweep" / "results.png").stat().st_size > 1000
    started = time.perf_counter()
    again = run_sweep(base, grid, tmp_path / "sweep")
    assert [r["point"] for r in again] == [r["point"] for r in rows]
    assert time.perf_counter() - started < 5  # finished points are read back, not retrained
    with pytest.raises(ConfigError, match="not a train setting"):
        parse_grid(["learning_rate=1"])
