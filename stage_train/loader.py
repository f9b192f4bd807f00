"""The cache as a ``torch.utils.data`` dataset, for training loops that bring their own loader.

``talon train`` reads whole part windows in a background thread (:mod:`stage_train.data`).
Other loops (an HF or Lightning trainer, a notebook) usually want a ``DataLoader`` with worker
processes instead; :func:`cache_loader` gives one over the same :class:`BatchPlan`.  Item ``i``
is the plan's ``i``-th batch for this rank, read with ranged per-sample reads and collated in
the worker (``load_batch``), so the main process only receives finished batches; the
DataLoader's ``prefetch_factor`` bounds how many wait per worker, and ``pin_memory`` pins them.
The reader pickles for spawned workers and makes a fresh read pool in forked ones.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import DataLoader, Dataset

from schemas.store import CacheReader
from stage_train.data import FEATURE_ARRAYS, BatchPlan, FeatureBatch, load_batch

__all__ = ["CacheBatchDataset", "cache_loader"]


class CacheBatchDataset(Dataset):
    """The batches of one epoch of a plan (this rank's share), one item per batch."""

    def __init__(self, reader: CacheReader, plan: BatchPlan, *, epoch: int = 0, max_length: int | None = None,
                 names: tuple[str, ...] = FEATURE_ARRAYS, raw: bool = False):
        self.reader = reader
        self.batches: list[np.ndarray] = plan.batches(epoch)
        self.max_length = max_length
        self.names = tuple(names)
        self.raw = raw

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> FeatureBatch:
        return load_batch(self.reader, self.batches[index], self.max_length, self.names, raw=self.raw)


def cache_loader(reader: CacheReader, plan: BatchPlan, *, epoch: int = 0, max_length: int | None = None,
                 names: tuple[str, ...] = FEATURE_ARRAYS, raw: bool = False, num_workers: int = 2,
                 prefetch_factor: int = 2, pin_memory: bool = False, multiprocessing_context=None,
                 timeout: float = 0) -> DataLoader:
    """A DataLoader yielding :class:`FeatureBatch` es of ``plan``'s epoch in plan order.

    Batches are formed by the plan (token budget, length buckets), so the loader does no
    batching or collation of its own (``batch_size=None``)."""
    dataset = CacheBatchDataset(reader, plan, epoch=epoch, max_length=max_length, names=names, raw=raw)
    workers = ({"prefetch_factor": prefetch_factor, "multiprocessing_context": multiprocessing_context, "timeout": timeout}
               if num_workers else {})
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      **workers)
