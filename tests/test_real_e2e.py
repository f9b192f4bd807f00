"""End to end on the real SmolLM2 target and real ShareGPT data, through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.cli import app


def _run(args: list[str]) -> dict:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
def test_extract_train_export_on_real_smollm2(tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "run"
    extracted = _run(["extract", "--out", str(cache), "--max-samples", "24", "--max-length", "256",
                      "--batch-tokens", "2048", "--device", "cpu", "--json"])
    assert extracted["samples"] >= 18 and extracted["tokens"] > 2000
    # bf16 aux (3 x 576 x 2 B) plus top-64 ids and log-probs, lightly compressed
    assert 2000 < extracted["bytes_per_token"] < 4500

    info = _run(["inspect", str(cache), "--json"])
    assert info["layer_ids"] == [1, 14, 26] and info["top_k"] == 64
    assert info["target"]["hidden_size"] == 576 and info["target"]["vocab_size"] == 49152

    trained = _run(["train", "--cache", str(cache), "--out", str(run), "--max-steps", "32",
                    "--ttt-steps", "3", "--draft-vocab", "2048", "--batch-tokens", "768", "--lr", "3e-3",
                    "--log-every", "8", "--device", "cpu", "--target", "smollm2", "--json"])
    first, final = trained["first"], trained["final"]
    assert final["loss"] < 0.8 * first["loss"]
    # chance is 1/2048: the draft must have learned the target's next tokens on its own data
    assert final["step_accuracy"][0] > 0.15
    assert final["simulated_acceptance_length"] > 1.1

    export = run / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["hidden_size"] == 576 and config["draft_vocab_size"] == 2048
    assert config["rope_theta"] == 100000.0 and config["max_position_embeddings"] == 8192
    assert config["talon"]["target"]["source"] == "smollm2"
    tensors = load_file(str(export / "model.safetensors"))
    assert tensors["fc.weight"].shape == (576, 3 * 576)
    assert int((tensors["t2d"]).sum()) == 2048
    assert torch.equal(torch.arange(2048) + tensors["d2t"], tensors["t2d"].nonzero().flatten())


def test_cli_help_documents_every_option():
    for command in ("extract", "train", "inspect"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0
        assert "--json" in result.output


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    result = CliRunner().invoke(app, ["train", "--cache", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "no feature cache at" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["extract", "--out", str(tmp_path / "c"), "--max-length", "4096", "--batch-tokens", "1024"])
    assert result.exit_code == 2 and "--batch-tokens (1024) must be at least --max-length (4096)" in result.output
