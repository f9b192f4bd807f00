"""Turning computed samples into sealed parts, off the critical path.

:class:`PartBuilder` gathers one part: its tokenised samples (in record order), the host
batches their features arrive in (possibly still being copied from the GPU), and the
bookkeeping its seal needs.  :class:`BackgroundPartWriter` finishes parts in a worker thread
behind a bounded queue: it waits for the copies, drops samples with non-finite features,
concatenates and writes the Zarr group, then flushes it and writes the seal on a sync thread,
so the target keeps computing while the previous parts are checked, compressed and written.  An
error in the worker surfaces in the caller at the next ``submit`` or at ``close``.
"""

from __future__ import annotations

import errno
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from schemas.checksum import DEFAULT_CHECKSUM
from schemas.file_sink import DEFAULT_WRITE_MODE, check_write_mode
from schemas.layout import DEFAULT_AUX_COMPRESSION, part_name
from schemas.manifest import PartSeal, write_seal
from schemas.store import encode_pool, fsync_tree, group_path, write_part_group
from stage_extract.transfer import HostBatch

FEATURE_PLANES = ("aux_hidden", "aux_scale", "topk_ids", "topk_logprobs", "final_hidden")


class CacheWriteError(RuntimeError):
    """Writing a part failed (full disk, unwritable path, ...); sealed parts stay valid."""


@dataclass
class SampleFeatures:
    record_index: int
    input_ids: np.ndarray
    loss_mask: np.ndarray
    aux_hidden: np.ndarray  # uint16 bf16 bits [T, 3H], or uint8 fp8 codes
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    aux_scale: np.ndarray | None = None  # [T, 3] float32 (fp8 only)
    final_hidden: np.ndarray | None = None  # uint16 bf16 bits [T, H]


@dataclass
class PendingSample:
    """A tokenised sample waiting for its features."""

    record_index: int
    input_ids: np.ndarray
    loss_mask: np.ndarray


_EMPTY_DTYPES = {"aux_hidden": np.uint16, "aux_scale": np.float32, "topk_ids": np.int64,
                 "topk_logprobs": np.float32, "final_hidden": np.uint16}


def _samples_finite(finite: np.ndarray, lengths: list[int]) -> np.ndarray:
    """Per sample of a batch: are all its rows' ``finite`` flags set (one vectorised pass)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ok = np.ones(len(lengths), dtype=bool)
    present = lengths > 0
    if present.any():
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))[present]
        ok[present] = np.logical_and.reduceat(np.asarray(finite, dtype=bool)[: int(lengths.sum())], starts)
    return ok


def concatenate_rows(planes: list[np.ndarray], out: np.ndarray) -> None:
    """Copy ``planes`` (same row shape and dtype as ``out``) one after another into ``out``, in
    one numpy call on the calling thread.  The copies used to be pool tasks, one per sample and
    plane: each task takes the GIL back several times, and each time a busy thread may hold it
    (the extraction's main thread, its tokenizer feeder and the other writers all run Python).
    Into a buffer reused from an earlier part (:class:`PlaneBuffers`, no page faults) one thread
    copies several GB/s."""
    np.concatenate(planes, axis=0, out=out)


class PlaneBuffers:
    """Host arrays that parts' feature planes are concatenated into, reused from part to part.

    A part's planes are ~0.2 GB for SmolLM2 and ~1 GB for an 8B target.  Copied into fresh
    memory, every page of them is faulted in and zeroed by the kernel first, which costs about
    as much as the copy itself; a buffer kept from an earlier part is written in place.  Each
    worker holds one part's buffers at a time, so ``keep`` per plane (the worker threads) are
    all that is ever reused; a part larger than every free buffer gets a new one, 1/8 larger
    than it needs, so that parts of varying length soon all fit."""

    def __init__(self, keep: int = 1):
        self._keep = max(1, keep)
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, name: str, rows: int, row_shape: tuple[int, ...], dtype) -> np.ndarray:
        """A buffer of at least ``rows`` rows of plane ``name`` (the part's are its first ``rows``)."""
        key = (name, tuple(row_shape), np.dtype(dtype).str)
        with self._lock:
            free = self._free.get(key, [])
            for i, buffer in enumerate(free):
                if len(buffer) >= rows:
                    return free.pop(i)
        return np.empty((rows + rows // 8,) + tuple(row_shape), dtype=dtype)

    def give_back(self, borrowed: list[tuple[str, np.ndarray]]) -> None:
        """Return ``(name, buffer)`` pairs from :meth:`take` once nothing reads them any more."""
        with self._lock:
            for name, buffer in borrowed:
                free = self._free.setdefault((name, buffer.shape[1:], buffer.dtype.str), [])
                free.append(buffer)
                if len(free) > self._keep:
                    free.pop(min(range(len(free)), key=lambda i: len(free[i])))  # keep the largest


@dataclass
class PartBuilder:
    """One part's samples plus the bookkeeping its seal needs.

    ``widths`` (elements per token row of each feature plane, see
    :func:`schemas.layout.row_widths`) shapes the arrays of a part left without samples."""

    index: int
    first_record: int
    samples: list[SampleFeatures] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    nonfinite_records: list[int] = field(default_factory=list)
    records_consumed: int = 0
    last_record: int = -1
    pending: list[PendingSample] = field(default_factory=list)
    batches: list[HostBatch] = field(default_factory=list)
    widths: dict[str, int] = field(default_factory=dict)
    borrowed: list[tuple[str, np.ndarray]] = field(default_factory=list)  # from PlaneBuffers, by arrays()

    def drop(self, record_index: int, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if reason == "nonfinite":
            self.nonfinite_records.append(record_index)

    def collect(self) -> None:
        """Turn the pending samples and their host batches into :attr:`samples`, in record
        order, refusing (dropping and listing) every sample with a non-finite feature."""
        if not self.pending:
            return
        features: dict[int, SampleFeatures | None] = {}
        for batch in self.batches:
            batch.wait()
            planes = {name: batch.numpy(name) for name in batch.tensors}
            finite = _samples_finite(planes["finite"], batch.lengths)
            start = 0
            for position, n, ok in zip(batch.samples, batch.lengths, finite):
                rows = slice(start, start + n)
                start += n
                item = self.pending[position]
                if not ok:
                    features[position] = None
                    continue
                features[position] = SampleFeatures(
                    record_index=item.record_index,
                    input_ids=item.input_ids,
                    loss_mask=item.loss_mask,
                    **{name: planes[name][rows] for name in FEATURE_PLANES if name in planes},
                )
        for position, item in enumerate(self.pending):
            sample = features[position]
            if sample is None:
                self.drop(item.record_index, "nonfinite")
            else:
                self.samples.append(sample)
        self.pending, self.batches = [], []

    def arrays(self, buffers: PlaneBuffers | None = None) -> dict[str, np.ndarray]:
        """The part's arrays, samples concatenated in order.  The feature planes (about 1 GB a
        part for an 8B target) are copied into place by :func:`concatenate_rows`.  With
        ``buffers`` they are views of buffers taken from it, listed in :attr:`borrowed` for the
        caller to give back once the part is written."""
        lengths = [len(s.input_ids) for s in self.samples]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])

        def cat(name: str, empty_shape: tuple[int, ...], dtype) -> np.ndarray:
            parts = [getattr(s, name) for s in self.samples]
            return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype)

        arrays = {
            "input_ids": cat("input_ids", (0,), np.int64),
            "loss_mask": cat("loss_mask", (0,), np.uint8),
            "sample_offsets": offsets,
            "record_index": np.asarray([s.record_index for s in self.samples], dtype=np.int64),
        }
        present = [n for n in FEATURE_PLANES if (self.samples and getattr(self.samples[0], n) is not None) or n in self.widths]
        for name in present:
            if not self.samples:
                arrays[name] = np.zeros((0, self.widths.get(name, 0)), _EMPTY_DTYPES[name])
                continue
            first, n_rows = getattr(self.samples[0], name), int(offsets[-1])
            if buffers is None:
                out = np.empty((n_rows,) + first.shape[1:], dtype=first.dtype)
            else:
                buffer = buffers.take(name, n_rows, first.shape[1:], first.dtype)
                self.borrowed.append((name, buffer))
                out = buffer[:n_rows]
            planes = [getattr(sample, name) for sample in self.samples]
            for sample, plane, n in zip(self.samples, planes, lengths):
                if len(plane) != n:  # one concatenation checks only the total
                    raise ValueError(f"record {sample.record_index}: {len(plane)} rows of {name} for {n} tokens")
            concatenate_rows(planes, out)
            arrays[name] = out
        return arrays

    def release_planes(self) -> None:
        """Drop the samples' feature planes once :meth:`arrays` has copied them: on CUDA they are
        views of the pinned host buffers of their batches, which the caching host allocator can
        only hand to later batches once nothing refers to them (the part's write takes seconds)."""
        for sample in self.samples:
            for name in FEATURE_PLANES:
                setattr(sample, name, None)

    def seal(self, arrays: dict[str, np.ndarray], records, source_stats: dict[str, int]) -> PartSeal:
        mask = arrays["loss_mask"].astype(bool)
        tokens, counts = np.unique(arrays["input_ids"][mask], return_counts=True)
        return PartSeal(
            index=self.index,
            name=part_name(self.index),
            n_samples=len(self.samples),
            n_tokens=int(arrays["input_ids"].shape[0]),
            n_assistant_tokens=int(mask.sum()),
            first_record=self.first_record,
            last_record=self.last_record,
            records_consumed=self.records_consumed,
            dropped=dict(self.dropped),
            nonfinite_records=tuple(self.nonfinite_records),
            source_stats=dict(source_stats),
            arrays=records,
            assistant_token_counts={int(t): int(c) for t, c in zip(tokens, counts)},
        )


def describe_write_error(err: BaseException, where: Path, action: str = "writing a part under") -> str:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        cause = f"the disk is full ({err})"
    elif isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = f"the path is not writable ({err})"
    else:
        cause = f"{type(err).__name__}: {err}"
    return (
        f"{action} {where} failed: {cause}. Every sealed part is intact and no manifest "
        "was written; fix the cause and rerun the same command to resume."
    )


class BackgroundPartWriter:
    """Finishes and writes parts in ``threads`` worker threads, flushes them to the disk on
    ``sync_threads`` more, and seals them strictly in order.

    Each worker thread collects and concatenates a part and writes its files; the compression
    and checksums of every part go to one shared pool of ``encode_threads`` threads
    (:func:`schemas.store.encode_pool`, GIL-free work), so a part's arrays are encoded on
    several cores at once.  A written part's arrays are dropped at once and its flush
    (:func:`schemas.store.fsync_tree`, which waits for the disk) runs on a sync thread, so a
    worker never idles on the disk while parts queue up behind it.  Whichever sync thread
    completes the part whose seal is due writes that seal and every later one already flushed:
    a crash can never leave a sealed part after an unsealed one.  At most ``threads +
    max_pending`` parts are in memory, and at most ``max_unsealed`` (default the same) are
    written but not yet sealed.  After a part fails, the parts before it are still sealed
    and no later one is.
    """

    def __init__(self, worker_dir: Path, vocab_size: int, feature_dtype: str = "bf16", teacher: str = "topk",
                 max_pending: int = 2, threads: int = 1, encode_threads: int | None = None,
                 aux_compression: str = DEFAULT_AUX_COMPRESSION, sync_threads: int = 2, max_unsealed: int | None = None,
                 checksum_name: str = DEFAULT_CHECKSUM, write_mode: str = DEFAULT_WRITE_MODE):
        self._dir = Path(worker_dir)
        self._vocab_size = vocab_size
        self._feature_dtype = feature_dtype
        self._teacher = teacher
        self._aux_compression = aux_compression
        self._checksum_name = checksum_name
        self._write_mode = check_write_mode(write_mode)
        self._pool = encode_pool(encode_threads)
        self._buffers = PlaneBuffers(keep=max(1, threads))
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None  # the error of the lowest part that failed
        self._error_where: Path = worker_dir  # that part's group
        self._stop_at: int | None = None  # no part from this index on is sealed (set by an error)
        self._turn = threading.Condition()
        self._next_seal: int | None = None  # index of the part whose seal is due next
        self._flushed: dict[int, PartSeal] = {}  # on the disk, waiting for their turn to be sealed
        self._unsealed = 0
        self._max_unsealed = max_unsealed or max(1, threads) + max_pending
        self._sync = ThreadPoolExecutor(max(1, sync_threads), thread_name_prefix="talon-part-sync")
        self.sealed: list[PartSeal] = []
        self._threads = [
            threading.Thread(target=self._work, name=f"talon-part-writer-{i}", daemon=True) for i in range(max(1, threads))
        ]
        for thread in self._threads:
            thread.start()

    def _fail(self, err: BaseException, index: int) -> None:
        """Part ``index`` failed: it and every later part stay unsealed; earlier ones still are."""
        with self._turn:
            if self._stop_at is None or index < self._stop_at:
                self._error, self._error_where, self._stop_at = err, group_path(self._dir, part_name(index)), index
            self._turn.notify_all()

    def _halted(self, index: int) -> bool:
        return self._stop_at is not None and index >= self._stop_at

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            builder, source_stats = item
            if self._halted(builder.index):
                continue
            try:
                builder.collect()
                arrays = builder.arrays(self._buffers)
                builder.release_planes()
                records = write_part_group(
                    self._dir, part_name(builder.index), arrays, self._vocab_size,
                    feature_dtype=self._feature_dtype, teacher=self._teacher,
                    aux_compression=self._aux_compression, pool=self._pool, sync=False,
                    checksum_name=self._checksum_name, write_mode=self._write_mode,
                )
                seal = builder.seal(arrays, records, source_stats)
                del arrays  # written: every encoding and checksum task has read them
                self._buffers.give_back(builder.borrowed)
                builder.borrowed = []
                with self._turn:  # the part due next always passes: later ones wait on it
                    self._turn.wait_for(lambda: self._halted(builder.index) or self._unsealed < self._max_unsealed
                                        or builder.index == self._next_seal)
                    if self._halted(builder.index):
                        continue
                    self._unsealed += 1
                self._sync.submit(self._flush_and_seal, seal)
            except BaseException as err:  # surfaced to the caller, never swallowed
                # The error's traceback keeps this frame: free the part's arrays.  Its buffers
                # are not reused (a task may still read them), only dropped.
                arrays = None
                builder.borrowed = []
                self._fail(err, builder.index)

    def _flush_and_seal(self, seal: PartSeal) -> None:
        """Flush a written part to the disk, then write every seal now due, in order.  Runs on
        the sync pool, whose futures nobody reads: every error goes to :meth:`_fail`."""
        index = seal.index
        try:
            if self._halted(index):  # a part before it failed: it will never be sealed
                return
            fsync_tree(group_path(self._dir, seal.name))  # durable before its seal
            with self._turn:
                self._flushed[index] = seal
                while self._next_seal in self._flushed and not self._halted(self._next_seal):
                    index = self._next_seal  # the part an error now belongs to
                    due = self._flushed.pop(index)
                    write_seal(self._dir, due)  # small: a few ms under the lock
                    self.sealed.append(due)
                    self._next_seal += 1
                    self._unsealed -= 1
                self._turn.notify_all()
        except BaseException as err:
            self._fail(err, index)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise CacheWriteError(describe_write_error(self._error, self._error_where, "writing part")) from self._error

    def submit(self, builder: PartBuilder, source_stats: dict[str, int]) -> None:
        self._raise_if_failed()
        with self._turn:
            if self._next_seal is None:
                self._next_seal = builder.index
        self._queue.put((builder, dict(source_stats)))

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._sync.shutdown(wait=True)
        self._raise_if_failed()
