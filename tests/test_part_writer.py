"""BackgroundPartWriter: parts written on worker threads, flushed on sync threads, sealed in order."""

from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest
import zarr

import stage_extract.writer as writer_module
from schemas.manifest import group_path, read_seal, seal_path
from stage_extract.writer import BackgroundPartWriter, CacheWriteError, PartBuilder, PlaneBuffers, SampleFeatures

VOCAB = 300


def _builder(index: int, rng) -> PartBuilder:
    builder = PartBuilder(index=index, first_record=3 * index)
    for record in range(3 * index, 3 * index + 3):
        length = int(rng.integers(2, 20))
        builder.samples.append(SampleFeatures(
            record_index=record,
            input_ids=rng.integers(0, VOCAB, length),
            loss_mask=np.ones(length, np.uint8),
            aux_hidden=rng.integers(0, 1 << 16, (length, 12)).astype(np.uint16),
            topk_ids=rng.integers(0, VOCAB, (length, 3)),
            topk_logprobs=-rng.random((length, 3), dtype=np.float32),
        ))
    builder.records_consumed, builder.last_record = 3, 3 * index + 2
    return builder


def _close_within(writer: BackgroundPartWriter, seconds: float = 30.0) -> BaseException | None:
    """close() on a thread, so that a deadlock fails the test instead of hanging it."""
    outcome: list[BaseException | None] = []

    def close() -> None:
        try:
            writer.close()
            outcome.append(None)
        except BaseException as err:  # handed to the test
            outcome.append(err)

    thread = threading.Thread(target=close, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"close() did not return within {seconds} s"
    return outcome[0]


def test_seals_follow_part_order_and_each_flush(tmp_path, monkeypatch):
    """Part 0 is written and flushed slowest while the other threads race ahead: every seal
    still comes after its own part's flush and after every earlier seal, and the bound on
    written-but-unsealed parts (1 here) lets the due part through instead of deadlocking."""
    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    real_write, real_fsync, real_seal = writer_module.write_part_group, writer_module.fsync_tree, writer_module.write_seal

    def index_of(name) -> int:
        return int(str(name).rsplit("part-", 1)[1][:6])

    def slow_write(worker_dir, name, *args, **kwargs):
        if index_of(name) == 0:
            time.sleep(0.3)
        return real_write(worker_dir, name, *args, **kwargs)

    def slow_fsync(path):  # called once a written part has been let through the bound
        with lock:
            events.append(("admitted", index_of(path)))
        if index_of(path) == 0:
            time.sleep(0.3)
        real_fsync(path)
        with lock:
            events.append(("flushed", index_of(path)))

    def recorded_seal(cache_dir, seal):
        real_seal(cache_dir, seal)
        with lock:
            events.append(("sealed", seal.index))

    monkeypatch.setattr(writer_module, "write_part_group", slow_write)
    monkeypatch.setattr(writer_module, "fsync_tree", slow_fsync)
    monkeypatch.setattr(writer_module, "write_seal", recorded_seal)
    rng = np.random.default_rng(3)
    writer = BackgroundPartWriter(tmp_path, VOCAB, threads=3, sync_threads=3, max_unsealed=1)
    for index in range(6):
        writer.submit(_builder(index, rng), {"records_read": 3 * index + 3})
    assert _close_within(writer) is None
    assert [seal.index for seal in writer.sealed] == list(range(6))
    sealed = [index for kind, index in events if kind == "sealed"]
    assert sealed == list(range(6))
    for index in range(6):
        assert events.index(("flushed", index)) < events.index(("sealed", index))
    # Written but unsealed: at most max_unsealed, plus the part due next, which always passes.
    # Without the bound, parts 1-5 would all be written and flushing while part 0 is slow.
    waiting = peak = 0
    for kind, _ in events:
        waiting += {"admitted": 1, "sealed": -1}.get(kind, 0)
        peak = max(peak, waiting)
    assert peak <= 2
    assert all(seal_path(tmp_path, f"part-{i:06d}").is_file() for i in range(6))


def test_a_failed_flush_seals_the_parts_before_it_and_none_after(tmp_path, monkeypatch):
    """Part 2's flush fails while part 1's is still running: part 1 is sealed when its flush
    ends (it is whole and comes first), parts 2 to 4 never are, and the error names part 2."""
    real_fsync = writer_module.fsync_tree

    def failing_fsync(path):
        if "part-000001" in str(path):
            time.sleep(0.3)
        if "part-000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(path)

    monkeypatch.setattr(writer_module, "fsync_tree", failing_fsync)
    rng = np.random.default_rng(4)
    writer = BackgroundPartWriter(tmp_path, VOCAB, threads=2, sync_threads=2)
    for index in range(5):
        try:
            writer.submit(_builder(index, rng), {"records_read": 3 * index + 3})
        except CacheWriteError:
            break
    err = _close_within(writer)
    assert isinstance(err, CacheWriteError)
    assert "part-000002" in str(err) and "disk is full" in str(err)
    assert [seal_path(tmp_path, f"part-{i:06d}").is_file() for i in range(5)] == [True, True, False, False, False]
    assert [seal.index for seal in writer.sealed] == [0, 1]


@pytest.mark.parametrize("sync_threads", [1, 4])
def test_sealed_parts_hold_the_submitted_samples(tmp_path, sync_threads):
    rng = np.random.default_rng(5)
    builders = [_builder(index, rng) for index in range(4)]
    expected = [[s.aux_hidden.copy() for s in b.samples] for b in builders]
    writer = BackgroundPartWriter(tmp_path, VOCAB, threads=2, sync_threads=sync_threads)
    for builder in builders:
        writer.submit(builder, {})
    assert _close_within(writer) is None
    for index, samples in enumerate(expected):
        name = f"part-{index:06d}"
        seal = read_seal(seal_path(tmp_path, name))
        assert (seal.n_samples, seal.first_record) == (3, 3 * index)
        stored = np.asarray(zarr.open_array(str(group_path(tmp_path, name) / "aux_hidden"), mode="r")[...])
        assert np.array_equal(stored.view(np.uint16), np.concatenate(samples))


def test_a_failed_seal_names_its_part_and_stops_there(tmp_path, monkeypatch):
    real_seal = writer_module.write_seal

    def failing_seal(cache_dir, seal):
        if seal.index == 1:
            raise OSError(errno.EACCES, "Permission denied")
        real_seal(cache_dir, seal)

    monkeypatch.setattr(writer_module, "write_seal", failing_seal)
    rng = np.random.default_rng(6)
    writer = BackgroundPartWriter(tmp_path, VOCAB, threads=2, sync_threads=2)
    for index in range(4):
        try:
            writer.submit(_builder(index, rng), {})
        except CacheWriteError:
            break
    err = _close_within(writer)
    assert isinstance(err, CacheWriteError) and "part-000001" in str(err) and "not writable" in str(err)
    assert [seal.index for seal in writer.sealed] == [0]
    assert [seal_path(tmp_path, f"part-{i:06d}").is_file() for i in range(4)] == [True, False, False, False]


def test_the_lowest_failed_part_is_the_one_reported(tmp_path, monkeypatch):
    """Part 3 fails first, part 1 later: the error names part 1, and only part 0 is sealed."""
    real_write = writer_module.write_part_group

    def failing_write(worker_dir, name, *args, **kwargs):
        if name == "part-000001":
            time.sleep(0.3)
            raise OSError(errno.ENOSPC, "No space left on device")
        if name == "part-000003":
            raise ValueError("part 3 is broken")
        return real_write(worker_dir, name, *args, **kwargs)

    monkeypatch.setattr(writer_module, "write_part_group", failing_write)
    rng = np.random.default_rng(7)
    writer = BackgroundPartWriter(tmp_path, VOCAB, threads=3, sync_threads=2)
    for index in range(4):
        writer.submit(_builder(index, rng), {})
    err = _close_within(writer)
    assert isinstance(err, CacheWriteError) and "part-000001" in str(err) and "disk is full" in str(err)
    assert [seal.index for seal in writer.sealed] == [0]


def test_a_resumed_writer_seals_from_its_first_part_on(tmp_path):
    """After a resume the first part is not part 0: seals still start there and stay in order."""
    rng = np.random.default_rng(8)
    writer = BackgroundPartWriter(tmp_path, VOCAB, threads=2, sync_threads=2, max_unsealed=1)
    for index in range(3, 7):
        writer.submit(_builder(index, rng), {})
    assert _close_within(writer) is None
    assert [seal.index for seal in writer.sealed] == [3, 4, 5, 6]
    assert [seal_path(tmp_path, f"part-{i:06d}").is_file() for i in range(7)] == [False] * 3 + [True] * 4


def test_plane_buffers_are_reused_per_plane_and_grow():
    buffers = PlaneBuffers(keep=1)
    first = buffers.take("aux_hidden", 100, (12,), np.uint16)
    assert first.shape == (112, 12) and first.dtype == np.uint16  # 1/8 spare rows
    buffers.give_back([("aux_hidden", first)])
    assert buffers.take("aux_hidden", 110, (12,), np.uint16) is first  # fits in the spare rows
    assert buffers.take("aux_hidden", 10, (12,), np.uint16) is not first  # taken: never shared
    buffers.give_back([("aux_hidden", first)])
    assert buffers.take("topk_ids", 10, (12,), np.uint16) is not first  # another plane
    larger = buffers.take("aux_hidden", 200, (12,), np.uint16)
    assert larger is not first and len(larger) == 225
    buffers.give_back([("aux_hidden", larger)])  # keep=1: the larger one stays
    assert buffers.take("aux_hidden", 50, (12,), np.uint16) is larger


def test_parts_written_through_reused_buffers_keep_their_own_rows(tmp_path):
    """One writer thread, parts long, short, long: each part's rows only, none left from before."""
    rng = np.random.default_rng(9)
    builders = [_builder(index, rng) for index in range(3)]
    builders[1].samples = builders[1].samples[:1]
    builders[1].samples[0].aux_hidden = builders[1].samples[0].aux_hidden[:1]
    builders[1].samples[0].input_ids = builders[1].samples[0].input_ids[:1]
    builders[1].samples[0].loss_mask = builders[1].samples[0].loss_mask[:1]
    builders[1].samples[0].topk_ids = builders[1].samples[0].topk_ids[:1]
    builders[1].samples[0].topk_logprobs = builders[1].samples[0].topk_logprobs[:1]
    expected = [np.concatenate([s.aux_hidden for s in b.samples]) for b in builders]
    writer = BackgroundPartWriter(tmp_path, VOCAB, threads=1, sync_threads=1)
    taken = []
    original_take = writer._buffers.take
    writer._buffers.take = lambda *args: taken.append(original_take(*args)) or taken[-1]
    for builder in builders:
        writer.submit(builder, {})
    assert _close_within(writer) is None
    for index, want in enumerate(expected):
        stored = zarr.open_array(str(group_path(tmp_path, f"part-{index:06d}") / "aux_hidden"), mode="r")[...]
        assert np.array_equal(np.asarray(stored).view(np.uint16), want)
    aux = [buffer for buffer in taken if buffer.shape[1:] == (12,)]
    assert len(aux) == 3 and aux[1] is aux[0]  # the short part reused the first part's buffer
