"""Batches of cached features for the draft, read straight from the Zarr parts.

Reading is windowed: each epoch visits the parts in a seeded random order, a few parts at a
time; a window's parts are read whole (sequential, multi-threaded shard decoding, no per-sample
seeks), its samples are shuffled and grouped by length under a token budget, and the batches
are served from memory.  A background thread prepares the next batches while the trainer
steps, so I/O stays off the critical path.  The plan is a pure function of (seed, epoch), so a
resumed run can skip to any batch without reading anything before it.

``raw=True`` (what the trainer uses) leaves fp8 aux states undecoded: batches carry the uint8
e4m3fn codes and their per-token, per-layer scales (1 byte an element instead of 2, no CPU
decode), and :meth:`FeatureBatch.aux_states` decodes them on whatever device the batch was moved
to, bit-identically to the reader's CPU decode.  ``pin_memory=True`` collates straight into
page-locked host memory, so ``FeatureBatch.to(cuda)`` is an asynchronous copy.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from pipeline.batching import shuffled_bucket_batches
from schemas.store import CacheReader
from stage_extract.quant import dequantize_fp8

FEATURE_ARRAYS = ("input_ids", "loss_mask", "aux_hidden", "topk_ids", "topk_logprobs")


BATCH_TENSORS = ("input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "topk_ids", "topk_logprobs", "final_hidden",
                 "aux_codes", "aux_scale")


@dataclass
class FeatureBatch:
    """A padded batch as stored (nothing shifted yet).  The teacher is the cached top-k, the
    pre-norm final hidden state, or both, depending on what the cache holds and was asked for.

    The aux states are either decoded (``aux_hidden_states``, bf16) or, for an fp8 cache read
    raw, still quantised (``aux_codes`` + ``aux_scale``); :meth:`aux_states` gives the bf16
    tensor in both cases, decoding on the batch's device."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64
    loss_mask: torch.Tensor  # [B, T] bool
    aux_hidden_states: torch.Tensor | None  # [B, T, 3H] bfloat16 (None while raw fp8)
    topk_ids: torch.Tensor | None  # [B, T, k] int64
    topk_logprobs: torch.Tensor | None  # [B, T, k] float32
    n_tokens: int
    final_hidden: torch.Tensor | None = None  # [B, T, H] bfloat16
    aux_codes: torch.Tensor | None = None  # [B, T, 3H] uint8 e4m3fn bit patterns (raw fp8)
    aux_scale: torch.Tensor | None = None  # [B, T, 3] float32, one per token and aux layer (raw fp8)

    def _map(self, fn) -> "FeatureBatch":
        values = {name: (None if getattr(self, name) is None else fn(getattr(self, name))) for name in BATCH_TENSORS}
        return FeatureBatch(**values, n_tokens=self.n_tokens)

    @property
    def is_raw(self) -> bool:
        return self.aux_codes is not None

    def aux_states(self) -> torch.Tensor:
        """The bf16 aux states [B, T, 3H], on the batch's device: stored bf16 as is, raw fp8
        decoded here (call after :meth:`to`, so the copy moves 1-byte codes)."""
        if self.aux_codes is None:
            return self.aux_hidden_states
        return dequantize_fp8(self.aux_codes, self.aux_scale, torch.bfloat16)

    def to(self, device: torch.device) -> "FeatureBatch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "FeatureBatch":
        return self._map(lambda t: t.pin_memory())


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.bool_): torch.bool, np.dtype(np.float32): torch.float32,
                 np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.int16}  # uint16: bf16 bits, viewed below


def _padded(rows: list[dict[str, np.ndarray]], name: str, width: int, dtype, pin_memory: bool = False) -> torch.Tensor:
    """Right-pad one array of every row into a [B, width, ...] tensor of ``dtype`` (zeros after
    each row), allocated page-locked when ``pin_memory``; uint16 comes back as int16 bits."""
    first = rows[0][name]
    shape = (len(rows), width, *first.shape[1:])
    dtype = np.dtype(dtype)
    tensor = torch.zeros(shape, dtype=_TORCH_DTYPES[dtype], pin_memory=pin_memory)
    out = tensor.numpy().view(dtype)  # shares the tensor's (possibly pinned) memory
    for b, row in enumerate(rows):
        out[b, : len(row[name])] = row[name]
    return tensor


def _padded_bf16(rows, name: str, width: int, pin_memory: bool) -> torch.Tensor:
    return _padded(rows, name, width, np.uint16, pin_memory).view(torch.bfloat16)


def collate(rows: list[dict[str, np.ndarray]], *, pin_memory: bool = False) -> FeatureBatch:
    """Right-pad per-sample rows into one batch (in page-locked memory when ``pin_memory``).

    Rows holding ``aux_scale`` (an fp8 cache read raw) keep their uint8 codes undecoded: the
    batch carries ``aux_codes`` + ``aux_scale`` and :meth:`FeatureBatch.aux_states` decodes them.
    Padding is zero codes with zero scales, which decode to the +0.0 a decoded batch pads with."""
    lengths = [len(row["input_ids"]) for row in rows]
    width = max(lengths)
    first = rows[0]
    attention = torch.zeros((len(rows), width), dtype=torch.int64, pin_memory=pin_memory)
    for b, n in enumerate(lengths):
        attention[b, :n] = 1
    has_topk = "topk_ids" in first
    raw_fp8 = "aux_scale" in first
    if raw_fp8 and first["aux_hidden"].dtype != np.uint8:
        raise ValueError(f"rows carry aux_scale but {first['aux_hidden'].dtype} aux states: expected raw uint8 fp8 codes")
    pad = partial(_padded, rows, width=width, pin_memory=pin_memory)
    return FeatureBatch(
        input_ids=pad("input_ids", dtype=np.int64),
        attention_mask=attention,
        loss_mask=pad("loss_mask", dtype=np.bool_),
        aux_hidden_states=None if raw_fp8 else _padded_bf16(rows, "aux_hidden", width, pin_memory),
        aux_codes=pad("aux_hidden", dtype=np.uint8) if raw_fp8 else None,
        aux_scale=pad("aux_scale", dtype=np.float32) if raw_fp8 else None,
        topk_ids=pad("topk_ids", dtype=np.int64) if has_topk else None,
        topk_logprobs=pad("topk_logprobs", dtype=np.float32) if has_topk else None,
        final_hidden=_padded_bf16(rows, "final_hidden", width, pin_memory) if "final_hidden" in first else None,
        n_tokens=int(sum(lengths)),
    )


def row_fields(reader: CacheReader, names: tuple[str, ...], raw: bool) -> tuple[str, ...]:
    """The per-sample arrays a batch is built from: ``names``, plus ``aux_scale`` when the aux
    states of an fp8 cache are read raw (the codes are useless without their scales)."""
    if raw and reader.feature_dtype == "fp8" and "aux_hidden" in names and "aux_scale" not in names:
        return tuple(names) + ("aux_scale",)
    return tuple(names)


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
               names: tuple[str, ...] = FEATURE_ARRAYS, *, raw: bool = False, pin_memory: bool = False) -> FeatureBatch:
    """Random-access batch: one ranged read per sample and array (no window needed).  ``raw``
    keeps fp8 aux states as codes + scales (see :meth:`FeatureBatch.aux_states`)."""
    fields = row_fields(reader, names, raw)
    rows = [reader.read_sample(int(i), fields, raw=raw) for i in samples]
    return collate([{k: v[:max_length] for k, v in row.items()} for row in rows], pin_memory=pin_memory)


@dataclass(frozen=True)
class Window:
    """A few parts read together, and the batches (global sample ids) drawn from them."""

    parts: tuple[int, ...]
    batches: tuple[np.ndarray, ...]


class BatchPlan:
    """Which samples form each batch, epoch after epoch, reproducibly from a seed.

    ``samples`` restricts the plan (e.g. to the training split); ``rank``/``world_size``
    give each data-parallel rank a disjoint, equally long share of every window.  With
    ``drop_remainder=False`` (validation) no batch is dropped: ranks then differ by at most one
    batch per window, and :meth:`busiest_rank_batches` says how many the busiest one holds.
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
        drop_remainder: bool = True,
    ):
        self.lengths = np.minimum(reader.lengths, max_length) if max_length else np.asarray(reader.lengths)
        self.batch_tokens = batch_tokens
        self.seed = seed
        self.window_parts = window_parts
        self.rank, self.world_size = rank, world_size
        # Batches are dealt in groups of `group` (world size x gradient accumulation), so every
        # rank sees equally many and an optimizer step always spans one whole group.
        self.group = group or world_size
        self.drop_remainder = drop_remainder
        chosen = np.ones(len(reader), dtype=bool) if samples is None else np.isin(np.arange(len(reader)), samples)
        part_of = reader.sample_parts
        self._part_samples = [np.flatnonzero((part_of == p) & chosen) for p in range(len(reader.manifest.parts))]
        self._epochs: dict[int, list[Window]] = {}
        self._busiest: dict[int, int] = {}

    def epoch(self, epoch: int) -> list[Window]:
        cached = self._epochs.get(epoch)
        if cached is not None:
            return cached
        rng = np.random.default_rng([self.seed, epoch])
        order = [p for p in rng.permutation(len(self._part_samples)) if len(self._part_samples[p])]
        windows = []
        dealt = 0  # batches dealt so far this epoch: the next one goes to rank dealt % world_size
        for start in range(0, len(order), self.window_parts):
            parts = tuple(int(p) for p in order[start : start + self.window_parts])
            pool = np.concatenate([self._part_samples[p] for p in parts])
            local = shuffled_bucket_batches(self.lengths[pool], self.batch_tokens, rng)
            batches = [pool[b] for b in local]
            usable = len(batches) - len(batches) % self.group if self.drop_remainder else len(batches)
            # Dealing continues across windows, so leftovers do not pile up on the lowest ranks.
            # (When dropping, `usable` is a multiple of the world size and each rank starts at itself.)
            first = (self.rank - dealt) % self.world_size
            mine = tuple(batches[first:usable:self.world_size])
            if mine:
                windows.append(Window(parts, mine))
            dealt += usable
        self._busiest = {epoch: -(-dealt // self.world_size)}
        self._epochs = {epoch: windows}  # keep only the current epoch's plan in memory
        return windows

    def busiest_rank_batches(self, epoch: int = 0) -> int:
        """Batches of the rank with the most in this epoch (equal to everyone's when dropping)."""
        self.epoch(epoch)  # computes (or finds) the epoch's plan and its busiest count together
        return self._busiest[epoch]

    def batches(self, epoch: int = 0) -> list[np.ndarray]:
        """This rank's batches of an epoch, in order (sample ids of each)."""
        return [b for window in self.epoch(epoch) for b in window.batches]

    def any_sample(self) -> int:
        """One sample of the plan (padding batches for ranks with fewer batches)."""
        return int(next(s for s in self._part_samples if len(s))[0])

    def batches_per_epoch(self) -> int:
        return sum(len(w.batches) for w in self.epoch(0))


def _read_window(reader: CacheReader, parts: tuple[int, ...], names: tuple[str, ...],
                 raw: bool = False) -> dict[int, dict[str, np.ndarray]]:
    return {part: reader.read_part(part, names, raw=raw) for part in parts}


def iterate_batches(
    reader: CacheReader, plan: BatchPlan, *, start_epoch: int = 0, start_batch: int = 0, max_length: int | None = None,
    names: tuple[str, ...] = FEATURE_ARRAYS, raw: bool = False, pin_memory: bool = False,
) -> Iterator[tuple[int, int, FeatureBatch]]:
    """Yield ``(epoch, batch_index_in_epoch, batch)`` forever, starting at a given position.

    The next window's parts are read in a second thread while the current window's batches
    are served, so a window boundary does not stall the consumer.  ``raw`` keeps fp8 aux states
    as codes + scales (decode with :meth:`FeatureBatch.aux_states` after moving the batch).
    """
    names = row_fields(reader, names, raw)

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
        pending = pool.submit(_read_window, reader, window.parts, names, raw)
        while True:
            loaded = pending.result()
            next_epoch, next_index, next_window = next(upcoming)
            pending = pool.submit(_read_window, reader, next_window.parts, names, raw)
            for offset, samples in enumerate(window.batches):
                if epoch == start_epoch and index + offset < start_batch:
                    continue  # consumed before the checkpoint this run resumes from
                rows = []
                for sample in samples:
                    loc = reader.locate(int(sample))
                    arrays = loaded[loc.part]
                    stop = loc.stop if max_length is None else min(loc.stop, loc.start + max_length)
                    rows.append({name: arrays[name][loc.start : stop] for name in names})
                yield epoch, index + offset, collate(rows, pin_memory=pin_memory)
            epoch, index, window = next_epoch, next_index, next_window


def iterate_random_access(reader: CacheReader, plan: BatchPlan, max_length: int | None = None,
                          names: tuple[str, ...] = FEATURE_ARRAYS, *, raw: bool = False,
                          pin_memory: bool = False) -> Iterator[FeatureBatch]:
    """One pass over epoch 0 of a plan with ranged per-sample reads: right for small subsets
    (a validation split) spread over many parts, where reading whole parts would waste I/O."""
    for samples in plan.batches(0):
        yield load_batch(reader, samples, max_length, names, raw=raw, pin_memory=pin_memory)
