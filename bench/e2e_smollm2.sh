#!/usr/bin/env bash
# End to end on the real SmolLM2 on one GPU: extract N ShareGPT conversations, train, export.
# Usage: N=3000 STEPS= EPOCHS=2 bash bench/e2e_smollm2.sh OUTDIR
set -euo pipefail
out=${1:-/tmp/talon-e2e}
mkdir -p "$out"
N=${N:-3000}
EPOCHS=${EPOCHS:-2}
work=${WORK:-/tmp/talon-e2e-work}
rm -rf "$work"; mkdir -p "$work"
python -m pipeline extract --out "$work/cache" --max-samples "$N" --max-length 2048 --batch-tokens 65536 \
  --part-tokens 262144 --device cuda --json --no-progress > "$out/extract.json"
python -m pipeline inspect "$work/cache" --json > "$out/inspect.json"
python -m pipeline train --cache "$work/cache" --out "$work/run" --epochs "$EPOCHS" --ttt-steps 7 --draft-vocab 32000 \
  --batch-tokens 16384 --lr 5e-4 --val-fraction 0.05 --eval-every 100 --log-every 20 --device cuda --json --no-progress > "$out/train.json"
cp "$work/run/metrics.jsonl" "$out/"
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
e = json.load(open(f"{out}/extract.json")); t = json.load(open(f"{out}/train.json"))
print("| metric | value |\n|---|---|")
print(f"| samples / tokens | {e['samples']} / {e['tokens']} |")
print(f"| extraction tok/s (end to end, incl. tokenising and writing) | {e['tokens_per_second']} |")
print(f"| bytes per token | {e['bytes_per_token']} |")
print(f"| training tok/s | {t['tokens_per_second']} |")
print(f"| steps | {t['steps']} |")
print(f"| final train per-step accuracy | {t['final']['step_accuracy']} |")
print(f"| validation per-step accuracy | {t['validation']['step_accuracy']} |")
print(f"| validation simulated acceptance length | {t['validation']['simulated_acceptance_length']} |")
PY
