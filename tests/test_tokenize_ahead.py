"""Tokenising ahead of the forwards, in a background thread (in chunks) or in tokenizer
processes: the same records, tokens and reader counts in the same order as inline, errors at the
record where they happen, and the same cache bytes from a whole extraction."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest

from stage_extract.records import DataError, RecordStats, iter_chat_records
from stage_extract.tokenize_ahead import tokenize_ahead
from tests.test_extract import assert_same_samples
from tests.conftest import extract_config


def _chats(path, n: int, bad_line: int | None = None):
    lines = []
    for i in range(n):
        reply = " ".join(f"word{j}" for j in range(i % 7 + 1))  # after long questions: cut away at max_length
        messages = [{"role": "user", "content": f"question {i} " * (i % 5 * 4 + 1)}, {"role": "assistant", "content": reply}]
        lines.append(json.dumps({"messages": messages}))
        if bad_line is not None and len(lines) + 1 == bad_line:
            lines.append("{not json")
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(path, tokenizer, workers: int, background: bool = True, **kwargs):
    stats = RecordStats()
    records = iter_chat_records(str(path), stats=stats, **kwargs)
    out = []
    for item in tokenize_ahead(records, stats, tokenizer, max_length=96, workers=workers, background=background,
                               wanted=lambda record: record.record_index % 3 != 1):
        tokens = None if item.tokens is None else (item.tokens.input_ids.tolist(), item.tokens.loss_mask.tolist())
        out.append((item.record.record_index, item.wanted, tokens, item.stats))
    return out, stats.as_dict()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


class _PoolReadyAfterThreeChunks:
    """Stands in for ``_BackgroundPool``: its "processes" run a task at once, in this process,
    but count as started only once three chunks have been tokenised inline; it records the
    first record of every chunk it ran."""

    inline_chunks: set = set()
    last = None

    def __init__(self, workers, tokenizer_source):
        import threading

        import stage_extract.tokenize_ahead as ahead

        self.made_on = threading.current_thread().name

        ahead._init_worker(tokenizer_source)
        self.ran: list[int] = []
        _PoolReadyAfterThreeChunks.last = self

    def submit(self, records, max_length):
        from concurrent.futures import Future

        import stage_extract.tokenize_ahead as ahead

        self.ran.append(records[0].record_index)
        future = Future()
        future.set_result(ahead._tokenize_chunk(records, max_length))
        return future

    def ready(self) -> bool:
        return len(_PoolReadyAfterThreeChunks.inline_chunks) >= 3

    def shutdown(self) -> None:
        pass


def test_chunks_sent_before_the_processes_start_are_tokenised_in_order_here(tokenizer, tmp_path, monkeypatch):
    import stage_extract.tokenize_ahead as ahead

    monkeypatch.setattr(ahead, "CHUNK_RECORDS", 10)
    monkeypatch.setattr(ahead, "_BackgroundPool", _PoolReadyAfterThreeChunks)
    monkeypatch.setattr(_PoolReadyAfterThreeChunks, "inline_chunks", set())
    path = _chats(tmp_path / "chats.jsonl", 150)
    inline, final = _run(path, tokenizer, 0, background=False)
    counted = ahead.tokenize_records

    def tokenize_records(tok, records, max_length):  # the inline path: the pool's tasks use _tokenize_chunk
        _PoolReadyAfterThreeChunks.inline_chunks.update(record.record_index // 10 for record in records)
        return counted(tok, records, max_length)

    monkeypatch.setattr(ahead, "tokenize_records", tokenize_records)
    monkeypatch.setattr(ahead, "_tokenize_chunk", lambda records, n: list(counted(ahead._worker_tokenizer, records, n)))
    assert _run(path, tokenizer, 2) == (inline, final)
    # Chunks sent while the pool was not up were queued for this thread; from the first one sent
    # after it came up, the pool ran every chunk, in order.  With 2 processes, 5 chunks are in
    # flight before the producer tokenises the oldest, so the pool is up from the 8th chunk.
    chunks = [r // 10 for r in _PoolReadyAfterThreeChunks.last.ran]  # each chunk's first wanted record
    assert chunks == list(range(7, 15))
    assert _PoolReadyAfterThreeChunks.inline_chunks == set(range(7))
    # made on the consumer's thread, before the producer thread tokenised anything (forked
    # processes must not copy a lock held mid-encoding)
    assert _PoolReadyAfterThreeChunks.last.made_on == "MainThread"


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_background_pool_starts_processes_or_says_why_not(tokenizer, tmp_path, monkeypatch, method):
    import stage_extract.tokenize_ahead as ahead

    monkeypatch.setattr(ahead, "_start_method", lambda: method)
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(folder)
    starting = ahead._BackgroundPool(1, tokenizer if method == "fork" else str(folder))
    if method == "fork":
        assert starting.ready()  # forked at once, on this thread
    record = next(iter_chat_records(str(_chats(tmp_path / "chats.jsonl", 3))))
    try:
        for _ in range(600):
            if starting.ready():
                break
            time.sleep(0.1)
        assert starting.ready()
        (tokens,) = starting.submit([record], 96).result()
        assert tokens.input_ids.tolist() == ahead.tokenize_record(tokenizer, record, 96).input_ids.tolist()
    finally:
        starting.shutdown()
    with pytest.warns(RuntimeWarning, match="tokenizer processes did not start"):
        broken = ahead._BackgroundPool(1, str(tmp_path / "no-such-tokenizer"))
        broken.shutdown()
    assert not broken.ready()


def test_a_thread_or_processes_give_the_inline_stream(tokenizer, tmp_path, monkeypatch):
    import stage_extract.tokenize_ahead as ahead

    monkeypatch.setattr(ahead, "CHUNK_RECORDS", 7)  # several chunks in flight, a short last one
    path = _chats(tmp_path / "chats.jsonl", 150)
    inline, final = _run(path, tokenizer, 0, background=False)
    assert len(inline) == 150
    assert sum(1 for _, wanted, _, _ in inline if not wanted) == 50  # passed through untokenised
    assert any(wanted and tokens is None for _, wanted, tokens, _ in inline)  # no assistant token left
    assert any(tokens is not None for _, _, tokens, _ in inline)
    assert [stats["records_read"] for *_, stats in inline] == list(range(1, 151))  # counts after each record
    assert _run(path, tokenizer, 0) == (inline, final)  # a thread, in chunks (one encoding call each)
    assert _run(path, tokenizer, 2) == (inline, final)  # processes forked after the thread used the tokenizer


def test_tokenizer_processes_by_default_only_for_the_hf_backend_on_a_gpu(monkeypatch):
    import torch

    import stage_extract.run as run_path

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(run_path, "cores_per_worker", lambda: 16)
    assert run_path.tokenizer_processes(None, cuda, "hf") == run_path.DEFAULT_TOKENIZER_PROCESSES == 2
    assert run_path.tokenizer_processes(None, cpu, "hf") == 0
    assert run_path.tokenizer_processes(None, cuda, "vllm") == 0
    assert run_path.tokenizer_processes(0, cuda, "hf") == 0  # asked for the thread
    assert run_path.tokenizer_processes(5, cpu, "hf") == 5
    monkeypatch.setattr(run_path, "cores_per_worker", lambda: 3)
    assert run_path.tokenizer_processes(None, cuda, "hf") == 0


@pytest.mark.parametrize("workers, background", [(0, False), (0, True), (1, True)])
def test_a_bad_record_fails_after_every_record_before_it(tokenizer, tmp_path, workers, background):
    path = _chats(tmp_path / "chats.jsonl", 40, bad_line=30)
    seen = []
    stats = RecordStats()
    with pytest.raises(DataError, match=r"chats\.jsonl:30"):
        for item in tokenize_ahead(iter_chat_records(str(path), stats=stats), stats, tokenizer, max_length=96,
                                   workers=workers, background=background):
            seen.append(item.record.record_index)
    assert seen == list(range(29))


class _FailsOnRecord7:
    """A picklable stand-in tokenizer whose chat template breaks on one conversation."""

    is_fast = False
    chat_template = "x"

    def apply_chat_template(self, messages, **kwargs):
        if "question 7 " in messages[0]["content"]:
            raise KeyError("template variable")
        return "text"

    def __call__(self, text, **kwargs):
        return {"input_ids": [1, 2, 3]}

    def encode(self, text, **kwargs):
        return [1, 2, 3]


@pytest.mark.parametrize("workers, background", [(0, False), (0, True), (2, True)])
def test_a_tokenizer_failure_names_the_record(tmp_path, workers, background):
    path = _chats(tmp_path / "chats.jsonl", 20)
    stats = RecordStats()
    seen = []
    with pytest.raises(ValueError, match=r"chats\.jsonl:8: cannot tokenise this conversation: KeyError"):
        for item in tokenize_ahead(iter_chat_records(str(path), stats=stats), stats, _FailsOnRecord7(), max_length=96,
                                   workers=workers, background=background):
            seen.append(item.record.record_index)
    assert seen == list(range(7))


def test_extraction_with_tokenizer_processes_writes_the_same_cache(tiny_target_dir, chat_jsonl, tiny_cache, tmp_path):
    from schemas.manifest import read_manifest, read_sealed_parts
    from schemas.store import CacheReader
    from stage_extract.run import run_extract

    out = tmp_path / "ahead"
    run_extract(extract_config(out, tiny_target_dir, chat_jsonl, tokenizer_workers=2))
    assert_same_samples(CacheReader(tiny_cache), CacheReader(out))
    assert read_manifest(out).source_stats == read_manifest(tiny_cache).source_stats
    assert [s.source_stats for s in read_sealed_parts(out)] == [s.source_stats for s in read_sealed_parts(tiny_cache)]
    assert [s.records_consumed for s in read_sealed_parts(out)] == [s.records_consumed for s in read_sealed_parts(tiny_cache)]


class _RecordsWhereFinalised:
    """A reference cycle (only the collector frees it) that appends the finalising process's id
    to ``path``: a stand-in for a CUDA graph, which a forked child must never finalise."""

    def __init__(self, path):
        self.path, self.me = path, self

    def __del__(self):
        with open(self.path, "a") as out:
            out.write(f"{os.getpid()}\n")


def test_forked_tokenizer_processes_never_collect_the_parents_garbage(tokenizer, tmp_path, monkeypatch):
    import gc
    import types

    import stage_extract.tokenize_ahead as ahead

    monkeypatch.setattr(ahead, "_start_method", lambda: "fork")
    log = tmp_path / "finalised"
    log.write_text("")

    def collect_then_leave_garbage():  # as another thread may, between the collection and the fork
        collected = gc.collect()
        _RecordsWhereFinalised(log)
        return collected

    monkeypatch.setattr(ahead, "gc", types.SimpleNamespace(
        collect=collect_then_leave_garbage, isenabled=gc.isenabled, disable=gc.disable, enable=gc.enable,
        freeze=gc.freeze))
    was_enabled = gc.isenabled()
    starting = ahead._BackgroundPool(1, tokenizer)
    try:
        assert starting.ready()
        assert gc.isenabled() == was_enabled  # the parent's collector is back as it was
        starting.pool.submit(gc.collect).result()  # a collection in the child
        record = next(iter_chat_records(str(_chats(tmp_path / "chats.jsonl", 2))))
        (tokens,) = starting.submit([record], 96).result()
        assert tokens.input_ids.tolist() == ahead.tokenize_record(tokenizer, record, 96).input_ids.tolist()
    finally:
        starting.shutdown()
    gc.collect()
    assert log.read_text().split() == [str(os.getpid())]  # finalised here only, never in the child


def _child_settings():
    import signal

    return signal.getsignal(signal.SIGINT) == signal.SIG_IGN, os.environ.get("TOKENIZERS_PARALLELISM"), os.getppid()


def test_forked_tokenizer_processes_leave_ctrl_c_to_the_parent_and_encode_on_one_thread(tokenizer, monkeypatch):
    import stage_extract.tokenize_ahead as ahead

    monkeypatch.setattr(ahead, "_start_method", lambda: "fork")
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    starting = ahead._BackgroundPool(1, tokenizer)
    try:
        assert starting.pool.submit(_child_settings).result() == (True, "false", os.getpid())
    finally:
        starting.shutdown()
    assert os.environ.get("TOKENIZERS_PARALLELISM") == before  # set in the child only


_KILLED_PARENT = """
import sys, time
from transformers import AutoTokenizer
import stage_extract.tokenize_ahead as ahead
ahead._start_method = lambda: "fork"
pool = ahead._BackgroundPool(2, AutoTokenizer.from_pretrained(sys.argv[1]))
print(" ".join(str(p.pid) for p in pool.pool._processes.values()), flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie no one reaped yet
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked tokenizer processes are Linux-only")
def test_forked_tokenizer_processes_die_with_a_killed_extraction(smollm2_dir):
    """They hold the extraction's CUDA handles: left alive, they would keep its GPU memory."""
    import signal
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT, str(smollm2_dir)], cwd=root,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(children) == 2 and not any(_gone(pid) for pid in children)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 20
    while not all(_gone(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(pid) for pid in children)


def test_a_failed_fork_leaves_no_process_behind(tokenizer, monkeypatch):
    import multiprocessing

    import stage_extract.tokenize_ahead as ahead

    monkeypatch.setattr(ahead, "_start_method", lambda: "fork")
    forks = []
    real_fork = os.fork

    def fork_once():  # the second fork fails, as it may for want of memory
        forks.append(1)
        if len(forks) == 2:
            raise OSError(12, "Cannot allocate memory")
        return real_fork()

    monkeypatch.setattr(os, "fork", fork_once)
    with pytest.warns(RuntimeWarning, match="tokenizer processes did not start"):
        starting = ahead._BackgroundPool(2, tokenizer)
    monkeypatch.setattr(os, "fork", real_fork)
    starting.shutdown()
    assert not starting.ready() and len(forks) == 2
    assert multiprocessing.active_children() == []  # nothing left for the exit to wait on


def test_closing_the_stream_early_ends_the_processes(tokenizer, tmp_path, monkeypatch):
    import multiprocessing

    import stage_extract.tokenize_ahead as ahead

    monkeypatch.setattr(ahead, "CHUNK_RECORDS", 10)
    monkeypatch.setattr(ahead, "_start_method", lambda: "fork")
    path = _chats(tmp_path / "chats.jsonl", 150)
    stats = RecordStats()
    stream = tokenize_ahead(iter_chat_records(str(path), stats=stats), stats, tokenizer, max_length=96, workers=2,
                            background=True)
    first = [next(stream) for _ in range(25)]
    assert multiprocessing.active_children()  # the processes run
    stream.close()
    assert [item.record.record_index for item in first] == list(range(25))
    assert multiprocessing.active_children() == []


_MISBEHAVIOUR = {"how": "die"}  # set before the processes fork: they inherit it


def _misbehaves_from_record_30(records, max_length):
    """A tokenizer process's task that, from record 30 on, kills its process (``die``, as the OOM
    killer would) or never returns (``hang``, as a deadlock would)."""
    import stage_extract.tokenize_ahead as ahead

    if records[0].record_index >= 30:
        if _MISBEHAVIOUR["how"] == "die":
            os._exit(1)
        time.sleep(3600)
    return list(ahead.tokenize_records(ahead._worker_tokenizer, records, max_length))


@pytest.mark.parametrize("how, warning", [("die", "a tokenizer process died"), ("hang", "did not answer in 1 s")])
def test_a_dead_or_hung_tokenizer_process_leaves_the_rest_to_this_process(tokenizer, tmp_path, monkeypatch, how, warning):
    import multiprocessing

    import stage_extract.tokenize_ahead as ahead

    monkeypatch.setitem(_MISBEHAVIOUR, "how", how)
    monkeypatch.setattr(ahead, "CHUNK_RECORDS", 10)
    monkeypatch.setattr(ahead, "CHUNK_TIMEOUT_S", 1.0)
    monkeypatch.setattr(ahead, "_start_method", lambda: "fork")
    path = _chats(tmp_path / "chats.jsonl", 150)
    inline = _run(path, tokenizer, 0, background=False)
    monkeypatch.setattr(ahead, "_tokenize_chunk", _misbehaves_from_record_30)
    with pytest.warns(RuntimeWarning, match=warning) as warned:
        assert _run(path, tokenizer, 2) == inline
    assert len([w for w in warned if "tokenising in the extraction process" in str(w.message)]) == 1
    assert multiprocessing.active_children() == []  # killed, nothing left for the exit to wait on
