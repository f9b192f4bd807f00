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


@dataclass
class FeatureBatch:
    """A padded batch as stored (nothing shifted yet)."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64
    loss_mask: torch.Tensor  # [B, T] bool
    aux_hidden_states: torch.Tensor  # [B, T, 3H] bfloat16
    topk_ids: torch.Tensor  # [B, T, k] int64
    topk_logprobs: torch.Tensor  # [B, T, k] float32
    n_tokens: int

    def to(self, device: torch.device) -> "FeatureBatch":
        moved = {
            name: getattr(self, name).to(device, non_blocking=True)
            for name in ("input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "topk_ids", "topk_logprobs")
        }
        return FeatureBatch(**moved, n_tokens=self.n_tokens)

    def pin_memory(self) -> "FeatureBatch":
        pinned = {
            name: getattr(self, name).pin_memory()
            for name in ("input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "topk_ids", "topk_logprobs")
        }
        return FeatureBatch(**pinned, n_tokens=self.n_tokens)


def bf16_from_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)


def collate(rows: list[dict[str, np.ndarray]]) -> FeatureBatch:
    """Right-pad per-sample rows into one batch."""
    lengths = [len(row["input_ids"]) for row in rows]
    width = max(lengths)
    aux_width = rows[0]["aux_hidden"].shape[1]
    k = rows[0]["topk_ids"].shape[1]
    batch = len(rows)
    input_ids = np.zeros((batch, width), np.int64)
    attention = np.zeros((batch, width), np.int64)
    loss_mask = np.zeros((batch, width), np.bool_)
    aux = np.zeros((batch, width, aux_width), np.uint16)
    top_ids = np.zeros((batch, width, k), np.int64)
    top_lp = np.zeros((batch, width, k), np.float32)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        input_ids[b, :n] = row["input_ids"]
        attention[b, :n] = 1
        loss_mask[b, :n] = row["loss_mask"]
        aux[b, :n] = row["aux_hidden"]
        top_ids[b, :n] = row["topk_ids"]
        top_lp[b, :n] = row["topk_logprobs"]
    return FeatureBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention),
        loss_mask=torch.from_numpy(loss_mask),
        aux_hidden_states=bf16_from_bits(aux),
        topk_ids=torch.from_numpy(top_ids),
        topk_logprobs=torch.from_numpy(top_lp),
        n_tokens=int(sum(lengths)),
    )


def load_batch(reader: CacheReader, samples: np.ndarray, max_length: int | None = None) -> FeatureBatch:
    """Random-access batch: one ranged read per sample and array (no window needed)."""
    rows = [reader.read_sample(int(i)) for i in samples]
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
        part_of = reader._part_of
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


def _read_window(reader: CacheReader, parts: tuple[int, ...]) -> dict[int, dict[str, np.ndarray]]:
    return {part: reader.read_part(part, FEATURE_ARRAYS) for part in parts}


def iterate_batches(
    reader: CacheReader, plan: BatchPlan, *, start_epoch: int = 0, start_batch: int = 0, max_length: int | None = None
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
        pending = pool.submit(_read_window, reader, window.parts)
        while True:
            loaded = pending.result()
            next_epoch, next_index, next_window = next(upcoming)
            pending = pool.submit(_read_window, reader, next_window.parts)
            for offset, samples in enumerate(window.batches):
                if epoch == start_epoch and index + offset < start_batch:
                    continue  # consumed before the checkpoint this run resumes from
                rows = []
                for sample in samples:
                    loc = reader.locate(int(sample))
                    arrays = loaded[loc.part]
                    stop = loc.stop if max_length is None else min(loc.stop, loc.start + max_length)
                    rows.append({name: arrays[name][loc.start : stop] for name in FEATURE_ARRAYS})
                yield epoch, index + offset, collate(rows)
            epoch, index, window = next_epoch, next_index, next_window


def iterate_random_access(reader: CacheReader, plan: BatchPlan, max_length: int | None = None) -> Iterator[FeatureBatch]:
    """One pass over epoch 0 of a plan with ranged per-sample reads: right for small subsets
    (a validation split) spread over many parts, where reading whole parts would waste I/O."""
    for window in plan.epoch(0):
        for samples in window.batches:
            yield load_batch(reader, samples, max_length)


def prefetch(items: Iterator, depth: int = 4) -> Iterator:
    """Run ``items`` in a background thread, keeping at most ``depth`` results ahead."""
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
                    return
            buffer.put(done)
        except BaseException as err:  # re-raised in the consumer
            buffer.put(err)

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
