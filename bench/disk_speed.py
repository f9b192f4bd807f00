"""The disk's write bandwidth, as one file and with the part writers' own pattern (issue #2).

``talon extract`` writes each part as one directory of a few shard files (the aux plane being
most of the bytes), flushes the directory with :func:`schemas.store.fsync_tree` before sealing
it, and keeps several parts in flight on parallel writer threads.  This script writes
incompressible bytes both ways, with no encoding and no model, so that the extraction's MB/s can
be set against what the disk itself takes in that pattern:

* ``one file``: one file of ``--gib`` GiB in 16 MiB writes, then one fsync (the reference
  extract_speed.py prints);
* ``parts, N threads``: ``--gib`` GiB cut into parts of ``--part-mb`` MB, each part a directory
  of files sized like a SmolLM2 part's arrays, written in writes of ``--write-mb`` MB (16 MiB by
  default; the store writes one compressed inner chunk at a time, ~0.75 MB for SmolLM2's aux
  plane) and flushed with ``fsync_tree``, by N threads at once, in each ``--write-modes`` (the
  store's ways of writing a file, :mod:`schemas.file_sink`: page cache, page cache with early
  writeback, ``O_DIRECT``).

    python bench/disk_speed.py --dir /tmp --gib 4 --threads 1,3,5 --write-mb 16,0.75 --write-modes buffered,direct
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table  # noqa: E402
from schemas.file_sink import DEFAULT_WRITE_MODE, WRITE_MODES, FileSink  # noqa: E402
from schemas.store import fsync_tree  # noqa: E402

WRITE_BYTES = 16 << 20
# Shares of a SmolLM2 bf16/top-64 part's stored bytes per array (aux, top-k log-probs, top-k ids,
# input ids, loss mask), rounded from a real store.
SMOLLM2_SPLIT = (0.86, 0.07, 0.06, 0.007, 0.003)


def write_file(path: Path, nbytes: int, block: bytes, write_bytes: int = WRITE_BYTES,
               write_mode: str = DEFAULT_WRITE_MODE) -> None:
    """``nbytes`` of ``block`` in writes of ``write_bytes``, as the store writes its shards
    (:class:`schemas.file_sink.FileSink` in ``write_mode``)."""
    view = memoryview(block)[: max(1, min(write_bytes, len(block)))]
    sink = FileSink(path, write_mode)
    try:
        left = nbytes
        while left > 0:
            sink.write([view[: min(left, len(view))]])
            left -= min(left, len(view))
    except BaseException:
        sink.discard()
        raise
    sink.close()


def one_file(directory: Path, total: int, block: bytes) -> float:
    path = directory / "one-file.bin"
    started = time.perf_counter()
    write_file(path, total, block)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    path.unlink()
    return total / seconds / 1e6


def parts(directory: Path, total: int, part_bytes: int, split: tuple[float, ...], threads: int, block: bytes,
          write_bytes: int = WRITE_BYTES, write_mode: str = DEFAULT_WRITE_MODE) -> float:
    root = directory / f"parts-{threads}"
    root.mkdir()
    count = max(1, total // part_bytes)

    def write_part(index: int) -> None:
        part = root / f"part-{index:06d}.zarr"
        for array, share in enumerate(split):
            folder = part / f"array{array}" / "c"
            folder.mkdir(parents=True)
            write_file(folder / "0", int(part_bytes * share), block, write_bytes, write_mode)
        fsync_tree(part)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write_part, range(count)))
    seconds = time.perf_counter() - started
    written = count * sum(int(part_bytes * share) for share in split)
    shutil.rmtree(root)
    return written / seconds / 1e6


def disk_bandwidths(directory: Path, gib: float, threads: int = 3, part_mb: float = 230.0) -> tuple[float, float]:
    """MB/s as one file and as parts on ``threads`` threads (what extract_speed.py compares with)."""
    scratch = Path(tempfile.mkdtemp(prefix="talon-disk-", dir=directory))
    block = os.urandom(WRITE_BYTES)
    total = int(gib * (1 << 30))
    try:
        return one_file(scratch, total, block), parts(scratch, total, int(part_mb * 1e6), SMOLLM2_SPLIT, threads, block)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: the temp directory)")
    parser.add_argument("--gib", type=float, default=2.0, help="GiB written per row")
    parser.add_argument("--part-mb", type=float, default=230.0, help="MB per part (a SmolLM2 part of 65,536 tokens: ~230)")
    parser.add_argument("--threads", default="1,3,5", help="comma-separated writer-thread counts")
    parser.add_argument("--write-mb", default="16.777216", help="comma-separated sizes of each write() in the parts rows, MB")
    parser.add_argument("--write-modes", default=DEFAULT_WRITE_MODE,
                        help=f"comma-separated ways the parts rows write their files: {', '.join(WRITE_MODES)} "
                             "(schemas/file_sink.py)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="talon-disk-", dir=args.dir))
    block = os.urandom(WRITE_BYTES)
    total = int(args.gib * (1 << 30))
    try:
        rows = [["one file, one fsync", 1, one_file(directory, total, block)]]
        for mode in args.write_modes.split(","):
            for write_mb in (float(w) for w in args.write_mb.split(",")):
                for threads in (int(t) for t in args.threads.split(",")):
                    rows.append([f"parts of {args.part_mb:g} MB in {write_mb:g} MB {mode} writes, fsync_tree each",
                                 threads, parts(directory, total, int(args.part_mb * 1e6), SMOLLM2_SPLIT, threads, block,
                                                int(write_mb * 1e6), mode)])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps([{"pattern": r[0], "threads": r[1], "mb_per_s": round(r[2], 1)} for r in rows]))
    else:
        print(f"Disk under {directory.parent}, {args.gib:g} GiB per row:\n")
        print(markdown_table(["pattern", "threads", "MB/s"], rows))


if __name__ == "__main__":
    main()
