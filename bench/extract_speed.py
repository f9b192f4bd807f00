"""Extraction throughput with writing, against the forward alone, in the same process.

For each target, on the same synthetic chats and the batches the run forms (parts cut in record
order, each part's samples batched on their own: packed by default, ``--batching padded`` for
length-sorted right-padded batches):

* ``backbone``: the model's forward only (what any forward costs);
* ``features``: the backend's feature extraction (hooks, LM head + top-k, fp8 quantisation), no
  copy out;
* ``run``: the real ``talon extract`` path (``extract_with_model`` into a temp cache: tokenising,
  forwards, async device-to-host copies, background checksums/compression/writes, seals,
  manifest), timed end to end after the model is loaded;
* ``tokenise``: the chat-template tokenisation alone (CPU), which the run path also does.

The last column is the share of real tokens in those batches (1 when packed).  A second table
times ``features`` on padded batches of the same parts and budget beside the packed ones: what
packing gains.

Three ratios to ``features``: the whole ``run`` (start-up and the final drain of the last parts
included), the ``forward loop`` (until the last batch's copies are queued), and the
``sustained`` rate at which parts are sealed once the pipeline is full (what an hours-long
extraction runs at).  The disk's own write bandwidth (with fsync, as the parts are flushed
before their seals) is measured first, as one file and as parallel parts
(:mod:`bench.disk_speed`), to compare with the MB/s the run writes; ``--runs`` repeats the run.

Targets: (a) the real SmolLM2 and (b) a random-weight Llama-3.1-8B-shaped model (CUDA only,
or on CPU with ``--layers-override``).  Default sizes finish in about 5 minutes on one H100.

    python bench/extract_speed.py --device cuda
    python bench/extract_speed.py --device cpu --tokens 2048 --skip-8b
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.disk_speed import disk_bandwidths  # noqa: E402
from bench.common import (aux_layers_for, build_llama_8b, markdown_table, resolve, smollm2_tokenizer, sync,  # noqa: E402
                          synthetic_chats, use_tokenizer_start_method)
from bench.thread_probes import thread_cpu, thread_sampler  # noqa: E402


def tokenised(data: Path, tokenizer, max_length: int, limit: int | None):
    import numpy as np

    from stage_extract.chat import tokenize_conversation
    from stage_extract.records import iter_chat_records

    started = time.perf_counter()
    samples = []
    for record in iter_chat_records(str(data), limit=limit):
        tokens = tokenize_conversation(tokenizer, record.messages, max_length=max_length)
        if tokens is not None:
            samples.append(tokens.input_ids.astype(np.int64))
    return samples, time.perf_counter() - started


def run_batches(lengths, batch_tokens: int, part_tokens: int, batching: str = "packed") -> list:
    """The batches ``talon extract`` forms: samples cut into parts of ``part_tokens`` in record
    order, each part's samples batched on their own (indices into ``lengths``)."""
    import numpy as np

    from stage_extract.backends import plan_batches

    batches, start = [], 0
    while start < len(lengths):
        stop, tokens = start, 0
        while stop < len(lengths) and tokens < part_tokens:
            tokens += int(lengths[stop])
            stop += 1
        batches += [batch + start for batch in plan_batches(np.asarray(lengths[start:stop]), batch_tokens, batching)]
        start = stop
    return batches


def padding_efficiency(lengths, batches, batching: str = "padded") -> float:
    """Real tokens over the tokens the forwards compute (packed batches compute only real ones)."""
    if batching == "packed":
        return 1.0
    return float(sum(int(lengths[b].sum()) for b in batches) / sum(len(b) * int(lengths[b].max()) for b in batches))


def time_forwards(model, samples, batch_tokens: int, part_tokens: int, device, layer_ids, top_k: int, feature_dtype: str,
                  teacher: str, repeats: int, batching: str, backbone: bool = True, cuda_graphs: bool = False):
    """tok/s of the backbone (``None`` unless ``backbone``) and of the feature extraction on the
    batches the run forms with ``batching`` (so the run/features ratio is what writing costs), and
    the padding efficiency of those batches.  With ``cuda_graphs`` the features are replayed from
    graphs (from pinned host inputs, as the run does; every shape is captured in the warm-up),
    else the inputs are on the device before the clock starts."""
    import numpy as np
    import torch

    from stage_extract.backends import HFBackend, host_inputs
    from stage_extract.cuda_graphs import static_shape
    from stage_extract.packed_attention import PackedInputs, packed_attention

    lengths = np.array([len(s) for s in samples])
    planned = run_batches(lengths, batch_tokens, part_tokens, batching)
    backend = HFBackend(model, layer_ids=layer_ids, top_k=top_k, batch_tokens=batch_tokens, device=device,
                        feature_dtype=feature_dtype, teacher=teacher, batching=batching, cuda_graphs=cuda_graphs)
    host, batches = [], []
    for batch in planned:
        inputs = host_inputs([samples[s] for s in batch], batching, pin=device.type == "cuda")
        host.append(inputs)
        batches.append(inputs.to(device) if isinstance(inputs, PackedInputs) else (inputs[0].to(device), inputs[1].to(device), inputs[2]))

    def forward(inputs):
        if isinstance(inputs, PackedInputs):
            with packed_attention(model):
                model.model(**inputs.forward_kwargs(), use_cache=False)
        else:
            model.model(input_ids=inputs[0], attention_mask=inputs[1], use_cache=False)

    def rate(step, inputs_list) -> float:
        sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            for inputs in inputs_list:
                step(inputs)
        sync(device)
        return int(lengths.sum()) * repeats / (time.perf_counter() - started)

    with torch.inference_mode():
        for inputs in batches[:4]:  # warm-up: kernels, allocator
            forward(inputs)
        feature_inputs = host if cuda_graphs else batches
        shapes = set()
        for position, inputs in enumerate(feature_inputs):
            shape = static_shape(inputs.lengths, batch_tokens) if cuda_graphs else None
            if position < 4 or (shape is not None and shape not in shapes):
                backend.extract_inputs(inputs)
                shapes.add(shape)
        backbone_rate = rate(forward, batches) if backbone else None
        features_rate = rate(backend.extract_inputs, feature_inputs)
    if cuda_graphs:
        print(f"features with CUDA graphs: {backend.graph_stats()}", file=sys.stderr)
    return backbone_rate, features_rate, padding_efficiency(lengths, planned, batching)


@contextlib.contextmanager
def phase_timers():
    """Seconds spent in each hand-off phase of the run path, summed over calls and threads:
    ``submit`` (main thread: pinned buffers + queued copies), ``collect`` (writer: wait for the
    copies, split samples), ``concat`` (writer: one array per plane) and ``write`` (writer:
    encode, checksum and write a part's files).  ``last_submit_at`` is the clock when the main
    thread queued its last batch's copies: the forward loop's end, before the writers drain.
    ``seals`` lists ``(clock, tokens)`` of every sealed part, in order.  Patched in for the run,
    restored after."""
    import stage_extract.transfer as transfer
    import stage_extract.writer as writer

    totals = {"submit": 0.0, "collect": 0.0, "concat": 0.0, "write": 0.0, "last_submit_at": 0.0, "seals": [],
              "first_at": {}}
    lock = threading.Lock()

    def timed(phase, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                with lock:
                    totals[phase] += ended - started
                    totals["first_at"].setdefault(phase, started)
                    if phase == "submit":
                        totals["last_submit_at"] = ended
        return wrapper

    patches = [(transfer.HostTransfer, "submit", "submit"), (writer.PartBuilder, "collect", "collect"),
               (writer.PartBuilder, "arrays", "concat"), (writer, "write_part_group", "write")]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches] + [(writer, "write_seal", writer.write_seal)]
    for owner, attr, phase in patches:
        setattr(owner, attr, timed(phase, getattr(owner, attr)))
    original_seal = writer.write_seal

    def write_seal(cache_dir, seal):
        original_seal(cache_dir, seal)
        with lock:
            totals["seals"].append((time.perf_counter(), seal.n_tokens))

    writer.write_seal = write_seal
    try:
        yield totals
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


@contextlib.contextmanager
def pretokenized(data: Path, tokenizer, max_length: int):
    """The run path's records tokenised before the run starts, then replayed to it: what the
    extraction reaches with no tokenising beside it (``--pretokenized``).  Patched in for the run,
    restored after; the cache is the same."""
    import stage_extract.run as run_path
    from stage_extract.records import RecordStats, iter_chat_records
    from stage_extract.tokenize_ahead import TokenizedRecord, tokenize_ahead

    stats = RecordStats()
    items = list(tokenize_ahead(iter_chat_records(str(data), stats=stats), stats, tokenizer, max_length=max_length,
                                background=True))
    final = stats.as_dict()

    def replay(records, run_stats, _tokenizer, *, max_length, wanted=lambda record: True, workers=0, background=False):
        for item in items:
            keep = wanted(item.record)
            yield TokenizedRecord(item.record, keep, item.tokens if keep else None, item.stats)
        for key, value in final.items():
            setattr(run_stats, key, value)

    original = run_path.tokenize_ahead
    run_path.tokenize_ahead = replay
    try:
        yield
    finally:
        run_path.tokenize_ahead = original


def sustained_rate(seals: list[tuple[float, int]], warm_share: float = 0.25) -> float | None:
    """Tokens per second at which parts were sealed once the pipeline was full: from the seal
    of the part that ends the first ``warm_share`` of the parts to the last seal (which waits
    for its whole write).  With the writers keeping up this is the forward's pace under
    writing; with them behind, the writers' pace.  None with fewer than 4 parts."""
    if len(seals) < 4:
        return None
    first = max(1, int(len(seals) * warm_share)) - 1
    tokens = sum(n for _, n in seals[first + 1:])
    return tokens / max(seals[-1][0] - seals[first][0], 1e-9)


def bench_target(name: str, tokenizer, model, device, dtype, args, work: Path, gains: list[list], graph_gains: list[list],
                 disk: tuple[float, float] | None) -> list[list]:
    """The table's rows for one target; appends the packed-against-padded comparison to ``gains``
    and the graphs-against-eager one to ``graph_gains``."""
    from stage_extract.cuda_graphs import use_cuda_graphs

    import numpy as np

    from pipeline.config import ExtractConfig
    from stage_extract.run import extract_with_model

    data = synthetic_chats(work / f"{name}.jsonl", max(8, args.tokens // 350), seed=1)
    samples, tokenise_seconds = tokenised(data, tokenizer, args.max_length, None)
    n_tokens = sum(len(s) for s in samples)
    layer_ids = aux_layers_for(int(model.config.num_hidden_layers))
    lengths = np.array([len(s) for s in samples])
    padded_efficiency = padding_efficiency(lengths, run_batches(lengths, args.batch_tokens, args.part_tokens, "padded"))
    graphs = use_cuda_graphs(args.cuda_graphs, device=device, batching=args.batching,
                             parameters=sum(p.numel() for p in model.parameters()))
    rows = []
    for number, setting in enumerate(args.settings.split(",")):
        feature_dtype, teacher = setting.split("/")
        timing = dict(device=device, layer_ids=layer_ids, top_k=args.top_k, feature_dtype=feature_dtype, teacher=teacher,
                      repeats=args.repeats)
        backbone, features, efficiency = time_forwards(model, samples, args.batch_tokens, args.part_tokens,
                                                       batching=args.batching, cuda_graphs=graphs, **timing)
        if number == 0 and graphs and args.compare_eager:
            # What the graphs gain on the same batches: the eager features, inputs already on the device.
            _, eager, _ = time_forwards(model, samples, args.batch_tokens, args.part_tokens, batching=args.batching,
                                        backbone=False, **timing)
            graph_gains.append([name, setting, round(eager), round(features), f"{features / eager:.2f}"])
            print(" | ".join(str(v) for v in graph_gains[-1]), file=sys.stderr)
        if number == 0 and args.batching == "packed" and args.compare_padded:
            # What packing gains on the same samples, parts and token budget: the padded run batches.
            _, padded, _ = time_forwards(model, samples, args.batch_tokens, args.part_tokens, batching="padded",
                                         backbone=False, **timing)
            gains.append([name, setting, round(padded), round(features), f"{features / padded:.2f}",
                          f"{padded_efficiency:.3f}"])
            print(" | ".join(str(v) for v in gains[-1]), file=sys.stderr)
        for attempt in range(args.runs):
            out = work / f"{name}-{feature_dtype}-{teacher}"
            cfg = ExtractConfig(out=out, target=name, data=str(data), max_length=args.max_length, top_k=args.top_k,
                                layers=layer_ids, batch_tokens=args.batch_tokens, part_tokens=args.part_tokens,
                                device=device.type, progress=False, feature_dtype=feature_dtype, teacher=teacher,
                                aux_compression=args.aux_compression, batching=args.batching,
                                tokenizer_workers=args.tokenizer_workers, cuda_graphs=args.cuda_graphs)
            sampler = thread_sampler() if args.sample_threads else contextlib.nullcontext()
            cpu = thread_cpu() if args.thread_cpu else contextlib.nullcontext()
            replayed = pretokenized(data, tokenizer, args.max_length) if args.pretokenized else contextlib.nullcontext()
            with replayed:
                sync(device)
                started = time.perf_counter()
                with phase_timers() as phases, sampler, cpu as cpu_report:
                    summary = extract_with_model(cfg, tokenizer, model, device=device, dtype=dtype)
            if cpu_report is not None:
                print(f"{name} {setting}: {cpu_report.table()}", file=sys.stderr)
            sync(device)
            seconds = time.perf_counter() - started
            run = summary["tokens"] / seconds
            # The forward loop alone (up to the last batch's queued copies): what writing costs the
            # target while it runs, apart from the drain of the last parts, which a long extraction
            # amortises and a short benchmark does not.
            loop = summary["tokens"] / max(phases.pop("last_submit_at") - started, 1e-9)
            seals = phases.pop("seals")
            sustained = sustained_rate(seals)
            firsts = phases.pop("first_at")
            print(f"{name} {setting}: first calls at " + ", ".join(f"{k} {v - started:.2f}" for k, v in firsts.items())
                  + " s; first seals at " + ", ".join(f"{clock - started:.2f}" for clock, _ in seals[:6])
                  + f" s; the last at {seals[-1][0] - started:.2f} s" if seals else "no seals", file=sys.stderr)
            print(f"{name} {setting}: run {seconds:.2f} s, forward loop {summary['tokens'] / loop:.2f} s; summed phase "
                  "seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
                  + f"; CUDA graphs: {summary.get('cuda_graphs')}", file=sys.stderr)
            written = run * summary["bytes_per_token"] / 1e6
            written_sustained = sustained * summary["bytes_per_token"] / 1e6 if sustained else None
            label = name if args.runs == 1 else f"{name} (run {attempt + 1})"
            rows.append([label, setting, n_tokens, round(n_tokens / tokenise_seconds), round(backbone), round(features),
                         round(run), f"{run / features:.2f}", f"{loop / features:.2f}",
                         f"{sustained / features:.2f}" if sustained else "n/a", f"{summary['bytes_per_token'] / 1024:.2f}",
                         f"{written:,.1f}", f"{written_sustained:,.1f}" if sustained else "n/a",
                         " / ".join(f"{written / d:.2f}" for d in disk) if disk else "n/a",
                         " / ".join(f"{written_sustained / d:.2f}" for d in disk) if disk and sustained else "n/a",
                         f"{efficiency:.3f}"])
            print(" | ".join(str(v) for v in rows[-1]), file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per target (default 2M on cuda, 2k on cpu)")
    parser.add_argument("--tokens-8b", type=int, default=None, help="tokens for the 8B target (default 600k on cuda, "
                        "512 on cpu): enough parts that the sustained rate is measured with the pipeline full")
    parser.add_argument("--disk-gib", type=float, default=None, help="GiB written to measure the disk's bandwidth "
                        "(default 4 on cuda, 0 = skip on cpu)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-tokens", type=int, default=None, help="default 32768 on cuda, 4096 on cpu")
    parser.add_argument("--part-tokens", type=int, default=65536)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="forward-only passes over the data")
    parser.add_argument("--runs", type=int, default=1, help="extractions with writing per setting (one row each)")
    parser.add_argument("--settings", default="bf16/topk,fp8/topk")
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--layers-override", type=int, default=None, help="depth of the 8B-shaped model (needed on CPU)")
    parser.add_argument("--writer-threads", type=int, default=0, help="part-writer threads (0: the run path's default)")
    parser.add_argument("--encode-threads", type=int, default=0, help="compression pool threads (0: the run path's default)")
    parser.add_argument("--sync-threads", type=int, default=0, help="threads flushing written parts (0: the run path's default)")
    parser.add_argument("--max-unsealed", type=int, default=0,
                        help="parts written but not yet flushed and sealed at most (0: the writer's default, writer threads + 2)")
    parser.add_argument("--max-pending", type=int, default=0,
                        help="parts queued for the writer threads at most (0: the run path's default)")
    parser.add_argument("--switch-interval", type=float, default=0.0,
                        help="the interpreter's GIL switch interval for the run, seconds (0: Python's default, 0.005)")
    parser.add_argument("--write-mode", default=None, help="how shard files reach the disk: buffered, streamed or direct "
                        "(schemas/file_sink.py; default: the run path's)")
    parser.add_argument("--aux-compression", default="auto", help="codec of the aux planes (talon extract --aux-compression)")
    parser.add_argument("--batching", default="packed", choices=("packed", "padded"), help="talon extract --batching")
    parser.add_argument("--no-compare-padded", dest="compare_padded", action="store_false",
                        help="skip timing the padded batches beside the packed ones")
    parser.add_argument("--cuda-graphs", default="auto", choices=("auto", "on", "off"), help="talon extract --cuda-graphs")
    parser.add_argument("--no-compare-eager", dest="compare_eager", action="store_false",
                        help="skip timing the eager forwards beside the CUDA-graph ones")
    parser.add_argument("--tokenizer-workers", type=int, default=None,
                        help="talon extract --tokenizer-workers (default: the run path's, 2 processes on a GPU)")
    parser.add_argument("--tokenizer-start", default=None, choices=("fork", "forkserver", "spawn"),
                        help="how tokenizer processes start (default: the run path's: fork on Linux, else the fork server)")
    parser.add_argument("--pretokenized", action="store_true",
                        help="tokenise the run's records before it starts and replay them to it: the extraction with "
                             "no tokenising beside it (the tokenizer feeder's share of the run)")
    parser.add_argument("--thread-cpu", action="store_true",
                        help="print the cores each thread group (encoding pool, part writers, main thread, CUDA's and "
                             "the tokenizer's native threads...) kept busy during each run, and the whole host's busy share")
    parser.add_argument("--sample-threads", action="store_true",
                        help="print where the run's main thread and its tokenizer feeder spend their time (stack samples every 10 ms)")
    args = parser.parse_args()
    use_tokenizer_start_method(args.tokenizer_start)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.writer_threads or args.encode_threads or args.sync_threads or args.max_unsealed or args.max_pending or args.write_mode:
        import stage_extract.run

        default_parallelism = stage_extract.run.writer_parallelism

        def parallelism(device):
            chosen = dict(default_parallelism(device))
            chosen["threads"] = args.writer_threads or chosen["threads"]
            chosen["encode_threads"] = args.encode_threads or chosen.get("encode_threads")
            chosen["sync_threads"] = args.sync_threads or chosen.get("sync_threads")
            chosen["max_pending"] = args.max_pending or chosen.get("max_pending")
            if args.max_unsealed:
                chosen["max_unsealed"] = args.max_unsealed
            if args.write_mode:
                chosen["write_mode"] = args.write_mode
            return chosen

        stage_extract.run.writer_parallelism = parallelism

    import torch

    from pipeline.runtime import compute_dtype
    from stage_extract.target import load_target

    device = resolve(args.device)
    dtype = compute_dtype(device)
    cuda = device.type == "cuda"
    args.batch_tokens = args.batch_tokens or (32768 if cuda else 4096)
    args.disk_gib = (4.0 if cuda else 0.0) if args.disk_gib is None else args.disk_gib
    args.max_length = min(args.max_length, args.batch_tokens)
    work = Path(tempfile.mkdtemp(prefix="talon-extract-speed-"))
    rows, gains, graph_gains = [], [], []
    disk = disk_bandwidths(work, args.disk_gib) if args.disk_gib > 0 else None
    if disk is not None:
        print(f"disk: {disk[0]:,.0f} MB/s one file, {disk[1]:,.0f} MB/s in parts on 3 threads (fsync)", file=sys.stderr)
    if not args.skip_smollm2:
        args.tokens = args.tokens or (2_000_000 if cuda else 2048)
        tokenizer, model = load_target("smollm2", device=device, dtype=dtype)
        rows += bench_target("smollm2", tokenizer, model, device, dtype, args, work, gains, graph_gains, disk)
        del model
    if not args.skip_8b and (cuda or args.layers_override):
        args.tokens = args.tokens_8b or (600_000 if cuda else 512)
        model = build_llama_8b(device, dtype, args.layers_override)
        label = "llama-8b-random" + (f" ({model.config.num_hidden_layers} layers)" if args.layers_override else "")
        rows += bench_target(label, smollm2_tokenizer(), model, device, dtype, args, work, gains, graph_gains, disk)
    header = ["target", "dtype/teacher", "tokens", "tokenise tok/s", "backbone tok/s", "features tok/s",
              "run (with writing) tok/s", "run / features", "forward loop / features", "sustained / features",
              "KiB/token", "MB/s written (run)", "MB/s written (sustained)", "run MB/s / disk (one file / parts)",
              "sustained MB/s / disk (one file / parts)", "real-token share of the run's batches"]
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    from stage_extract.run import writer_parallelism

    parallel = writer_parallelism(device)
    print(f"\n### Extraction speed on {name} ({dtype}), {args.batching} batches of {args.batch_tokens} tokens, "
          f"CUDA graphs {args.cuda_graphs}, "
          f"{parallel['threads']} part-writer thread(s) + {parallel.get('encode_threads')} encoding, "
          f"aux compression {args.aux_compression}, {parallel.get('write_mode', 'default')} writes, torch {torch.__version__}\n")
    print(markdown_table(header, rows))
    if gains:
        print("\nPacked against padded forwards (features tok/s, same samples, parts and token budget):\n")
        print(markdown_table(["target", "dtype/teacher", "padded tok/s", "packed tok/s", "packed / padded",
                              "real-token share of the padded batches"], gains))
    if graph_gains:
        print("\nCUDA graphs against eager forwards (features tok/s, same batches):\n")
        print(markdown_table(["target", "dtype/teacher", "eager tok/s", "graphs tok/s", "graphs / eager"], graph_gains))
    if disk is not None:
        print(f"\nDisk, {args.disk_gib} GiB of incompressible bytes with fsync, in {work.parent}: {disk[0]:,.0f} MB/s "
              f"as one file, {disk[1]:,.0f} MB/s as parts of SmolLM2's size and layout on 3 threads (bench/disk_speed.py).")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
