"""Tokenising chat records ahead of the target's forwards.

Rendering a chat template and encoding it cost ~250k tokens/s of one core, about a small
target's forward rate, so on a GPU :func:`tokenize_ahead` runs them off the main thread: a
producer thread reads the records and tokenises them in chunks, one fast-tokenizer call encoding a
whole chunk (the tokenizer spreads it over the cores, outside the GIL; the rendering stays
Python), behind a bounded queue.  Optionally the chunks go to tokenizer processes instead; those
take seconds to start (6-14 s measured on an H200 host, each imports transformers), and until one
is up the producer thread tokenises the chunks itself.  Inline (no thread, no process, record by
record) is what CPU extraction uses, where the cores run the target.  The output is the same in
every mode: only where the work runs changes.

Records that ``wanted`` refuses (already sealed, another worker's) pass through untokenised.
Every item carries a snapshot of the reader's :class:`RecordStats` after its record, so that a
part's seal records the counts up to its own last record however far the producer has run
ahead.  An error in the reader or a tokenizer surfaces in the consumer at the record where it
happened (a tokenizer error names the record's source), after every record before it.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.prefetch import prefetch
from stage_extract.chat import TokenizedConversation, tokenize_conversation, tokenize_conversations
from stage_extract.records import ChatRecord, RecordStats

__all__ = ["TokenizedRecord", "tokenize_ahead", "tokenize_record", "tokenize_records"]

CHUNK_RECORDS = 64  # records per task sent to a tokenizer process
QUEUE_RECORDS = 4096  # records tokenised ahead of the consumer, at most
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


def _init_worker(tokenizer: Any) -> None:
    """``tokenizer``: a folder it was saved to (see :func:`_tokenized_in_chunks`), or the object."""
    global _worker_tokenizer  # one tokenizer per pool process, loaded once
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    _worker_tokenizer = tokenizer


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
    yield from prefetch(_tokenized_in_chunks(records, stats, tokenizer, wanted, max_length, workers), depth=QUEUE_RECORDS)


def _process_context():
    """Tokenizer processes fork from a fork server that imported torch and transformers once.
    Not a plain fork: the extraction process holds CUDA and threads.  Not spawn: every child
    would import torch and transformers itself (each child re-imports the ``__main__`` module,
    the CLI or a benchmark, which imports torch), ~10 s a process on an H200 host; forked from
    the server, that re-import finds them loaded."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "stage_extract.tokenize_ahead"])
    return context


class _BackgroundPool:
    """A process pool started by a thread of its own: starting the fork server and the
    processes takes seconds, during which the producer tokenises chunks itself instead of
    waiting.  :meth:`ready` turns true once a process holds the tokenizer; a pool that fails to
    start stays not ready (everything is then tokenised inline, with the same result)."""

    def __init__(self, workers: int, tokenizer_source: Any):
        self.pool: ProcessPoolExecutor | None = None
        self._up = threading.Event()
        self._thread = threading.Thread(target=self._start, args=(workers, tokenizer_source),
                                        name="talon-tokenizer-start", daemon=True)
        self._thread.start()

    def _start(self, workers: int, tokenizer_source: Any) -> None:
        try:
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=_process_context(),
                                            initializer=_init_worker, initargs=(tokenizer_source,))
            started = [self.pool.submit(_worker_ready) for _ in range(workers)]  # one process each
            started[0].result()
            self._up.set()
        except Exception as err:  # noqa: BLE001 - no pool: the producer keeps tokenising inline
            warnings.warn(f"tokenizer processes did not start ({type(err).__name__}: {err}); "
                          "tokenising in the extraction process instead (same cache, slower)", RuntimeWarning)

    def ready(self) -> bool:
        return self._up.is_set()

    def shutdown(self) -> None:
        self._thread.join()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _tokenized_in_chunks(records, stats, tokenizer, wanted, max_length: int, workers: int) -> Iterator[TokenizedRecord]:
    """Chunks of wanted records are tokenised here, or with ``workers`` >= 1 go to a pool of
    that many processes; the items come back in record order.  Until a process is up, chunks
    are tokenised here instead (in order, when their turn comes).  Closing the generator shuts
    the pool down."""
    folder = starting = None
    if workers:
        # The processes get the tokenizer as a saved folder, not as a pickle (MBs): a process reads
        # its start arguments only once it runs, and the writer of a pipe that size waits for it.
        folder = tempfile.TemporaryDirectory(prefix="talon-tokenizer-")
        source = tokenizer  # a stand-in without save_pretrained (tests) goes as a pickle
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(folder.name)
            source = folder.name
        starting = _BackgroundPool(workers, source)
    in_flight: deque = deque()  # (items of the chunk, future of their wanted records' tokens, or INLINE)
    chunk: list[TokenizedRecord] = []

    def send() -> None:
        nonlocal chunk
        if chunk:
            todo = [item.record for item in chunk if item.wanted]
            if not todo:
                in_flight.append((chunk, None))
            elif starting is not None and starting.ready():
                in_flight.append((chunk, starting.pool.submit(_tokenize_chunk, todo, max_length)))
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
            else:
                tokens = iter(future.result() if future is not None else ())
        except Exception:
            # Redo the chunk here (record by record once it fails again): the records before the bad one are delivered
            # (their part may complete and be sealed, as inline) and the error comes at its record.
            tokens = here(items)
        for item in items:
            if item.wanted:
                item.tokens = next(tokens)
            yield item

    try:
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
    finally:
        if starting is not None:
            starting.shutdown()
            folder.cleanup()
