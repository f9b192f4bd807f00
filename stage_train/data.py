"""Batches of cached features for the draft, read straight from the Zarr parts.

Reading is windowed: each epoch visits the parts in a seeded random order, a few parts at a
time; a window's parts are read whole (sequential, multi-threaded shard decoding, no per-sample
seeks), its samples are shuffled and grouped by length under a token budget, and the batches
are served from memory.  A background thread prepares the next batches while the trainer
steps, so I/O stays off the critical path.  The plan is a pure function of (seed, epoch), so a
resumed run can skip to any batch without reading anything before it.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.batching import shuffled_bucket_batches
from schemas.store import CacheReader

FEATURE_ARRAYS = ("input_ids", "loss_mask", "aux_hidden", "topk_ids", "topk_logprobs")


BATCH_TENSORS = ("input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "topk_ids", "topk_logprobs", "final_hidden")


@dataclass
class FeatureBatch:
    """A padded batch as stored (nothing shifted yet).  The teacher is the cached top-k, the
    pre-norm final hidden state, or both, depending on what the cache holds and was asked for."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64
    loss_mask: torch.Tensor  # [B, T] bool
    aux_hidden_states: torch.Tensor  # [B, T, 3H] bfloat16
    topk_ids: torch.Tensor | None  # [B, T, k] int64
    topk_logprobs: torch.Tensor | None  # [B, T, k] float32
    n_tokens: int
    final_hidden: torch.Tensor | None = None  # [B, T, H] bfloat16

    def _map(self, fn) -> "FeatureBatch":
        values = {name: (None if getattr(self, name) is None else fn(getattr(self, name))) for name in BATCH_TENSORS}
        return FeatureBatch(**values, n_tokens=self.n_tokens)

    def to(self, device: torch.device) -> "FeatureBatch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "FeatureBatch":
        return self._map(lambda t: t.pin_memory())


def bf16_from_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)


def _padded(rows: list[dict[str, np.ndarray]], name: str, width: int, dtype) -> np.ndarray:
    first = rows[0][name]
    out = np.zeros((len(rows), width, *first.shape[1:]), dtype)
    for b, row in enumerate(rows):
        out[b, : len(row[name])] = row[name]
    return out


def collate(rows: list[dict[str, np.ndarray]]) -> FeatureBatch:
    """Right-pad per-sample rows into one batch."""
    lengths = [len(row["input_ids"]) for row in rows]
    width = max(lengths)
    attention = np.zeros((len(rows), width), np.int64)
    for b, n in enumerate(lengths):
        attention[b, :n] = 1
    has_topk = "topk_ids" in rows[0]
    return FeatureBatch(
        input_ids=torch.from_numpy(_padded(rows, "input_ids", width, np.int64)),
        attention_mask=torch.from_numpy(attention),
        loss_mask=torch.from_numpy(_padded(rows, "loss_mask", width, np.bool_)),
        aux_hidden_states=bf16_from_bits(_padded(rows, "aux_hidden", width, np.uint16)),
        topk_ids=torch.from_numpy(_padded(rows, "topk_ids", width, np.int64)) if has_topk else None,
        topk_logprobs=torch.from_numpy(_padded(rows, "topk_logprobs", width, np.float32)) if has_topk else None,
        final_hidden=bf16_from_bits(_padded(rows, "final_hidden", width, np.uint16)) if "final_hidden" in rows[0] else None,
        n_tokens=int(sum(lengths)),
    )


def fields_for_teacher(reader: CacheReader, teacher: str) -> tuple[str, ...]:
    """The arrays to read for a teacher choice (topk or final-hidden)."""
    wanted = ("input_ids", "loss_mask", "aux_hidden") + (
        ("final_hidden",) if teacher == "final-hidden" else ("topk_ids", "topk_logprobs")
    )
    missing = [name for name in wanted if name not in reader.sample_fields]
    if missing:
        raise ValueError(f"the cache has no {missing} arrays, so it cannot train with the {teacher!r} teacher")
    return wanted


def load_batch(reader: CacheReader, samples: np.ndarray, max_length: int | None = None,
               names: tuple[str, ...] = FEATURE_ARRAYS) -> FeatureBatch:
    """Random-access batch: one ranged read per sample and array (no window needed)."""
    rows = [reader.read_sample(int(i), names) for i in samples]
    return collate([{k: v[:max_length] for k, v in row.items()} for row in rows])


@dataclass(frozen=True)
class Window:
    """A few parts read together, and the batches (global sample ids) drawn from them."""

    parts: tuple[int, ...]
    batches: tuple[np.ndarray, ...]


class BatchPlan:
    """Which samples form each batch, epoch after epoch, reproducibly from a seed.

    ``samples`` restricts the plan (e.g. to the training split); ``rank``/``world_size``
    give each data-parallel rank a disjoint, equally long share of every window.
    """

    def __init__(
        self,
        reader: CacheReader,
        batch_tokens: int,
        seed: int,
        *,
        max_length: int | None = None,
        samples: np.ndarray | None = None,
        window_parts: int = 4,
        rank: int = 0,
        world_size: int = 1,
        group: int | None = None,
    ):
        self.lengths = np.minimum(reader.lengths, max_length) if max_length else np.asarray(reader.lengths)
        self.batch_tokens = batch_tokens
        self.seed = seed
        self.window_parts = window_parts
        self.rank, self.world_size = rank, world_size
        # Batches are dealt in groups of `group` (world size x gradient accumulation), so every
        # rank sees equally many and an optimizer step always spans one whole group.
        self.group = group or world_size
        chosen = np.ones(len(reader), dtype=bool) if samples is None else np.isin(np.arange(len(reader)), samples)
        part_of = reader.sample_parts
        self._part_samples = [np.flatnonzero((part_of == p) & chosen) for p in range(len(reader.manifest.parts))]
        self._epochs: dict[int, list[Window]] = {}

    def epoch(self, epoch: int) -> list[Window]:
        cached = self._epochs.get(epoch)
        if cached is not None:
            return cached
        rng = np.random.default_rng([self.seed, epoch])
        order = [p for p in rng.permutation(len(self._part_samples)) if len(self._part_samples[p])]
        windows = []
        for start in range(0, len(order), self.window_parts):
            parts = tuple(int(p) for p in order[start : start + self.window_parts])
            pool = np.concatenate([self._part_samples[p] for p in parts])
            local = shuffled_bucket_batches(self.lengths[pool], self.batch_tokens, rng)
            batches = [pool[b] for b in local]
            usable = len(batches) - len(batches) % self.group
            mine = tuple(batches[self.rank : usable : self.world_size])
            if mine:
                windows.append(Window(parts, mine))
        self._epochs = {epoch: windows}  # keep only the current epoch's plan in memory
        return windows

    def batches_per_epoch(self) -> int:
        return sum(len(w.batches) for w in self.epoch(0))


def _read_window(reader: CacheReader, parts: tuple[int, ...], names: tuple[str, ...]) -> dict[int, dict[str, np.ndarray]]:
    return {part: reader.read_part(part, names) for part in parts}


def iterate_batches(
    reader: CacheReader, plan: BatchPlan, *, start_epoch: int = 0, start_batch: int = 0, max_length: int | None = None,
    names: tuple[str, ...] = FEATURE_ARRAYS,
) -> Iterator[tuple[int, int, FeatureBatch]]:
    """Yield ``(epoch, batch_index_in_epoch, batch)`` forever, starting at a given position.

    The next window's parts are read in a second thread while the current window's batches
    are served, so a window boundary does not stall the consumer.
    """

    def windows() -> Iterator[tuple[int, int, Window]]:
        epoch, skip = start_epoch, start_batch
        while True:
            index = 0
            for window in plan.epoch(epoch):
                if index + len(window.batches) > skip:
                    yield epoch, index, window
                index += len(window.batches)
            epoch, skip = epoch + 1, 0

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="talon-window") as pool:
        upcoming = windows()
        epoch, index, window = next(upcoming)
        pending = pool.submit(_read_window, reader, window.parts, names)
        while True:
            loaded = pending.result()
            next_epoch, next_index, next_window = next(upcoming)
            pending = pool.submit(_read_window, reader, next_window.parts, names)
            for offset, samples in enumerate(window.batches):
                if epoch == start_epoch and index + offset < start_batch:
                    continue  # consumed before the checkpoint this run resumes from
                rows = []
                for sample in samples:
                    loc = reader.locate(int(sample))
                    arrays = loaded[loc.part]
                    stop = loc.stop if max_length is None else min(loc.stop, loc.start + max_length)
                    rows.append({name: arrays[name][loc.start : stop] for name in names})
                yield epoch, index + offset, collate(rows)
            epoch, index, window = next_epoch, next_index, next_window


def iterate_random_access(reader: CacheReader, plan: BatchPlan, max_length: int | None = None,
                          names: tuple[str, ...] = FEATURE_ARRAYS) -> Iterator[FeatureBatch]:
    """One pass over epoch 0 of a plan with ranged per-sample reads: right for small subsets
    (a validation split) spread over many parts, where reading whole parts would waste I/O."""
    for window in plan.epoch(0):
        for samples in window.batches:
            yield load_batch(reader, samples, max_length, names)


def prefetch(items: Iterator, depth: int = 4) -> Iterator:
    """Run ``items`` in a background thread, keeping at most ``depth`` results ahead.

    Closing the returned generator (or dropping it) stops the producer, closes ``items`` (so its
    own threads shut down) and joins the thread: nothing keeps reading after the consumer ends.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
            else:
                buffer.put(done)
        except BaseException as err:  # re-raised in the consumer
            buffer.put(err)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name="talon-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                buffer.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.1)
