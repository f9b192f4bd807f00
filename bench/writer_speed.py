"""Part-writer throughput on the CPU, without a model (issue #2: the writer must keep up with an
8B-shaped target, ~28.8k tok/s x ~19.5 KB/token = ~0.55 GB/s stored on an H200 host).

Synthetic 8B-shaped samples (3 x 4096 bf16 aux states around realistic magnitudes, top-64 ids
and log-probs, 300-2,000 tokens each) are cut into length-sorted batches as ``launch_part``
queues them, held as host tensors (what the pinned device-to-host copies hand over), and fed to
the real writer path.  Rows:

* ``hand-off``: ``BackgroundPartWriter`` + ``PartBuilder`` exactly as ``talon extract`` on a GPU
  host with these cores sets them up (collect, concatenate, checksums, compression, Zarr group,
  seals in order), timed from the first submit to ``close``; then the same while a simulated
  main thread keeps the GIL busy (``--busy``), as an eager HF forward launching kernels does;
* ``PartBuilder collect + arrays``: the hand-off's own work (per-sample checks, concatenation);
* ``write_part_group alone``: the store call on the collected arrays, one encoding thread;
* ``write_part_group (codec)``: one part with each aux codec candidate, one encoding thread,
  with the aux compression ratio and single-thread decode speed.  Against a store without the
  codec choice the row is the codec alone on the same inner chunks (``aux encode only``).

``raw MB/s`` counts feature bytes in (24.5 KiB/token for bf16/top-64 at hidden 4096);
``raw MB per CPU-s`` divides by the process CPU time instead of the wall time (less sensitive to
other load on a shared machine); ``bytes/token`` is what the store keeps.  Defaults take about a
minute on a 2-core CPU; scale with ``--tokens``, ``--part-tokens``, ``--threads``,
``--encode-threads``.

    python bench/writer_speed.py
    python bench/writer_speed.py --tokens 262144 --part-tokens 65536 --batch-tokens 32768   # GPU-host sized
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import markdown_table  # noqa: E402
from bench.thread_probes import thread_cpu  # noqa: E402
from pipeline.batching import length_sorted_batches  # noqa: E402
from schemas.layout import row_widths  # noqa: E402
from schemas.store import _inner_rows, write_part_group  # noqa: E402
from stage_extract.transfer import HostBatch  # noqa: E402
from stage_extract.writer import BackgroundPartWriter, PartBuilder, PendingSample  # noqa: E402

# Candidate aux codecs, as numcodecs configs (what the store's Zarr codecs run underneath).
CODECS = {
    "blosc-zstd": {"id": "blosc", "cname": "zstd", "clevel": 1, "shuffle": 1, "blocksize": 0, "typesize": 2},
    "zstd": {"id": "zstd", "level": 1},
    "lz4": {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 2, "blocksize": 0, "typesize": 2},
    "lz4-byteshuffle": {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0, "typesize": 2},
    "none": None,
}


def synthetic_parts(args, rng: np.random.Generator) -> list[dict]:
    """Parts as run.py builds them: pending samples plus length-sorted host batches."""
    h, k = args.hidden, args.top_k
    pool_rows = max(1024, min(args.pool_rows, args.tokens))
    # Per-channel scales spread over ~2 decades, three layer magnitudes, a few massive channels:
    # exponent statistics like real Llama residual streams (bf16 bits compress ~1.25x).
    scale = np.exp(rng.normal(0.0, 0.7, 3 * h)).astype(np.float32)
    scale *= np.repeat(np.array([0.3, 1.5, 4.0], np.float32), h)
    scale[rng.choice(3 * h, 6, replace=False)] *= 100.0
    pool = torch.empty((pool_rows, 3 * h), dtype=torch.bfloat16)
    for start in range(0, pool_rows, 512):
        block = rng.standard_normal((min(512, pool_rows - start), 3 * h), dtype=np.float32) * scale
        pool[start : start + len(block)] = torch.from_numpy(block)
    parts, record, made = [], 0, 0
    while made < args.tokens:
        lengths = []
        while sum(lengths) < args.part_tokens and made + sum(lengths) < args.tokens:
            lengths.append(int(rng.integers(args.min_length, args.max_length + 1)))
        pending = []
        for n in lengths:
            mask = (rng.random(n) < 0.6).astype(np.uint8)
            pending.append(PendingSample(record, rng.integers(0, args.vocab, n, dtype=np.int64), mask))
            record += 1
        batches = []
        for batch in length_sorted_batches(np.array(lengths), args.batch_tokens):
            rows = []
            for s in batch:
                start = int(rng.integers(0, pool_rows - lengths[s] + 1)) if pool_rows > lengths[s] else 0
                rows.append(torch.arange(start, start + lengths[s]) % pool_rows)
            index = torch.cat(rows)
            n = len(index)
            steps = torch.from_numpy(rng.exponential(0.15, (n, k)).astype(np.float32))
            logprobs = -(torch.from_numpy(rng.exponential(1.0, (n, 1)).astype(np.float32)) + steps.cumsum(1))
            tensors = {
                "aux_hidden": pool.index_select(0, index),
                "topk_ids": torch.from_numpy(rng.integers(0, args.vocab, (n, k), dtype=np.int32)),
                "topk_logprobs": logprobs,
                "finite": torch.ones(n, dtype=torch.bool),
            }
            batches.append(HostBatch(tensors, [lengths[s] for s in batch], [int(s) for s in batch]))
        parts.append({"pending": pending, "batches": batches, "tokens": sum(lengths), "first": pending[0].record_index})
        made += sum(lengths)
    return parts


def raw_bytes(parts: list[dict]) -> int:
    return sum(t.numel() * t.element_size() for p in parts for b in p["batches"] for name, t in b.tensors.items() if name != "finite") \
        + sum(p["tokens"] for p in parts) * (4 + 1)  # uint32 input ids + loss mask


def builder_for(part: dict, index: int, widths: dict[str, int]) -> PartBuilder:
    builder = PartBuilder(index=index, first_record=part["first"], widths=widths)
    builder.pending = list(part["pending"])
    builder.batches = list(part["batches"])
    builder.records_consumed = len(part["pending"])
    builder.last_record = part["pending"][-1].record_index
    return builder


class GilHog:
    """A thread that runs pure Python (holding the GIL except at forced switches) for ``busy``
    of every 10 ms, like the main thread of an eager HF forward launching kernels."""

    def __init__(self, busy: float = 1.0):
        self.busy = busy
        self.stop = threading.Event()
        self.cpu = 0.0
        self.thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        started = time.thread_time()
        while not self.stop.is_set():
            until = time.perf_counter() + 0.01 * self.busy
            while time.perf_counter() < until:
                sum(i * i for i in range(200))
            if self.busy < 1:
                time.sleep(0.01 * (1 - self.busy))
        self.cpu = time.thread_time() - started

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _supports(fn, option: str) -> bool:
    return option in inspect.signature(fn).parameters


def store_supports(option: str) -> bool:
    return _supports(write_part_group, option)


def time_handoff(parts, args, work: Path, widths, busy: float, compression: str | None) -> dict:
    """The writer path from the first submit to close: wall and CPU seconds, stored bytes."""
    out = work / "handoff"
    shutil.rmtree(out, ignore_errors=True)
    extra = {}
    if compression and _supports(BackgroundPartWriter.__init__, "aux_compression"):
        extra["aux_compression"] = compression
    if args.encode_threads and _supports(BackgroundPartWriter.__init__, "encode_threads"):
        extra["encode_threads"] = args.encode_threads
    if args.sync_threads and _supports(BackgroundPartWriter.__init__, "sync_threads"):
        extra["sync_threads"] = args.sync_threads
    if args.max_unsealed and _supports(BackgroundPartWriter.__init__, "max_unsealed"):
        extra["max_unsealed"] = args.max_unsealed
    if args.write_mode and _supports(BackgroundPartWriter.__init__, "write_mode"):
        extra["write_mode"] = args.write_mode
    hog = GilHog(busy) if busy else None
    if hog:
        hog.__enter__()
    try:
        with thread_cpu() if args.thread_cpu else contextlib.nullcontext() as cpu_report:
            cpu, started = time.process_time(), time.perf_counter()
            writer = BackgroundPartWriter(out, args.vocab, "bf16", "topk", max_pending=args.max_pending, threads=args.threads,
                                          **extra)
            for index, part in enumerate(parts):
                writer.submit(builder_for(part, index, widths), {"records_read": 0})
            writer.close()
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        if cpu_report is not None:
            print(f"hand-off: {cpu_report.table()}", file=sys.stderr)
    finally:
        if hog:
            hog.__exit__()
    cpu -= hog.cpu if hog else 0.0
    stored = sum(a.stored_bytes for seal in writer.sealed for a in seal.arrays.values())
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "cpu": cpu, "stored": stored}


def row(label, threads, tokens, raw, seconds, cpu, stored, per_thread: int = 1, ratio="", decode=""):
    return [label, threads, round(tokens / seconds), raw / seconds / 1e6, raw / seconds / 1e6 / per_thread,
            raw / cpu / 1e6 if cpu else "", round(stored / tokens) if stored else "", ratio, decode]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768, help="tokens through the hand-off path")
    parser.add_argument("--part-tokens", type=int, default=16384, help="tokens per part (talon extract's default: 65536)")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per host batch (32768 on the GPU runs)")
    parser.add_argument("--threads", type=int, default=0, help="part-writer threads (0: what run.py uses on a GPU host with these cores)")
    parser.add_argument("--encode-threads", type=int, default=0, help="compression pool threads (0: run.py's GPU-host choice)")
    parser.add_argument("--sync-threads", type=int, default=0, help="threads flushing written parts (0: run.py's GPU-host choice)")
    parser.add_argument("--max-unsealed", type=int, default=0,
                        help="parts written but not yet flushed and sealed at most (0: the writer's default, threads + max pending)")
    parser.add_argument("--max-pending", type=int, default=2, help="parts queued for the writer threads at most (run.py: 2)")
    parser.add_argument("--codec-tokens", type=int, default=8192, help="tokens of features per codec measurement")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated codec candidates")
    parser.add_argument("--aux-compression", default=None, help="codec of the hand-off rows (default: the store's default for bf16)")
    parser.add_argument("--busy", type=float, default=1.0, help="GIL-busy share of the simulated main thread (0 skips that row)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--min-length", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=2000)
    parser.add_argument("--pool-rows", type=int, default=4096, help="distinct synthetic token rows (samples are slices of them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-mode", default=None, help="how shard files reach the disk: buffered, streamed or direct "
                        "(schemas/file_sink.py; default: the writer's)")
    parser.add_argument("--only-handoff", action="store_true", help="stop after the hand-off rows (e.g. under a profiler)")
    parser.add_argument("--thread-cpu", action="store_true",
                        help="print the cores each thread group kept busy during the hand-off, and the host's busy share")
    args = parser.parse_args()
    from stage_extract.run import writer_parallelism

    gpu_host = writer_parallelism(torch.device("cuda"))
    args.threads = args.threads or gpu_host["threads"]
    args.encode_threads = args.encode_threads or gpu_host.get("encode_threads", 0)
    args.sync_threads = args.sync_threads or gpu_host.get("sync_threads", 0)
    args.batch_tokens = max(args.batch_tokens, args.max_length)
    selectable = store_supports("aux_compression")
    default = None
    if selectable:
        from schemas.layout import DEFAULT_AUX_COMPRESSION, resolve_aux_compression

        default = resolve_aux_compression(args.aux_compression or DEFAULT_AUX_COMPRESSION, "bf16")

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    parts = synthetic_parts(args, rng)
    tokens = sum(p["tokens"] for p in parts)
    raw = raw_bytes(parts)
    print(f"synthetic data: {tokens:,} tokens in {len(parts)} parts, {raw / tokens / 1024:.2f} KiB/token raw "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    widths = row_widths(args.hidden, args.top_k, "bf16", "topk")
    work = Path(tempfile.mkdtemp(prefix="talon-writer-speed-"))
    threads = f"{args.threads}" + (f" + {args.encode_threads} enc" if args.encode_threads else "")
    header = ["path (aux codec)", "threads", "tok/s", "raw MB/s", "raw MB/s per thread", "raw MB per CPU-s",
              "bytes/token", "aux ratio", "aux decode MB/s"]
    rows = []

    def show(line):
        rows.append(line)
        print(" | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in line), file=sys.stderr)

    try:
        name = default or "blosc-zstd"
        for busy in [0.0] + ([args.busy] if args.busy else []):
            r = time_handoff(parts, args, work, widths, busy, default)
            label = f"hand-off ({name})" + (f", main thread {busy:.0%} GIL-busy" if busy else "")
            show(row(label, threads, tokens, raw, r["seconds"], r["cpu"], r["stored"]))
        if args.only_handoff:
            return

        # write_part_group alone on the collected arrays, one encoding thread (collect timed apart)
        one = {}
        if _supports(write_part_group, "pool"):
            from schemas.store import encode_pool

            one["pool"] = encode_pool(1)
        collect_s = collect_cpu = write_s = write_cpu = 0.0
        stored = 0
        first = None
        for index, part in enumerate(parts):
            builder = builder_for(part, index, widths)
            cpu, started = time.process_time(), time.perf_counter()
            builder.collect()
            arrays = builder.arrays()
            collect_s, collect_cpu = collect_s + time.perf_counter() - started, collect_cpu + time.process_time() - cpu
            cpu, started = time.process_time(), time.perf_counter()
            if default:
                one["aux_compression"] = default
            records = write_part_group(work / "alone", f"part-{index:06d}", arrays, args.vocab, **one)
            write_s, write_cpu = write_s + time.perf_counter() - started, write_cpu + time.process_time() - cpu
            stored += sum(r.stored_bytes for r in records.values())
            first = arrays if first is None else first
            del arrays, builder
        shutil.rmtree(work / "alone", ignore_errors=True)
        show(row("PartBuilder collect + arrays", 1, tokens, raw, collect_s, collect_cpu, 0))
        show(row(f"write_part_group alone ({name})", 1, tokens, raw, write_s, write_cpu, stored))

        # codec candidates for the aux plane, one thread
        from numcodecs import get_codec

        cut = max(1, int(np.searchsorted(first["sample_offsets"], args.codec_tokens, side="right")) - 1)
        n = int(first["sample_offsets"][cut])
        sub = {key: first[key][:n] for key in ("input_ids", "loss_mask", "aux_hidden", "topk_ids", "topk_logprobs")}
        sub["sample_offsets"], sub["record_index"] = first["sample_offsets"][: cut + 1], first["record_index"][:cut]
        sub_raw = sum(v.nbytes for key, v in sub.items() if key not in ("sample_offsets", "record_index"))
        aux = np.ascontiguousarray(sub["aux_hidden"])
        chunk_rows = _inner_rows(aux.shape[1] * aux.itemsize, aux.shape[0])
        chunks = [np.ascontiguousarray(aux[i : i + chunk_rows]).reshape(-1).view(np.uint8) for i in range(0, len(aux), chunk_rows)]
        for name in args.codecs.split(","):
            config = CODECS[name]
            codec = get_codec(dict(config)) if config else None

            def encode_all():  # off the main thread, where blosc would use its own threads
                return [codec.encode(c) if codec else c.tobytes() for c in chunks]

            def decode_all():
                for e in encoded:
                    codec.decode(e) if codec else np.frombuffer(e, dtype=np.uint8).copy()

            with ThreadPoolExecutor(1) as single:
                cpu, started = time.process_time(), time.perf_counter()
                encoded = single.submit(encode_all).result()
                enc_s, enc_cpu = time.perf_counter() - started, time.process_time() - cpu
                started = time.perf_counter()
                single.submit(decode_all).result()
                dec_s = time.perf_counter() - started
            aux_stored = sum(len(e) for e in encoded)
            if selectable and name in available_compressions():
                cpu, started = time.process_time(), time.perf_counter()
                records = write_part_group(work / "codec", "part-000000", sub, args.vocab, **{**one, "aux_compression": name})
                seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
                shutil.rmtree(work / "codec", ignore_errors=True)
                show(row(f"write_part_group ({name})", 1, n, sub_raw, seconds, cpu, sum(r.stored_bytes for r in records.values()),
                         ratio=round(aux.nbytes / aux_stored, 3), decode=aux.nbytes / dec_s / 1e6))
            else:
                show(row(f"aux encode only ({name})", 1, n, aux.nbytes, enc_s, enc_cpu, aux_stored,
                         ratio=round(aux.nbytes / aux_stored, 3), decode=aux.nbytes / dec_s / 1e6))
    finally:  # also after --only-handoff's early return
        shutil.rmtree(work, ignore_errors=True)
        print(f"\n### Part writer on {os.cpu_count()} CPU cores: {tokens:,} tokens, hidden {args.hidden}, top-{args.top_k}, "
              f"parts of {args.part_tokens:,} tokens, batches of {args.batch_tokens:,} tokens ({raw / tokens / 1024:.2f} KiB/token raw)\n")
        print(markdown_table(header, rows))


def available_compressions() -> tuple[str, ...]:
    try:
        from schemas.layout import AUX_COMPRESSIONS
    except ImportError:
        return ()
    return tuple(AUX_COMPRESSIONS)


if __name__ == "__main__":
    main()
