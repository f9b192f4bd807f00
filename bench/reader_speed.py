"""Can the cache reader feed the trainer?  Reader tokens/s against training-step tokens/s.

Writes a real store through our writer (random features of a target with ``--hidden`` /
``--vocab``, sample lengths uniform in [64, --max-length]), then on the same batches:

* ``reader``: ``stage_train.data.load_batch`` (one ranged read per sample and array) behind
  ``pipeline.prefetch.prefetch``, as the trainer consumes it: ``raw=True``, so an fp8 cache's
  aux states arrive as uint8 codes + scales (no CPU decode), collated into pinned memory on
  CUDA; also the part-windowed reader (``iterate_batches``, what ``talon train`` uses);
* ``trainer``: host-to-device copy, the on-device fp8 decode (``FeatureBatch.aux_states``) for
  fp8, and forward + backward + AdamW steps of ``Eagle3TrainerModule`` (TTT unroll, a
  one-layer draft of the target's shape) on ``--device``, bf16 autocast on CUDA; timed per
  feature dtype.

``--decoded-too`` also times the old fp8 path (aux states decoded to bf16 on the CPU by the
reader) and prints it on stderr, for comparison.

The ratio reader/trainer is the head-room (goal: >= 3).  The store is read from the page cache
after being written, so disk bandwidth is not part of the reader figure.

    python bench/reader_speed.py --device cuda                # 8B shape, batch 8192
    python bench/reader_speed.py --device cpu                 # SmolLM2 shape, small batch
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import LLAMA_8B, markdown_table, resolve, sync  # noqa: E402


def write_store(out: Path, *, hidden: int, vocab: int, top_k: int, tokens: int, max_length: int,
                part_tokens: int, feature_dtype: str, seed: int = 0) -> None:
    import numpy as np
    import torch

    from schemas.layout import SCHEMA_VERSION, array_specs
    from schemas.manifest import ExtractSettings, ExtractSpec, TargetIdentity, build_manifest, write_manifest, write_seal
    from schemas.store import write_part_group
    from stage_extract.quant import quantize_fp8
    from stage_extract.writer import PartBuilder, SampleFeatures

    rng = np.random.default_rng(seed)
    config = {**LLAMA_8B, "hidden_size": hidden, "vocab_size": vocab, "intermediate_size": max(hidden * 3, 64),
              "num_attention_heads": max(hidden // 128, 1), "num_key_value_heads": max(hidden // 512, 1)}
    identity = TargetIdentity("bench", hidden, vocab, 32, "c", "t", "tpl", "w", config=config)
    settings = ExtractSettings("bench", max_length, top_k, (1, 15, 28), None, part_tokens, 8192, False,
                               "bfloat16", "cuda", feature_dtype=feature_dtype)
    spec = ExtractSpec(SCHEMA_VERSION, identity, settings)
    seals, written, record = [], 0, 0
    while written < tokens:
        builder = PartBuilder(index=len(seals), first_record=record)
        part = 0
        while part < part_tokens and written + part < tokens:
            n = int(rng.integers(64, max_length + 1))
            values = torch.from_numpy(rng.standard_normal((n, 3 * hidden), dtype=np.float32) * 45)
            if feature_dtype == "fp8":
                codes, scales = quantize_fp8(values, 3)
                aux, aux_scale = codes.numpy(), scales.numpy()
            else:
                aux, aux_scale = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), None
            builder.samples.append(SampleFeatures(
                record_index=record, input_ids=rng.integers(0, vocab, n), loss_mask=np.ones(n, np.uint8),
                aux_hidden=aux, aux_scale=aux_scale, topk_ids=rng.integers(0, vocab, (n, top_k)),
                topk_logprobs=np.sort(-rng.random((n, top_k), dtype=np.float32) * 20, axis=1)[:, ::-1].copy(),
            ))
            builder.last_record = record
            record += 1
            part += n
        written += part
        arrays = builder.arrays()
        records = write_part_group(out, f"part-{builder.index:06d}", arrays, vocab, feature_dtype=feature_dtype)
        seal = builder.seal(arrays, records, {})
        write_seal(out, seal)
        seals.append(seal)
    arrays = {s.name: {"storage": s.storage_dtype, "logical": s.logical_dtype} for s in array_specs(vocab, feature_dtype)}
    write_manifest(out, build_manifest(spec, seals, arrays))


def time_reader(reader, batches, max_length, *, raw=True, pin_memory=False):
    from pipeline.prefetch import prefetch
    from stage_train.data import load_batch

    started = time.perf_counter()
    tokens = 0
    batches_read = (load_batch(reader, b, max_length, raw=raw, pin_memory=pin_memory) for b in batches)
    for batch in prefetch(batches_read, depth=4):
        tokens += batch.n_tokens
    return tokens / (time.perf_counter() - started)


def time_windowed(reader, batch_tokens, n_batches, *, raw=True, pin_memory=False):
    """The trainer's part-windowed reader, when this version of stage_train.data has one."""
    import itertools

    import stage_train.data as data
    from pipeline.prefetch import prefetch

    if not hasattr(data, "iterate_batches"):
        return None
    try:
        plan = data.BatchPlan(reader, batch_tokens, 0)
        batches = data.iterate_batches(reader, plan, raw=raw, pin_memory=pin_memory)
        stream = prefetch((b for _, _, b in batches), depth=4)
        next(stream)
        started = time.perf_counter()
        tokens = sum(b.n_tokens for b in itertools.islice(stream, n_batches))
        return tokens / (time.perf_counter() - started)
    except Exception as err:  # the windowed reader is another engineer's work in progress
        print(f"windowed reader skipped: {err}", file=sys.stderr)
        return None


def time_trainer(batches_loaded, *, hidden, vocab, draft_vocab, ttt_steps, device, steps):
    import torch
    from transformers import LlamaConfig

    from stage_train.core import Eagle3TrainerModule, TopKLogProbs, _shift_left_with_zero
    from stage_train.draft import DraftConfig, Eagle3DraftModel

    config = LlamaConfig(**{**LLAMA_8B, "hidden_size": hidden, "vocab_size": vocab,
                            "num_attention_heads": max(hidden // 128, 1), "num_key_value_heads": max(hidden // 512, 1),
                            "intermediate_size": hidden * 3})
    draft = Eagle3DraftModel(DraftConfig.from_target_config(config, draft_vocab))
    selected = torch.arange(draft_vocab) * (vocab // draft_vocab)
    draft.set_vocab_mapping(selected)
    draft.load_target_embeddings(torch.randn(vocab, hidden) * 0.02)
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[selected] = True
    module = Eagle3TrainerModule(draft, selected_token_ids=selected, selected_token_mask=mask, ttt_steps=ttt_steps).to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step(batch):
        batch = batch.to(device)
        aux = batch.aux_states()  # fp8 read raw: decoded here, on the device, as the trainer does
        aux = aux if device.type == "cuda" else aux.float()
        with autocast:
            metrics = module(
                input_ids=_shift_left_with_zero(batch.input_ids), attention_mask=batch.attention_mask,
                loss_mask=_shift_left_with_zero(batch.loss_mask), aux_hidden_states=aux,
                target_logits=TopKLogProbs(_shift_left_with_zero(batch.topk_ids), _shift_left_with_zero(batch.topk_logprobs)),
            )
        optimizer.zero_grad(set_to_none=True)
        metrics.loss.backward()
        optimizer.step()

    step(batches_loaded[0])  # warm-up
    sync(device)
    started = time.perf_counter()
    tokens = 0
    for i in range(steps):
        batch = batches_loaded[i % len(batches_loaded)]
        step(batch)
        tokens += batch.n_tokens
    sync(device)
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--hidden", type=int, default=None, help="target hidden size (default 4096 on cuda, 576 on cpu)")
    parser.add_argument("--vocab", type=int, default=None, help="target vocab (default 128256 on cuda, 49152 on cpu)")
    parser.add_argument("--draft-vocab", type=int, default=None, help="default 32000 on cuda, 8192 on cpu")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=None, help="tokens in the store (default 131072 on cuda, 32768 on cpu)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-tokens", type=int, default=None, help="default 8192 on cuda, 2048 on cpu")
    parser.add_argument("--ttt-steps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=None, help="timed trainer steps (default 8 on cuda, 2 on cpu)")
    parser.add_argument("--feature-dtypes", default="bf16,fp8")
    parser.add_argument("--decoded-too", action="store_true",
                        help="also time the old fp8 read (decoded to bf16 on the CPU), printed on stderr")
    args = parser.parse_args()

    import numpy as np
    import torch

    from pipeline.batching import shuffled_bucket_batches
    from schemas.store import CacheReader
    from stage_train.data import load_batch

    device = resolve(args.device)
    cuda = device.type == "cuda"
    hidden = args.hidden or (4096 if cuda else 576)
    vocab = args.vocab or (128256 if cuda else 49152)
    draft_vocab = args.draft_vocab or (32000 if cuda else 8192)
    tokens = args.tokens or (131072 if cuda else 32768)
    batch_tokens = args.batch_tokens or (8192 if cuda else 2048)
    max_length = min(args.max_length, batch_tokens)
    steps = args.steps or (8 if cuda else 2)
    torch.manual_seed(0)
    rows = []
    for feature_dtype in args.feature_dtypes.split(","):
        work = Path(tempfile.mkdtemp(prefix="talon-reader-"))
        started = time.perf_counter()
        write_store(work, hidden=hidden, vocab=vocab, top_k=args.top_k, tokens=tokens, max_length=max_length,
                    part_tokens=65536, feature_dtype=feature_dtype)
        write_seconds = time.perf_counter() - started
        reader = CacheReader(work)
        batches = shuffled_bucket_batches(reader.lengths, batch_tokens, np.random.default_rng(0))
        reader_rate = time_reader(reader, batches, None, pin_memory=cuda)
        windowed = time_windowed(reader, batch_tokens, len(batches), pin_memory=cuda)
        if args.decoded_too and feature_dtype == "fp8":
            old = time_reader(reader, batches, None, raw=False, pin_memory=cuda)
            old_windowed = time_windowed(reader, batch_tokens, len(batches), raw=False, pin_memory=cuda)
            print(f"fp8 reader, old CPU decode: {old:,.0f} tok/s (load_batch+prefetch), "
                  f"{'-' if old_windowed is None else f'{old_windowed:,.0f}'} tok/s (windowed); "
                  f"raw: {reader_rate:,.0f} / {'-' if windowed is None else f'{windowed:,.0f}'} tok/s", file=sys.stderr)
        # the trainer consumes what the reader serves: raw fp8 codes, decoded after the copy
        loaded = [load_batch(reader, b, raw=True, pin_memory=cuda) for b in batches[: min(4, len(batches))]]
        trainer_rate = time_trainer(loaded, hidden=hidden, vocab=vocab, draft_vocab=draft_vocab,
                                    ttt_steps=args.ttt_steps, device=device, steps=steps)
        rows.append([feature_dtype, reader.manifest.n_tokens, round(reader.manifest.bytes_per_token / 1024, 2),
                     round(reader.manifest.n_tokens / write_seconds), round(reader_rate),
                     "-" if windowed is None else round(windowed), round(trainer_rate),
                     f"{reader_rate / trainer_rate:.1f}x", "-" if windowed is None else f"{windowed / trainer_rate:.1f}x"])
        print(" | ".join(str(v) for v in rows[-1]), file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"\n### Reader vs trainer: hidden {hidden}, vocab {vocab}, draft vocab {draft_vocab}, top-{args.top_k}, "
          f"batch {batch_tokens} tokens, TTT {args.ttt_steps}, trainer on {name}, torch {torch.__version__}\n")
    print(markdown_table(["feature dtype", "tokens", "KiB/token", "write tok/s", "reader tok/s (load_batch+prefetch)",
                          "windowed reader tok/s", "trainer tok/s", "reader / trainer", "windowed / trainer"], rows))


if __name__ == "__main__":
    main()
