"""The store's ways of writing a file (schemas/file_sink.py): every mode gives the same bytes."""

from __future__ import annotations

import numpy as np
import pytest

import schemas.file_sink
import schemas.store
from schemas.file_sink import ALIGNMENT, WRITE_MODES, FileSink, check_write_mode
from schemas.store import encode_pool, write_part_group
from stage_extract.writer import PartBuilder
from tests.test_store import _random_samples


def _pieces(rng, sizes):
    data = rng.integers(0, 256, sum(sizes), dtype=np.uint8).tobytes()
    views, start = [], 0
    for n in sizes:
        views.append(memoryview(data)[start : start + n])
        start += n
    return data, views


@pytest.mark.parametrize("mode", WRITE_MODES)
@pytest.mark.parametrize("sizes", [[1], [ALIGNMENT], [3 * ALIGNMENT - 1, 1], [5000, 7, 20000, 12289, 4095, 3], []])
def test_every_mode_writes_exactly_the_bytes_given(tmp_path, monkeypatch, mode, sizes):
    """The direct mode stages whole aligned blocks (here 2 blocks of staging, so writes cross
    it), pads the last block and cuts the file back to its length."""
    monkeypatch.setattr(schemas.file_sink, "STAGING_BYTES", 2 * ALIGNMENT)
    rng = np.random.default_rng(len(sizes))
    data, views = _pieces(rng, sizes)
    sink = FileSink(tmp_path / "f", mode)
    for start in range(0, len(views), 2):  # two views a call
        sink.write(views[start : start + 2])
    sink.close()
    assert (tmp_path / "f").read_bytes() == data
    assert sink.size == len(data)


def test_streamed_mode_starts_writeback_of_every_byte_written(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(schemas.file_sink, "_SYNC_FILE_RANGE", lambda fd, offset, nbytes, flags: calls.append((offset, nbytes, flags)))
    _, views = _pieces(np.random.default_rng(0), [100, 5000, 1, 70000])
    sink = FileSink(tmp_path / "f", "streamed")
    sink.write(views[:2])
    sink.write(views[2:])
    sink.close()
    assert calls == [(0, 5100, schemas.file_sink.SYNC_FILE_RANGE_WRITE), (5100, 70001, schemas.file_sink.SYNC_FILE_RANGE_WRITE)]


def test_a_discarded_direct_file_writes_nothing_more(tmp_path, monkeypatch):
    monkeypatch.setattr(schemas.file_sink, "STAGING_BYTES", 2 * ALIGNMENT)
    data, views = _pieces(np.random.default_rng(1), [3 * ALIGNMENT + 10])
    sink = FileSink(tmp_path / "f", "direct")
    sink.write(views)
    sink.discard()
    assert (tmp_path / "f").read_bytes() == data[: 2 * ALIGNMENT]  # the one full staging block


def test_unknown_write_mode_is_refused():
    with pytest.raises(ValueError, match="'async' is not one of buffered, streamed, direct"):
        check_write_mode("async")


@pytest.mark.parametrize("mode", ["streamed", "direct"])
def test_parts_written_in_any_mode_equal_buffered_parts(tmp_path, monkeypatch, mode):
    """Whole parts, their shards crossing several staging blocks and write batches: the same
    files and records as the page-cache writes."""
    monkeypatch.setattr(schemas.store, "INNER_CHUNK_BYTES", 64 * 24)
    monkeypatch.setattr(schemas.store, "WRITE_BATCH_BYTES", 3000)
    monkeypatch.setattr(schemas.file_sink, "STAGING_BYTES", ALIGNMENT)
    builder = PartBuilder(index=0, first_record=0)
    builder.samples = _random_samples(np.random.default_rng(3), 20, 70000)
    arrays = builder.arrays()
    out = {}
    for each in ("buffered", mode):
        root = tmp_path / each
        records = write_part_group(root, "part-000000", arrays, 70000, pool=encode_pool(2), write_mode=each)
        files = {p.relative_to(root): p.read_bytes() for p in sorted((root / "parts").rglob("*")) if p.is_file()}
        out[each] = files, records
    assert out[mode][0].keys() == out["buffered"][0].keys()
    for path, data in out[mode][0].items():
        assert data == out["buffered"][0][path], path
    assert out[mode][1] == out["buffered"][1]
    aux = [path for path in out[mode][0] if "aux_hidden" in path.parts and path.name != "zarr.json"]
    assert aux and len(out[mode][0][aux[0]]) > 2 * ALIGNMENT and len(out[mode][0][aux[0]]) % ALIGNMENT


@pytest.mark.parametrize("fails_at", ["a staged block", "the last block"])
def test_a_failed_direct_write_raises_its_own_error(tmp_path, monkeypatch, fails_at):
    """A full disk while writing stays the error the caller sees (the staging buffer, still
    referred to by the failed call's frames, is left to be freed with them)."""
    import errno
    import os

    monkeypatch.setattr(schemas.file_sink, "STAGING_BYTES", 2 * ALIGNMENT)
    _, views = _pieces(np.random.default_rng(2), [3 * ALIGNMENT + 10 if fails_at == "a staged block" else 100])
    sink = FileSink(tmp_path / "f", "direct")

    def full(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(OSError, match="No space left") as raised:
        sink.write(views)
        sink.close()
    assert raised.value.errno == errno.ENOSPC
    if fails_at == "a staged block":
        sink.discard()  # what _write_shard does after a failed write


def test_direct_mode_falls_back_where_o_direct_is_refused(tmp_path, monkeypatch):
    """tmpfs refuses O_DIRECT at open (EINVAL): the same aligned writes then go through the page cache."""
    import errno
    import os

    real_open = os.open

    def no_direct(path, flags, mode=0o777):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", no_direct)
    monkeypatch.setattr(schemas.file_sink, "STAGING_BYTES", 2 * ALIGNMENT)
    data, views = _pieces(np.random.default_rng(4), [5000, 9000, 3])
    sink = FileSink(tmp_path / "f", "direct")
    sink.write(views)
    sink.close()
    assert not sink.o_direct and (tmp_path / "f").read_bytes() == data


def test_writers_refuse_an_unknown_write_mode_before_writing(tmp_path):
    from stage_extract.writer import BackgroundPartWriter

    with pytest.raises(ValueError, match="'async' is not one of"):
        BackgroundPartWriter(tmp_path, 300, write_mode="async")
    with pytest.raises(ValueError, match="'async' is not one of"):
        write_part_group(tmp_path, "part-000000", {}, 300, write_mode="async")
    assert not (tmp_path / "parts").exists()
