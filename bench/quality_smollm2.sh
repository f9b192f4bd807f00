#!/usr/bin/env bash
# Issue #3 quality comparisons on the real SmolLM2, in two phases (each fits one GPU call):
#   bash bench/quality_smollm2.sh train WORK   # subset, regenerate, extract, train three drafts
#   bash bench/quality_smollm2.sh eval  WORK   # MT-bench speculative decoding of the three drafts
# Drafts (same prompts, same steps, K=7, draft vocab 32k):
#   topk   ShareGPT answers, top-64 teacher
#   fh     ShareGPT answers, exact final-hidden teacher (same cache as topk)
#   regen  SmolLM2's own answers (talon regenerate), top-64 teacher
set -euo pipefail
phase=${1:?train or eval}
work=${2:-runs/q}
N=${N:-2000}
STEPS=${STEPS:-300}
BATCH_TOKENS=${BATCH_TOKENS:-16384}
DRAFT_VOCAB=${DRAFT_VOCAB:-32000}
MAX_NEW=${MAX_NEW:-64}
REGEN_MAX_NEW=${REGEN_MAX_NEW:-256}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:+--limit $LIMIT}   # eval only the first LIMIT prompts (smoke runs)
mkdir -p "$work"
talon() { python -m pipeline "$@"; }

train_draft() {  # name cache teacher
  talon train --cache "$2" --out "$work/run_$1" --teacher "$3" --max-steps "$STEPS" --ttt-steps 7 \
    --draft-vocab "$DRAFT_VOCAB" --batch-tokens "$BATCH_TOKENS" --lr 5e-4 --val-fraction 0.05 --log-every 20 --device "$DEVICE" \
    --json --no-progress > "$work/train_$1.json" 2> "$work/train_$1.log"
}

if [ "$phase" = train ]; then
  python bench/chat_subset.py --n "$N" --max-exchanges 2 --out "$work/sharegpt.jsonl"
  half=$(( N / 2 ))
  head -n "$half" "$work/sharegpt.jsonl" > "$work/sg_a.jsonl"
  tail -n +"$(( half + 1 ))" "$work/sharegpt.jsonl" > "$work/sg_b.jsonl"
  for s in a b; do  # the target answers the same prompts itself (two processes share the card)
    talon regenerate --target smollm2 --data "$work/sg_$s.jsonl" --out "$work/regen_$s.jsonl" \
      --max-new-tokens "$REGEN_MAX_NEW" --batch-size 128 --device "$DEVICE" --json --no-progress \
      > "$work/regen_$s.json" 2> "$work/regen_$s.log" &
  done
  talon extract --data "$work/sharegpt.jsonl" --out "$work/cache_sg" --teacher both --max-length 2048 \
    --batch-tokens 65536 --device "$DEVICE" --json --no-progress > "$work/extract_sg.json" 2> "$work/extract_sg.log"
  # One training at a time: two trainings next to two regenerations ran out of H200 memory.
  train_draft topk "$work/cache_sg" topk
  train_draft fh "$work/cache_sg" final-hidden
  wait
  cat "$work/regen_a.jsonl" "$work/regen_b.jsonl" > "$work/regen.jsonl"
  talon extract --data "$work/regen.jsonl" --out "$work/cache_regen" --max-length 2048 --batch-tokens 65536 \
    --device "$DEVICE" --json --no-progress > "$work/extract_regen.json" 2> "$work/extract_regen.log"
  train_draft regen "$work/cache_regen" topk
else
  # Three evaluations share the card: tau and acceptance are exact; each speedup compares the
  # draft with the baseline measured in the same process under the same sharing.
  for name in topk fh regen; do
    talon eval --draft "$work/run_$name/export" --prompts mt-bench --max-new-tokens "$MAX_NEW" $LIMIT --device "$DEVICE" \
      --report "$work/eval_$name.json" --plot "$work/eval_$name.png" --json --no-progress \
      > /dev/null 2> "$work/eval_$name.log" &
  done
  wait
fi
python - "$work" "$phase" <<'PY'
import json, sys
from pathlib import Path
work, phase = Path(sys.argv[1]), sys.argv[2]
def load(name):
    p = work / name
    return json.loads(p.read_text()) if p.exists() and p.stat().st_size else None
if phase == "train":
    for name in ("extract_sg", "extract_regen", "regen_a", "regen_b"):
        print(name, json.dumps(load(f"{name}.json")))
    print("| draft | data | teacher | steps | train tok/s | val acc k=0..6 | val tau_sim |\n|---|---|---|---|---|---|---|")
    for name, data, teacher in (("topk", "ShareGPT", "top-64"), ("fh", "ShareGPT", "final-hidden"), ("regen", "regenerated", "top-64")):
        t = load(f"train_{name}.json")
        if t is None:
            print(f"| {name} | {data} | {teacher} | failed | | | |"); continue
        v = t.get("validation") or {}
        acc = ", ".join(f"{a:.3f}" for a in v.get("step_accuracy", []))
        print(f"| {name} | {data} | {teacher} | {t['steps']} | {t['tokens_per_second']} | {acc} | {v.get('simulated_acceptance_length')} |")
else:
    print("| draft | tau | per-position acceptance | tok/s | baseline tok/s | speedup | greedy_equal |\n|---|---|---|---|---|---|---|")
    for name in ("topk", "fh", "regen"):
        e = load(f"eval_{name}.json")
        if e is None:
            print(f"| {name} | failed | | | | | |"); continue
        acc = ", ".join(f"{a:.3f}" for a in e["per_position_acceptance"])
        print(f"| {name} | {e['tau']:.3f} | {acc} | {e['tokens_per_s']:.1f} | {e['baseline_tokens_per_s']:.1f} | {e['speedup']:.3f} | {e['greedy_equal']} |")
PY
