"""Tokenising chat records ahead of the target's forwards, in other processes.

Rendering a chat template is Python work (~200-300k tokens/s on one core), about a small
target's forward rate: done inline, the main thread alternates between tokenising a part's
records and queueing its forwards.  With ``workers >= 1``, :func:`tokenize_ahead` has a producer
thread read the records and hand chunks of them to a pool of spawned tokenizer processes,
and yields them in order with their tokens, behind a bounded queue.  The output is the same as
inline (``workers=0``): only where the work runs changes.  (A tokenizer thread instead of
processes measured slower than inline: the template rendering holds the GIL.)  The processes
take a few seconds to start (each imports transformers), which only a long run earns back.

Records that ``wanted`` refuses (already sealed, another worker's) pass through untokenised.
Every item carries a snapshot of the reader's :class:`RecordStats` after its record, so that a
part's seal records the counts up to its own last record however far the producer has run
ahead.  An error in the reader or a tokenizer surfaces in the consumer at the record where it
happened (a tokenizer error names the record's source), after every record before it.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.prefetch import prefetch
from stage_extract.chat import TokenizedConversation, tokenize_conversation
from stage_extract.records import ChatRecord, RecordStats

__all__ = ["TokenizedRecord", "tokenize_ahead", "tokenize_record"]

CHUNK_RECORDS = 64  # records per task sent to a tokenizer process
QUEUE_RECORDS = 4096  # records tokenised ahead of the consumer, at most


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


_worker_tokenizer: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _worker_tokenizer  # one tokenizer per pool process, sent once
    _worker_tokenizer = tokenizer


def _tokenize_chunk(records: list[ChatRecord], max_length: int) -> list[TokenizedConversation | None]:
    return [tokenize_record(_worker_tokenizer, record, max_length) for record in records]


def tokenize_ahead(
    records: Iterable[ChatRecord],
    stats: RecordStats,
    tokenizer: Any,
    *,
    max_length: int,
    wanted: Callable[[ChatRecord], bool] = lambda record: True,
    workers: int = 0,
) -> Iterator[TokenizedRecord]:
    """The records of ``records`` (which fills ``stats``) in order, tokenised.

    ``workers``: 0 tokenises inline (no thread, no process), N >= 1 in N spawned processes fed
    by a producer thread (:func:`pipeline.prefetch.prefetch`)."""
    if workers < 0:
        raise ValueError(f"tokenizer workers must be >= 0, got {workers}")
    if workers == 0:
        for record in records:
            keep = wanted(record)
            tokens = tokenize_record(tokenizer, record, max_length) if keep else None
            yield TokenizedRecord(record, keep, tokens, stats.as_dict())
        return
    yield from prefetch(_tokenized_by_pool(records, stats, tokenizer, wanted, max_length, workers), depth=QUEUE_RECORDS)


def _tokenized_by_pool(records, stats, tokenizer, wanted, max_length: int, workers: int) -> Iterator[TokenizedRecord]:
    """Chunks of wanted records go to a pool of ``workers`` spawned processes; the items come
    back in record order as chunks finish.  Closing the generator shuts the pool down."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(tokenizer,))
    in_flight: deque = deque()  # (items of the chunk, future of their wanted records' tokens)
    chunk: list[TokenizedRecord] = []

    def send() -> None:
        nonlocal chunk
        if chunk:
            todo = [item.record for item in chunk if item.wanted]
            in_flight.append((chunk, pool.submit(_tokenize_chunk, todo, max_length) if todo else None))
            chunk = []

    def oldest() -> Iterator[TokenizedRecord]:
        items, future = in_flight.popleft()
        try:
            tokens = iter(future.result() if future is not None else ())
        except Exception:
            # Redo the chunk here, record by record: the records before the bad one are delivered
            # (their part may complete and be sealed, as inline) and the error comes at its record.
            tokens = (tokenize_record(tokenizer, item.record, max_length) for item in items if item.wanted)
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
        pool.shutdown(wait=True, cancel_futures=True)
