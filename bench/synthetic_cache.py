"""A synthetic feature cache of any Llama shape, written through the real extraction writer.

No target model runs: the aux states are random bf16 values of a plausible per-layer scale
(generated on ``--device``, so an 8B-shaped cache of a few hundred thousand tokens takes seconds
to generate) and the teacher is a random top-k (Zipf-distributed greedy token, descending
log-probs normalised to a total mass below one).  Everything after the numbers is the code a
real ``talon extract`` runs: ``prepare_cache_dir`` (``extract.json``), ``save_target_head``,
``PartBuilder`` + ``BackgroundPartWriter`` (``write_part_group`` + seals, in parallel threads),
``write_worker_record`` and ``merge_cache`` (``manifest.json``).  So the trainer reads it exactly
as it reads an extracted cache.

A finished cache built with the same settings is reused; a half-built one of ours is rebuilt.

    python bench/synthetic_cache.py --out /tmp/c8b --device cuda                   # 8B shape
    python bench/synthetic_cache.py --out /tmp/tiny --device cpu --hidden 64 --layers 4 --vocab 1000 --seq 128 --cache-tokens 4096
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import LLAMA_8B, aux_layers_for  # noqa: E402

SYNTHETIC_PREFIX = "synthetic:"


@dataclass(frozen=True)
class Shape:
    """A Llama target shape (defaults: Llama-3.1-8B)."""

    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    mlp: int = 14336
    vocab: int = 128256

    def llama_kwargs(self) -> dict:
        return {**LLAMA_8B, "hidden_size": self.hidden, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "intermediate_size": self.mlp, "vocab_size": self.vocab, "head_dim": self.hidden // self.heads}

    def label(self) -> str:
        if self == Shape():
            return "Llama-3.1-8B shape"
        return f"hidden {self.hidden}, {self.layers} layers, {self.heads}/{self.kv_heads} heads, MLP {self.mlp}, vocab {self.vocab}"


@dataclass(frozen=True)
class CacheRequest:
    shape: Shape
    tokens: int
    seq: int
    min_length: int
    top_k: int = 64
    part_tokens: int = 65536
    feature_dtype: str = "bf16"
    aux_std: tuple[float, float, float] = (0.05, 0.5, 1.5)
    seed: int = 0

    def data_label(self) -> str:
        """Goes into the spec's ``data`` field, so a cache with other synthetic settings is never reused."""
        std = ",".join(f"{s:g}" for s in self.aux_std)
        return (f"{SYNTHETIC_PREFIX}tokens={self.tokens},seq={self.seq},min={self.min_length},std={std},"
                f"seed={self.seed}")


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("target shape (defaults: Llama-3.1-8B)")
    g.add_argument("--hidden", type=int, default=4096)
    g.add_argument("--layers", type=int, default=32)
    g.add_argument("--heads", type=int, default=None, help="default hidden // 128 (32 for 4096)")
    g.add_argument("--kv-heads", type=int, default=None, help="default heads // 4 (8 for 32 heads)")
    g.add_argument("--mlp", type=int, default=None, help="default 3.5 x hidden (14336 for 4096)")
    g.add_argument("--vocab", type=int, default=128256)


def add_cache_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("synthetic cache")
    g.add_argument("--seq", type=int, default=2048, help="sample length (the longest, with --min-length)")
    g.add_argument("--min-length", type=int, default=None, help="shortest sample (default --seq: every sample is --seq tokens)")
    g.add_argument("--top-k", type=int, default=64)
    g.add_argument("--cache-tokens", type=int, default=None, help="tokens in the cache (default: enough for the timed steps)")
    g.add_argument("--part-tokens", type=int, default=65536)
    g.add_argument("--feature-dtype", default="bf16", choices=("bf16", "fp8"))
    g.add_argument("--aux-std", default="0.05,0.5,1.5",
                   help="per-element std of the low,mid,high aux layer outputs (the residual stream grows with depth)")
    g.add_argument("--seed", type=int, default=0)


def shape_from_args(args: argparse.Namespace) -> Shape:
    heads = args.heads or max(1, args.hidden // 128)
    kv_heads = args.kv_heads or max(1, heads // 4)
    shape = Shape(hidden=args.hidden, layers=args.layers, heads=heads, kv_heads=kv_heads,
                  mlp=args.mlp or int(args.hidden * 3.5), vocab=args.vocab)
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise SystemExit(f"error: --hidden {shape.hidden} must divide by --heads {shape.heads}, and heads by --kv-heads {shape.kv_heads}")
    if shape.layers < 3:
        raise SystemExit("error: --layers must be at least 3 (three aux layers are captured)")
    return shape


def request_from_args(args: argparse.Namespace, shape: Shape, tokens: int) -> CacheRequest:
    try:
        std = tuple(float(s) for s in args.aux_std.split(","))
    except ValueError:
        raise SystemExit(f"error: --aux-std takes three comma-separated numbers, got {args.aux_std!r}")
    if len(std) != 3:
        raise SystemExit(f"error: --aux-std takes three comma-separated numbers, got {args.aux_std!r}")
    min_length = args.min_length or args.seq
    if not 2 <= min_length <= args.seq:
        raise SystemExit(f"error: --min-length must be in [2, --seq={args.seq}]")
    if args.top_k > shape.vocab:
        raise SystemExit(f"error: --top-k {args.top_k} exceeds --vocab {shape.vocab}")
    return CacheRequest(shape=shape, tokens=max(tokens, args.seq), seq=args.seq, min_length=min_length, top_k=args.top_k,
                        part_tokens=args.part_tokens, feature_dtype=args.feature_dtype, aux_std=std, seed=args.seed)


def _spec(req: CacheRequest, device_type: str):
    from transformers import LlamaConfig

    from schemas.layout import SCHEMA_VERSION
    from schemas.manifest import ExtractSettings, ExtractSpec, TargetIdentity, config_hash

    config = {k: v for k, v in LlamaConfig(**req.shape.llama_kwargs()).to_dict().items() if not k.startswith("_")}
    identity = TargetIdentity(
        source=f"random {req.shape.label()} (synthetic cache, no target run)",
        hidden_size=req.shape.hidden, vocab_size=req.shape.vocab, num_hidden_layers=req.shape.layers,
        config_hash=config_hash(config), tokenizer_hash="synthetic", chat_template_hash="synthetic",
        weights_fingerprint=f"synthetic-seed-{req.seed}", config=config,
    )
    settings = ExtractSettings(
        data=req.data_label(), max_length=req.seq, top_k=req.top_k, layer_ids=tuple(aux_layers_for(req.shape.layers)),
        max_samples=None, part_tokens=req.part_tokens, batch_tokens=max(32768, req.seq), skip_bad_records=False,
        compute_dtype="bfloat16", device_type=device_type, feature_dtype=req.feature_dtype, teacher="topk", num_shards=1,
    )
    return ExtractSpec(SCHEMA_VERSION, identity, settings)


def _zipf_sampler(vocab: int, rng, exponent: float = 1.1):
    """Token ids with a Zipf-like frequency over a random permutation of the vocab (like text)."""
    import numpy as np

    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** exponent)
    cdf /= cdf[-1]
    permutation = rng.permutation(vocab)

    def sample(shape) -> np.ndarray:
        ranks = np.minimum(np.searchsorted(cdf, rng.random(shape)), vocab - 1)
        return permutation[ranks]

    return sample


def _part_features(req: CacheRequest, lengths: list[int], rng, sample_ids, device):
    """Random features of one part's samples (numpy, as the writer takes them)."""
    import numpy as np
    import torch

    from stage_extract.quant import quantize_fp8

    n = int(sum(lengths))
    hidden = req.shape.hidden
    std = torch.tensor(req.aux_std, device=device, dtype=torch.float32).view(1, 3, 1)
    if req.feature_dtype == "fp8":
        values = (torch.randn(n, 3, hidden, device=device) * std).view(n, 3 * hidden)
        codes, scales = quantize_fp8(values, 3)
        aux, aux_scale = codes.cpu().numpy(), scales.cpu().numpy()
        del values, codes, scales
    else:
        values = torch.randn(n, 3, hidden, device=device, dtype=torch.bfloat16).mul_(std.to(torch.bfloat16))
        aux, aux_scale = values.view(n, 3 * hidden).cpu().view(torch.int16).numpy().view(np.uint16), None
        del values
    k = req.top_k
    topk_ids = rng.integers(0, req.shape.vocab, (n, k), dtype=np.int64)
    topk_ids[:, 0] = sample_ids(n)
    steps = rng.exponential(0.35, (n, k)).astype(np.float32)
    logits = -np.cumsum(steps, axis=1)  # descending
    top = logits.max(axis=1, keepdims=True)
    logsumexp = top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    topk_logprobs = (logits - logsumexp + np.log(0.95)).astype(np.float32)  # top-k holds 95 % of the mass
    return aux, aux_scale, topk_ids, topk_logprobs


def _existing(out: Path, spec) -> str:
    """'complete' (same spec, manifest written), 'ours' (a synthetic cache to rebuild), 'absent'."""
    from schemas.jsonio import read_json
    from schemas.layout import EXTRACT_SPEC_FILE, MANIFEST_FILE
    from schemas.manifest import ExtractSpec

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "absent"
    spec_path = out / EXTRACT_SPEC_FILE
    if not spec_path.is_file():
        raise SystemExit(f"error: {out} exists and is not a Talon cache; pass an empty or new --cache path")
    existing = ExtractSpec.from_dict(read_json(spec_path))
    if not str(existing.settings.data).startswith(SYNTHETIC_PREFIX):
        raise SystemExit(f"error: {out} is a real extracted cache, not a synthetic one; pass another --cache path")
    diffs = existing.differences(spec)
    if diffs:
        raise SystemExit(f"error: the synthetic cache at {out} was built with other settings; pass another --cache path "
                         "or the same settings. Differences:\n  " + "\n  ".join(diffs))
    return "complete" if (out / MANIFEST_FILE).is_file() else "ours"


def ensure_cache(out: Path, req: CacheRequest, device, *, writer_threads: int | None = None, log=print) -> dict:
    """Build the cache at ``out`` (or reuse a finished one with the same settings); returns a summary."""
    import numpy as np
    import torch

    from schemas.layout import row_widths
    from schemas.manifest import read_sealed_parts
    from stage_extract.cache_dir import prepare_cache_dir
    from stage_extract.records import RecordStats
    from stage_extract.run import save_target_head, writer_parallelism
    from stage_extract.workers import Shard, merge_cache, write_worker_record
    from stage_extract.writer import BackgroundPartWriter, PartBuilder, SampleFeatures

    out = Path(out)
    device = torch.device(device)
    spec = _spec(req, device.type)
    state = _existing(out, spec)
    if state == "complete":
        from pipeline.inspect_cache import describe_cache

        info = describe_cache(out)
        log(f"reusing synthetic cache {out}: {info['samples']} samples, {info['tokens']:,} tokens")
        return {"path": str(out), "reused": True, "samples": info["samples"], "tokens": info["tokens"],
                "bytes_per_token": round(info["bytes_per_token"], 1), "build_seconds": 0.0, "request": _req_dict(req)}
    if state == "ours":
        shutil.rmtree(out)  # a half-built synthetic cache of ours (the builder does not resume)

    started = time.perf_counter()
    rng = np.random.default_rng(req.seed)
    torch.manual_seed(req.seed)
    sample_ids = _zipf_sampler(req.shape.vocab, rng)
    shard = Shard()
    resume = prepare_cache_dir(out, spec, shard)
    embed = (torch.randn(req.shape.vocab, req.shape.hidden, device=device, dtype=torch.bfloat16) * 0.02).cpu()
    head_only = SimpleNamespace(get_input_embeddings=lambda weight=embed: SimpleNamespace(weight=weight),
                                config=SimpleNamespace(rms_norm_eps=LLAMA_8B["rms_norm_eps"]))
    save_target_head(out, head_only, "topk")
    del embed, head_only
    widths = row_widths(req.shape.hidden, req.top_k, req.feature_dtype, "topk")
    parallel = writer_parallelism(device)
    if writer_threads:
        parallel = {**parallel, "threads": writer_threads}
    writer = BackgroundPartWriter(resume.worker_dir, req.shape.vocab, req.feature_dtype, "topk", **parallel)
    stats = RecordStats()
    written, record, index = 0, 0, 0
    try:
        while written < req.tokens:
            lengths = []
            while sum(lengths) < req.part_tokens and written + sum(lengths) < req.tokens:
                lengths.append(int(rng.integers(req.min_length, req.seq + 1)))
            aux, aux_scale, topk_ids, topk_logprobs = _part_features(req, lengths, rng, sample_ids, device)
            builder = PartBuilder(index=index, first_record=record, widths=widths)
            start = 0
            for n in lengths:
                rows = slice(start, start + n)
                start += n
                loss_mask = np.zeros(n, np.uint8)
                loss_mask[int(n * rng.uniform(0.05, 0.3)):] = 1  # a prompt, then the assistant's answer
                builder.samples.append(SampleFeatures(
                    record_index=record, input_ids=sample_ids(n).astype(np.int64), loss_mask=loss_mask,
                    aux_hidden=aux[rows], aux_scale=None if aux_scale is None else aux_scale[rows],
                    topk_ids=topk_ids[rows], topk_logprobs=topk_logprobs[rows],
                ))
                builder.records_consumed += 1
                builder.last_record = record
                record += 1
            stats.records_read = record
            writer.submit(builder, stats.as_dict())
            written += start
            index += 1
    finally:
        writer.close()
    write_worker_record(resume.worker_dir, shard, read_sealed_parts(resume.worker_dir), stats.as_dict())
    manifest = merge_cache(out)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    seconds = time.perf_counter() - started
    log(f"built synthetic cache {out}: {manifest.n_samples} samples, {manifest.n_tokens:,} tokens, "
        f"{manifest.bytes_per_token / 1024:.2f} KiB/token, {len(manifest.parts)} parts in {seconds:.1f} s "
        f"({parallel['threads']} writer threads)")
    return {"path": str(out), "reused": False, "samples": manifest.n_samples, "tokens": manifest.n_tokens,
            "bytes_per_token": round(manifest.bytes_per_token, 1), "build_seconds": round(seconds, 2),
            "request": _req_dict(req)}


def _req_dict(req: CacheRequest) -> dict:
    data = asdict(req)
    data["aux_std"] = list(req.aux_std)
    return data


def build_random_llama(shape: Shape, device, dtype, seed: int = 0):
    """A random-weight Llama of ``shape``, built directly on ``device`` in ``dtype``."""
    from bench.common import build_random_llama as build

    return build(shape.llama_kwargs(), device, dtype, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="cache directory (reused when complete with the same settings)")
    parser.add_argument("--device", default="auto", help="where the random features are generated (cuda is much faster)")
    parser.add_argument("--writer-threads", type=int, default=None, help="part-writer threads (default: the extractor's)")
    add_shape_args(parser)
    add_cache_args(parser)
    args = parser.parse_args()
    from bench.common import resolve

    shape = shape_from_args(args)
    req = request_from_args(args, shape, args.cache_tokens or 16 * args.seq)
    info = ensure_cache(args.out, req, resolve(args.device), writer_threads=args.writer_threads,
                        log=lambda line: print(line, file=sys.stderr))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
