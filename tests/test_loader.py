"""`cache_loader`: the cache through a torch DataLoader with worker processes gives exactly the
batches that in-process random-access reads give, in plan order, for forked and spawned
workers, and a forked worker does not inherit the parent's (thread-less) read pool."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas.store import CacheReader
from stage_train.data import BATCH_TENSORS, BatchPlan, load_batch
from stage_train.loader import CacheBatchDataset, cache_loader


def _assert_same_batch(got, expected) -> None:
    assert got.n_tokens == expected.n_tokens
    for name in BATCH_TENSORS:
        a, b = getattr(got, name), getattr(expected, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_serve_the_plan_bit_exactly(tiny_cache, context):
    reader = CacheReader(tiny_cache, read_threads=2)
    reader.read_sample(0, ("aux_hidden",))  # the parent's read pool now exists (and has threads)
    plan = BatchPlan(reader, 200, seed=3)
    expected_ids = [b for window in plan.epoch(0) for b in window.batches]
    assert len(expected_ids) >= 3
    loader = cache_loader(reader, plan, num_workers=2, multiprocessing_context=context, timeout=120)
    got = list(loader)
    assert len(got) == len(expected_ids) == len(CacheBatchDataset(reader, plan))
    for batch, samples in zip(got, expected_ids):
        _assert_same_batch(batch, load_batch(reader, samples))
    assert sum(b.n_tokens for b in got) == int(reader.lengths.sum())  # every sample once


def test_raw_and_truncated_batches_in_process(tiny_cache):
    reader = CacheReader(tiny_cache)
    plan = BatchPlan(reader, 200, seed=3, rank=1, world_size=2)
    loader = cache_loader(reader, plan, num_workers=0, max_length=16, raw=True)
    batches = list(loader)
    mine = [b for window in plan.epoch(0) for b in window.batches]
    assert len(batches) == len(mine) > 0
    for batch, samples in zip(batches, mine):
        assert batch.input_ids.shape[1] <= 16
        _assert_same_batch(batch, load_batch(reader, samples, 16, raw=True))
    assert np.all(np.isin(np.concatenate(mine), np.arange(len(reader))))


def _submit_in_child(reader, results) -> None:
    from concurrent.futures import TimeoutError as FutureTimeout

    try:
        results.put(reader._executor().submit(sum, [1, 2, 3]).result(timeout=20))
    except FutureTimeout:
        results.put("hung")


def test_a_forked_child_gets_its_own_read_pool(tiny_cache):
    """A fork copies the parent's pool object but none of its threads: work sent to it would
    never run.  The reader notices the new process and makes a pool of its own."""
    import multiprocessing

    reader = CacheReader(tiny_cache, read_threads=2)
    parent_pool = reader._executor()
    assert parent_pool.submit(sum, [1, 2]).result() == 3  # the parent's pool has a live, idle thread
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_submit_in_child, args=(reader, results))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert results.get(timeout=5) == 6
    assert reader._executor() is parent_pool  # the parent keeps its own


class _ManyParts:
    """What BatchPlan reads of a reader: lengths, each sample's part, the parts."""

    def __init__(self, n_parts: int = 40, per_part: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.lengths = rng.integers(20, 120, n_parts * per_part)
        self.sample_parts = np.repeat(np.arange(n_parts), per_part)
        self.manifest = type("Manifest", (), {"parts": [{}] * n_parts})()

    def __len__(self) -> int:
        return len(self.lengths)


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_ranks_share_the_batches_evenly_and_completely(drop_remainder):
    """Validation (no dropping) deals every batch to exactly one rank, at most one more to any
    rank than to another, and every rank knows the busiest count; training (dropping the
    remainder) gives every rank the same count."""
    reader = _ManyParts()
    whole = BatchPlan(reader, 200, seed=1).batches()
    for world in (1, 2, 3, 4):
        plans = [BatchPlan(reader, 200, seed=1, rank=r, world_size=world, drop_remainder=drop_remainder)
                 for r in range(world)]
        mine = [p.batches() for p in plans]
        counts = [len(m) for m in mine]
        assert max(counts) - min(counts) <= (0 if drop_remainder else 1), (world, counts)
        assert {p.busiest_rank_batches() for p in plans} == {max(counts)}
        dealt = sorted(tuple(b) for m in mine for b in m)
        if drop_remainder:
            assert set(dealt) <= {tuple(b) for b in whole} and len(dealt) == world * counts[0]
        else:
            assert dealt == sorted(tuple(b) for b in whole)  # every batch once, none dropped
