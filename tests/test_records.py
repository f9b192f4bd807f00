"""Tests for stage_extract.records: parsing, error reporting, streaming arrays."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from stage_extract import records as R
from stage_extract.records import (
    ChatRecord,
    DataError,
    PromptRecord,
    RecordStats,
    iter_chat_records,
    iter_prompt_records,
)


def sg(*turns: tuple[str, str], **extra: object) -> dict:
    """A ShareGPT-form record."""
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def oa(*turns: tuple[str, object]) -> dict:
    """An OpenAI-form record."""
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def write_jsonl(path: Path, lines: list[object]) -> Path:
    """Write objects (or raw strings, verbatim) one per line."""
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


# --------------------------------------------------------------------------
# JSONL parsing
# --------------------------------------------------------------------------


def test_sharegpt_jsonl_roles_and_sources(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            sg(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello!"), id="a"),
            "",  # blank line: ignored, no record index
            sg(("user", "Q1"), ("chatgpt", "A1"), ("human", "Q2"), ("bing", "A2"), ("human", "Q3"), ("bard", "A3"), ("user", "Q4"), ("model", "A4")),
        ],
    )
    recs = list(iter_chat_records(str(path)))
    assert [r.record_index for r in recs] == [0, 1]
    assert recs[0].source == f"{path}:1"
    assert recs[1].source == f"{path}:3"
    assert recs[0].messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    )
    assert [m["role"] for m in recs[1].messages] == ["user", "assistant"] * 4
    assert isinstance(recs[0], ChatRecord)
    with pytest.raises(Exception):
        recs[0].record_index = 5  # type: ignore[misc]  # frozen


def test_openai_jsonl_with_content_parts(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "oa.jsonl",
        [
            oa(("developer", "Sys"), ("user", [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]), ("assistant", "Hi"), ("assistant", "again")),
        ],
    )
    (rec,) = iter_chat_records(path)
    assert rec.messages == (
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
        {"role": "assistant", "content": "again"},  # consecutive same-role turns kept
    )


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "name.jsonl", [sg(("human", "a"), ("gpt", "b")), "", '{"conversations": [}'])
    it = iter_chat_records(path)
    assert next(it).record_index == 0
    with pytest.raises(DataError, match=r"name\.jsonl:3: invalid JSON"):
        next(it)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ({"foo": 1}, "neither 'conversations' nor 'messages'"),
        ([1, 2], "must be a JSON object"),
        ({"conversations": "x"}, "'conversations' must be a list"),
        (sg(("human", "a"), ("robot", "b")), "unknown role 'robot'"),
        ({"conversations": [{"from": "human"}]}, "has no 'value'"),
        ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "unsupported content part"),
    ],
)
def test_schema_errors_name_file_and_line(tmp_path: Path, line: object, fragment: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [sg(("human", "a"), ("gpt", "b")), line])
    with pytest.raises(DataError) as info:
        list(iter_chat_records(path))
    assert str(info.value).startswith(f"{path}:2: ")
    assert fragment in str(info.value)


def test_skip_bad_records_counts_and_keeps_indices_stable(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            sg(("human", "q0"), ("gpt", "a0")),
            "{not json",
            {"nothing": True},
            sg(("human", "q3"), ("gpt", "a3")),
            sg(("human", "q4"), ("alien", "a4")),
            sg(("human", "q5"), ("gpt", "a5")),
        ],
    )
    stats = RecordStats()
    recs = list(iter_chat_records(path, skip_bad_records=True, stats=stats))
    assert [r.record_index for r in recs] == [0, 3, 5]
    assert [r.messages[1]["content"] for r in recs] == ["a0", "a3", "a5"]
    assert stats.as_dict() == {"records_read": 6, "bad_records": 3, "empty": 0, "no_assistant": 0, "truncated_tail": 0}


def test_empty_and_no_assistant_counting(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "skip.jsonl",
        [
            sg(),  # no messages -> empty
            sg(("human", ""), ("gpt", "")),  # only empty contents -> empty
            sg(("human", "only a question")),  # -> no_assistant
            sg(("human", "q"), ("gpt", "")),  # empty assistant -> no_assistant
            sg(("gpt", "orphan reply")),  # leading assistant dropped -> no_assistant
            sg(("gpt", "lead"), ("system", "S"), ("gpt", "lead2"), ("human", "q"), ("gpt", "a")),
            oa(("user", "q"), ("assistant", None)),  # tool-call-only reply -> no_assistant
        ],
    )
    stats = RecordStats()
    recs = list(iter_chat_records(path, stats=stats))
    assert len(recs) == 1
    assert recs[0].record_index == 5
    # Leading assistant turns before the first user turn go; system stays.
    assert recs[0].messages == (
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    )
    assert (stats.records_read, stats.empty, stats.no_assistant, stats.bad_records) == (7, 2, 4, 0)


def test_limit_counts_yielded_records(tmp_path: Path) -> None:
    lines = [sg(("human", "q"), ("gpt", "")) if i % 2 else sg(("human", f"q{i}"), ("gpt", f"a{i}")) for i in range(10)]
    path = write_jsonl(tmp_path / "lim.jsonl", lines)
    stats = RecordStats()
    recs = list(iter_chat_records(path, limit=3, stats=stats))
    assert [r.record_index for r in recs] == [0, 2, 4]
    assert stats.records_read == 5 and stats.no_assistant == 2
    assert list(iter_chat_records(path, limit=0)) == []


def test_missing_source_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file.*'sharegpt'"):
        list(iter_chat_records(tmp_path / "nope.jsonl"))


# --------------------------------------------------------------------------
# JSON arrays (streaming)
# --------------------------------------------------------------------------


def _array_text(n: int) -> tuple[str, list[dict]]:
    objs = [sg(("human", f"question {i} \u00e9\u4e2d"), ("gpt", f"answer {i} with \"quotes\" and \\ and \n newline"), id=str(i)) for i in range(n)]
    return json.dumps(objs, indent=2, ensure_ascii=bool(n % 2)), objs


def test_json_array_complete_small_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(R, "_CHUNK_CHARS", 7)  # exercise the rolling buffer
    text, objs = _array_text(6)
    path = tmp_path / "arr.json"
    path.write_text(text, encoding="utf-8")
    stats = RecordStats()
    recs = list(iter_chat_records(path, stats=stats))
    assert len(recs) == 6
    assert [r.messages[1]["content"] for r in recs] == [o["conversations"][1]["value"] for o in objs]
    # Source line is the line where each element starts.
    lines = text.split("\n")
    for r in recs:
        line = int(r.source.rsplit(":", 1)[1])
        assert lines[line - 1].strip() == "{"
    assert stats.truncated_tail == 0 and stats.records_read == 6


def test_truncated_json_array_yields_complete_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(R, "_CHUNK_CHARS", 16)
    text, objs = _array_text(4)
    data = text.encode("utf-8")
    # Where each element's closing brace is in the byte stream.
    decoder = json.JSONDecoder()
    ends = []
    pos = text.index("{")
    for _ in objs:
        _, end = decoder.raw_decode(text, pos)
        ends.append(len(text[:end].encode("utf-8")))
        nxt = text.find("{", end)
        pos = nxt if nxt >= 0 else end
    path = tmp_path / "cut.json"
    for cut in range(1, len(data)):  # every cut, including mid multi-byte character
        path.write_bytes(data[:cut])
        stats = RecordStats()
        recs = list(iter_chat_records(path, stats=stats))
        expected = sum(1 for e in ends if e <= cut)
        assert len(recs) == expected, cut
        assert [r.messages[0]["content"] for r in recs] == [o["conversations"][0]["value"] for o in objs[:expected]]
        assert stats.truncated_tail == 1, cut


def test_json_array_syntax_error_is_fatal_even_when_skipping(tmp_path: Path) -> None:
    good = json.dumps(sg(("human", "q"), ("gpt", "a")))
    path = tmp_path / "broken.json"
    path.write_text(f"[\n{good},\n{good},\n{{\"conversations\": [oops]}},\n{good}\n]\n")
    with pytest.raises(DataError, match=r"broken\.json:4: invalid JSON"):
        list(iter_chat_records(path, skip_bad_records=True))


def test_json_array_schema_errors_can_be_skipped(tmp_path: Path) -> None:
    good = sg(("human", "q"), ("gpt", "a"))
    path = tmp_path / "schema.json"
    path.write_text(json.dumps([good, {"x": 1}, good], indent=1))
    with pytest.raises(DataError, match=r"schema\.json:\d+: record has neither"):
        list(iter_chat_records(path))
    stats = RecordStats()
    assert [r.record_index for r in iter_chat_records(path, skip_bad_records=True, stats=stats)] == [0, 2]
    assert stats.bad_records == 1


def test_builtin_sharegpt_with_limit_is_fast() -> None:
    start = time.perf_counter()
    stats = RecordStats()
    recs = list(iter_chat_records("sharegpt", limit=1500, stats=stats))
    elapsed = time.perf_counter() - start
    assert len(recs) == 1500
    assert elapsed < 10.0
    assert recs[0].source.endswith("ShareGPT_V3_unfiltered_cleaned_split.json:2")
    assert [r.record_index for r in recs] == sorted({r.record_index for r in recs})
    for r in recs:
        assert r.messages[0]["role"] in ("user", "system")
        assert any(m["role"] == "assistant" and m["content"] for m in r.messages)
    assert stats.records_read >= 1500 and stats.bad_records == 0


# --------------------------------------------------------------------------
# Prompt records
# --------------------------------------------------------------------------


def test_mt_bench_builtin() -> None:
    recs = list(iter_prompt_records("mt-bench"))
    assert len(recs) == 80
    assert all(isinstance(r, PromptRecord) and len(r.turns) == 2 for r in recs)
    assert all(isinstance(t, str) and t for r in recs for t in r.turns)
    cats: dict[str, int] = {}
    for r in recs:
        cats[r.category] = cats.get(r.category, 0) + 1  # type: ignore[index]
    assert len(cats) == 8 and set(cats.values()) == {10}
    assert recs[0].prompt_id == "81" and recs[0].record_index == 0
    assert recs[0].source.endswith("question.jsonl:1")


def test_prompt_jsonl_forms_and_errors(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": "One?", "category": "c"}, "", {"turns": ["A", "B"], "id": 7}],
    )
    recs = list(iter_prompt_records(path))
    assert [(r.record_index, r.turns, r.category, r.prompt_id) for r in recs] == [
        (0, ("One?",), "c", None),
        (1, ("A", "B"), None, "7"),
    ]
    assert recs[1].source == f"{path}:3"

    for bad, fragment in [
        ({"turns": []}, "non-empty list"),
        ({"turns": ["ok", 3]}, r"turns\[1\]"),
        ({"prompt": ""}, "'prompt' must be"),
        ({"question": "x"}, "neither 'prompt' nor 'turns'"),
        ("[1,", "invalid JSON"),
    ]:
        path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, bad])
        with pytest.raises(DataError, match=rf"p\.jsonl:2: .*{fragment}"):
            list(iter_prompt_records(path))
