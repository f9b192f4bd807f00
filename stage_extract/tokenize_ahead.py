"""Tokenising chat records ahead of the target's forwards.

Rendering a chat template, encoding it and turning the encoding into arrays cost about 1 s of
Python (GIL-holding) time per million tokens, on top of the encoding itself.  A small target such
as SmolLM2 computes features at ~460k tokens/s on an H200, so tokenising in the extraction process
would keep its GIL busy a third of the time: a thread that holds the GIL for its whole switch
interval makes the part writers wait up to 5 ms every time they need it back, and writing falls
behind (measured: 0.59 of the features' rate with a tokenizer thread, 0.87 with the records
tokenised beforehand).  So on a GPU :func:`tokenize_ahead` sends chunks of records to tokenizer
processes.  On Linux they are forked from the extraction process before any of its threads
tokenises (0.3-0.4 s for 2-8 of them on an H200 host; they never touch CUDA); elsewhere they fork
from a fork server that imports torch and transformers first (6-14 s), and until one is up the
producer thread tokenises the chunks itself.  A background thread alone (``workers=0,
background=True``) tokenises a chunk at a time, with one encoding call spread over the cores.
Inline (no thread, no process, record by record) is what CPU extraction uses, where the cores run
the target.  The output is the same in every mode: only where the work runs changes.

Records that ``wanted`` refuses (already sealed, another worker's) pass through untokenised.
Every item carries a snapshot of the reader's :class:`RecordStats` after its record, so that a
part's seal records the counts up to its own last record however far the producer has run
ahead.  An error in the reader or a tokenizer surfaces in the consumer at the record where it
happened (a tokenizer error names the record's source), after every record before it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from pipeline.prefetch import prefetch
from stage_extract.chat import TokenizedConversation, tokenize_conversation, tokenize_conversations
from stage_extract.records import ChatRecord, RecordStats

__all__ = ["TokenizedRecord", "tokenize_ahead", "tokenize_record", "tokenize_records"]

CHUNK_RECORDS = 64  # records per task sent to a tokenizer process
QUEUE_RECORDS = 4096  # records tokenised ahead of the consumer, at most
CHUNK_TIMEOUT_S = 120.0  # a chunk takes ~0.05 s; a process silent this long is taken for hung
_INLINE = object()  # a chunk the producer thread tokenises itself (the pool was not up yet)


@dataclass
class TokenizedRecord:
    record: ChatRecord
    wanted: bool  # False: passed through untokenised
    tokens: TokenizedConversation | None  # None (when wanted): no assistant token survives truncation
    stats: dict[str, int]  # the reader's counts after this record


def tokenize_record(tokenizer: Any, record: ChatRecord, max_length: int) -> TokenizedConversation | None:
    """:func:`tokenize_conversation`, with a failure naming the record."""
    try:
        return tokenize_conversation(tokenizer, record.messages, max_length=max_length)
    except Exception as err:
        raise ValueError(f"{record.source}: cannot tokenise this conversation: {type(err).__name__}: {err}") from err


def tokenize_records(tokenizer: Any, records: list[ChatRecord], max_length: int) -> Iterator[TokenizedConversation | None]:
    """:func:`tokenize_record` of each record, in order: all at once (one encoding call for the
    lot, see :func:`tokenize_conversations`), or, if that fails, record by record, so that the
    records before a bad one come out and the error names it."""
    try:
        batch = tokenize_conversations(tokenizer, [record.messages for record in records], max_length=max_length)
    except Exception:  # noqa: BLE001 - found again, with its record, below
        return (tokenize_record(tokenizer, record, max_length) for record in records)
    return iter(batch)


_worker_tokenizer: Any = None
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _init_worker(tokenizer: Any, parent: int | None = None) -> None:
    """Set up a tokenizer process.  ``tokenizer``: the object (forked) or a folder it was saved to
    (fork server).  Ctrl-C is left to the extraction, which shuts the processes down.

    ``parent`` (the extraction's pid) marks a forked process, which holds the extraction's CUDA
    handles, and so its GPU memory, for as long as it lives.  It dies with the extraction, even
    with a SIGKILL (``PR_SET_PDEATHSIG``), first freezes every object it inherited so that its
    collector never finalises one of the parent's (a CUDA graph finalised here calls CUDA, which
    fails in a forked process; the parent paused its collector until the fork, see
    :func:`_forking_safely`), and encodes on one thread (``TOKENIZERS_PARALLELISM=false``: the
    tokenizer library would otherwise start a thread per core in each process, or run on one,
    depending on whether the parent had used its threads before the fork)."""
    global _worker_tokenizer  # one tokenizer per pool process, loaded once
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent is not None:
        gc.freeze()
        gc.enable()
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        _die_with(parent)
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    _worker_tokenizer = tokenizer


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when the thread that forked it ends (Linux's
    ``PR_SET_PDEATHSIG``; the pool is made on the consumer's thread, which outlives it)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux's libc: the process outlives a killed parent
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _worker_ready() -> bool:
    return True


def _tokenize_chunk(records: list[ChatRecord], max_length: int) -> list[TokenizedConversation | None]:
    return list(tokenize_records(_worker_tokenizer, records, max_length))


def tokenize_ahead(
    records: Iterable[ChatRecord],
    stats: RecordStats,
    tokenizer: Any,
    *,
    max_length: int,
    wanted: Callable[[ChatRecord], bool] = lambda record: True,
    workers: int = 0,
    background: bool = False,
) -> Iterator[TokenizedRecord]:
    """The records of ``records`` (which fills ``stats``) in order, tokenised.

    ``background``: in chunks by a producer thread (:func:`pipeline.prefetch.prefetch`);
    ``workers`` N >= 1: by N processes that thread feeds; neither: inline, record by record."""
    if workers < 0:
        raise ValueError(f"tokenizer workers must be >= 0, got {workers}")
    if workers == 0 and not background:
        for record in records:
            keep = wanted(record)
            tokens = tokenize_record(tokenizer, record, max_length) if keep else None
            yield TokenizedRecord(record, keep, tokens, stats.as_dict())
        return
    # Made here, on the consumer's thread, before the producer thread starts: forked processes
    # then copy no lock that a thread of this module (or the tokenizer's) holds mid-encoding.
    pool = _BackgroundPool(workers, tokenizer) if workers else None
    try:
        yield from prefetch(_tokenized_in_chunks(records, stats, tokenizer, wanted, max_length, workers, pool),
                            depth=QUEUE_RECORDS)
    finally:  # the producer thread has ended: nothing submits any more
        if pool is not None:
            pool.shutdown()


def _start_method() -> str:
    """``fork`` on Linux: the children only tokenise, so the extraction's CUDA context and
    threads, which they inherit idle, are never used there (as in a DataLoader's workers).
    Elsewhere ``forkserver`` (macOS's system libraries do not survive a fork)."""
    return "fork" if sys.platform.startswith("linux") else "forkserver"


def _process_context(method: str):
    """Not spawn: every child would import torch and transformers itself (each child re-imports
    the ``__main__`` module, the CLI or a benchmark, which imports torch), ~10 s a process on an
    H200 host.  The fork server imports them once, and its children find them loaded."""
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["torch", "transformers", "stage_extract.tokenize_ahead"])
    return context


@contextlib.contextmanager
def _forking_safely():
    """Around the forks of tokenizer processes: the parent's garbage is collected first and its
    collector paused until the children exist, and each child freezes what it inherited before
    it collects again (:func:`_init_worker`).  So a child never finalises an object of the
    parent: a CUDA graph or tensor finalised in a forked process calls CUDA there, which fails
    (on an H200 host a CUDA graph left over from an earlier run aborted a tokenizer process)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        yield
    finally:
        if enabled:
            gc.enable()


class _BackgroundPool:
    """``workers`` tokenizer processes.  Forked (:func:`_start_method`), they start in
    ``__init__`` (0.3-0.4 s on an H200 host) and inherit ``tokenizer`` as it is.  From a fork
    server they start on a thread of their own, which takes seconds, during which the producer
    tokenises chunks itself instead of waiting; they load the tokenizer from a folder it is
    saved to (not a pickle of MBs: a process reads its start arguments only once it runs, and
    the writer of a pipe that size waits for it).  :meth:`ready` turns true once a process holds
    the tokenizer; a pool that fails to start stays not ready (everything is then tokenised
    inline, with the same result).  A process that dies, or leaves a chunk unanswered for
    :data:`CHUNK_TIMEOUT_S`, ends the pool the same way (:meth:`give_up`: killed, with a
    warning).  ``tokenizer`` may also be a saved folder's path."""

    def __init__(self, workers: int, tokenizer: Any):
        self.pool: ProcessPoolExecutor | None = None
        self._up = threading.Event()
        self._folder: tempfile.TemporaryDirectory | None = None
        self._thread: threading.Thread | None = None
        method = _start_method()
        if method == "fork":
            self._start(workers, tokenizer, method)
            return
        source = tokenizer  # a stand-in without save_pretrained (tests) goes as a pickle
        if hasattr(tokenizer, "save_pretrained"):
            self._folder = tempfile.TemporaryDirectory(prefix="talon-tokenizer-")
            tokenizer.save_pretrained(self._folder.name)
            source = self._folder.name
        self._thread = threading.Thread(target=self._start, args=(workers, source, method),
                                        name="talon-tokenizer-start", daemon=True)
        self._thread.start()

    def _start(self, workers: int, tokenizer_source: Any, method: str) -> None:
        forked = method == "fork"
        try:
            with _forking_safely() if forked else contextlib.nullcontext():
                self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=_process_context(method),
                                                initializer=_init_worker,
                                                initargs=(tokenizer_source, os.getpid() if forked else None))
                started = [self.pool.submit(_worker_ready) for _ in range(workers)]  # one process each
            started[0].result()
            self._up.set()
        except BaseException as err:
            self._abandon()
            if not isinstance(err, Exception):
                raise
            # no pool: the producer keeps tokenising inline
            warnings.warn(f"tokenizer processes did not start ({type(err).__name__}: {err}); "
                          "tokenising in the extraction process instead (same cache, slower)", RuntimeWarning)

    def _abandon(self) -> None:
        """Kill the processes a failed start left (a fork that failed after others succeeded):
        multiprocessing would wait for them when the extraction exits."""
        if self.pool is None:
            return
        processes = list((getattr(self.pool, "_processes", None) or {}).values())  # the executor's only handle on them
        for process in processes:
            process.kill()
        for process in processes:
            process.join(timeout=5)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = None

    def ready(self) -> bool:
        return self._up.is_set()

    def submit(self, records: list[ChatRecord], max_length: int) -> Future | None:
        """A chunk's tokens from a process, or None once a process has died (killed by the OOM
        killer, say): from then on the pool is not :meth:`ready` and chunks are tokenised in the
        extraction process, with the same result."""
        try:
            return self.pool.submit(_tokenize_chunk, records, max_length)
        except BrokenProcessPool as err:
            self.give_up(f"a tokenizer process died ({err})")
            return None

    def give_up(self, reason: str) -> None:
        """Stop using the processes (killed, if any still runs) and say why: later chunks are
        tokenised in the extraction process, with the same result."""
        self._up.clear()
        if self.pool is None:  # given up already
            return
        self._abandon()
        warnings.warn(f"{reason}; tokenising in the extraction process from here on (same cache, slower)", RuntimeWarning)

    def shutdown(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self._folder is not None:
            self._folder.cleanup()


def _tokenized_in_chunks(records, stats, tokenizer, wanted, max_length: int, workers: int,
                         starting: "_BackgroundPool | None") -> Iterator[TokenizedRecord]:
    """Chunks of wanted records are tokenised here, or go to the tokenizer processes of
    ``starting`` (``workers`` of them); the items come back in record order.  Until a process
    is up, chunks are tokenised here instead (in order, when their turn comes)."""
    in_flight: deque = deque()  # (items of the chunk, future of their wanted records' tokens, or INLINE)
    chunk: list[TokenizedRecord] = []

    def send() -> None:
        nonlocal chunk
        if chunk:
            todo = [item.record for item in chunk if item.wanted]
            if not todo:
                in_flight.append((chunk, None))
            elif starting is not None and starting.ready():
                in_flight.append((chunk, starting.submit(todo, max_length) or _INLINE))
            else:
                in_flight.append((chunk, _INLINE))
            chunk = []

    def here(items: list[TokenizedRecord]) -> Iterator[TokenizedConversation | None]:
        return tokenize_records(tokenizer, [item.record for item in items if item.wanted], max_length)

    def oldest() -> Iterator[TokenizedRecord]:
        items, future = in_flight.popleft()
        try:
            if future is _INLINE:
                tokens = here(items)
            elif future is None:
                tokens = iter(())
            else:
                try:
                    tokens = iter(future.result(timeout=CHUNK_TIMEOUT_S))
                except TimeoutError:
                    starting.give_up(f"a tokenizer process did not answer in {CHUNK_TIMEOUT_S:.0f} s")
                    raise
        except Exception:
            # Redo the chunk here (record by record once it fails again): the records before the bad one are delivered
            # (their part may complete and be sealed, as inline) and the error comes at its record.
            tokens = here(items)
        for item in items:
            if item.wanted:
                item.tokens = next(tokens)
            yield item

    failure: BaseException | None = None
    reader = iter(records)
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except BaseException as err:  # the reader failed: the records read before it come first
            failure = err
            break
        chunk.append(TokenizedRecord(record, wanted(record), None, stats.as_dict()))
        if len(chunk) >= CHUNK_RECORDS:
            send()
            while len(in_flight) > 2 * workers:
                yield from oldest()
    send()
    while in_flight:
        yield from oldest()
    if failure is not None:
        raise failure
