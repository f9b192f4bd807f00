"""`talon regenerate`: the target answers every user turn itself, and an interrupted run resumes
without redoing or duplicating records."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import ConfigError
from stage_extract.regenerate import (
    RegenerateConfig,
    finished_indices,
    regenerated_history,
    render_generation_prompt,
    run_regenerate,
)


def config(target, data, out, **overrides) -> RegenerateConfig:
    values = dict(target=str(target), data=str(data), out=out, max_new_tokens=6, batch_size=2, device="cpu",
                  progress=False)
    values.update(overrides)
    return RegenerateConfig(**values)


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_history_drops_assistant_turns_and_answers_every_user_turn():
    messages = (
        {"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}, {"role": "user", "content": "u3"},
    )
    kept, slots = regenerated_history(messages)
    assert [m["content"] for m in kept] == ["s", "u1", "u2", "u3"]
    assert slots == [1, 2, 3]


def test_finished_indices_cuts_a_torn_last_line_and_refuses_foreign_files(tmp_path):
    out = tmp_path / "out.jsonl"
    assert finished_indices(out) == set()
    good = json.dumps({"record_index": 4, "messages": []}) + "\n" + json.dumps({"record_index": 7, "messages": []}) + "\n"
    out.write_text(good + '{"record_index": 9, "messa')
    assert finished_indices(out) == {4, 7}
    assert out.read_text() == good
    out.write_text(good + '{"record_index": 9}garbage\n')  # a torn write that ended in a newline
    assert finished_indices(out) == {4, 7}
    assert out.read_text() == good
    out.write_text("not json\n" + good)
    with pytest.raises(ValueError, match=r"out.jsonl:1: not a regenerated record"):
        finished_indices(out)


def test_regeneration_answers_turn_by_turn_with_the_regenerated_history(tiny_target_dir, chat_jsonl, tmp_path):
    out = tmp_path / "regen.jsonl"
    summary = run_regenerate(config(tiny_target_dir, chat_jsonl, out))
    lines = read_lines(out)
    # Record 5 has no assistant turn: regeneration is what answers it. Every record comes back once.
    assert [line["record_index"] for line in lines] == list(range(10))
    assert summary["records_written"] == 10 and summary["turns"] == 11
    assert [m["role"] for m in lines[5]["messages"]][-2:] == ["user", "assistant"]
    assert summary["generated_tokens"] > 0 and summary["tokens_per_second"] > 0
    for line in lines:
        roles = [m["role"] for m in line["messages"]]
        assert roles[roles.index("user"):] == ["user", "assistant"] * (len(roles[roles.index("user"):]) // 2)
    multi = lines[1]["messages"]
    assert [m["role"] for m in multi] == ["system", "user", "assistant", "user", "assistant"]
    assert multi[0]["content"] == "You are terse." and multi[3]["content"] == "And secondary ones?"
    assert multi[2]["content"] != "Red, yellow and blue."  # the source answer is not kept
    # The output is training data again: the chat reader takes it as is.
    from stage_extract.records import iter_chat_records

    assert [list(r.messages) for r in iter_chat_records(out)] == [line["messages"] for line in lines]

    # Turn 2 was answered given the *regenerated* turn 1: redo it by hand, unbatched.
    from stage_extract.target import load_target

    tokenizer, model = load_target(str(tiny_target_dir), device=torch.device("cpu"), dtype=torch.float32)
    for upto, answer in ((2, multi[2]), (4, multi[4])):
        ids = torch.tensor([render_generation_prompt(tokenizer, multi[:upto])])
        new = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
        new = new[: new.index(2)] if 2 in new else new
        assert answer["content"] == tokenizer.decode(new, skip_special_tokens=True).strip()


def test_resume_after_interruption_yields_each_record_once_and_identical(tiny_target_dir, chat_jsonl, tmp_path):
    whole = tmp_path / "whole.jsonl"
    run_regenerate(config(tiny_target_dir, chat_jsonl, whole))

    resumed = tmp_path / "resumed.jsonl"
    first = run_regenerate(config(tiny_target_dir, chat_jsonl, resumed, limit=3))
    assert first["records_written"] == 3
    with resumed.open("a") as handle:  # a kill in the middle of the next batch's write
        handle.write('{"record_index": 3, "source": "x", "messages": [{"role": "us')
    second = run_regenerate(config(tiny_target_dir, chat_jsonl, resumed))
    assert second["records_resumed"] == 3 and second["records_written"] == 7
    indices = [line["record_index"] for line in read_lines(resumed)]
    assert sorted(indices) == indices and len(set(indices)) == len(indices) == 10
    assert resumed.read_text() == whole.read_text()
    third = run_regenerate(config(tiny_target_dir, chat_jsonl, resumed))
    assert third["records_written"] == 0 and resumed.read_text() == whole.read_text()


def test_regenerate_command_prints_a_json_summary(tiny_target_dir, chat_jsonl, tmp_path):
    import typer
    from typer.testing import CliRunner

    from pipeline.cmd_eval import regenerate_command

    app = typer.Typer()
    app.command("regenerate")(regenerate_command)
    app.command("unused")(lambda: None)
    out = tmp_path / "cli.jsonl"
    result = CliRunner().invoke(app, [
        "regenerate", "--target", str(tiny_target_dir), "--data", str(chat_jsonl), "--out", str(out),
        "--max-new-tokens", "4", "--batch-size", "4", "--limit", "2", "--device", "cpu", "--json", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["records_written"] == 2 and [l["record_index"] for l in read_lines(out)] == [0, 1]
    bad = CliRunner().invoke(app, ["regenerate", "--target", "x", "--data", "y", "--out", str(tmp_path / "o.txt")])
    assert bad.exit_code == 2 and "--out must be a .jsonl file" in bad.output


def test_regenerate_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="--batch-size"):
        RegenerateConfig(target="t", data="d", out=tmp_path / "o.jsonl", batch_size=0)
    with pytest.raises(ConfigError, match="--max-new-tokens"):
        RegenerateConfig(target="t", data="d", out=tmp_path / "o.jsonl", max_new_tokens=0)
    with pytest.raises(ConfigError, match="--temperature"):
        RegenerateConfig(target="t", data="d", out=tmp_path / "o.jsonl", temperature=-1)
