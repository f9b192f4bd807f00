#!/usr/bin/env bash
# Issue #3 quality comparisons on the real SmolLM2, as one pipelined job (start it detached on
# the GPU machine and poll WORK/progress.log; `bash bench/quality_smollm2.sh report WORK` prints
# the tables of whatever has finished):
#   bash bench/quality_smollm2.sh run WORK
# Drafts (same prompts, same steps, K=7, draft vocab 32k):
#   topk   ShareGPT answers, top-64 teacher
#   fh     ShareGPT answers, exact final-hidden teacher (same cache as topk)
#   regen  SmolLM2's own answers (talon regenerate), top-64 teacher
# Decoding the 135M target with HF eager is bound by host overhead (about 74 ms a forward on an
# H200), so regeneration and evaluation run as several processes sharing the card: REGEN_SHARDS
# slices of the data, and EVAL_SHARDS prompt shards per draft (`talon eval --shard-index`),
# joined by `talon eval-merge`.  Each shard times its speculative and baseline decoding in the
# same process, prompt by prompt, so the speedup compares like with like under the same load.
set -uo pipefail
phase=${1:?run or report}
work=${2:-runs/q}
N=${N:-2000}
STEPS=${STEPS:-300}
BATCH_TOKENS=${BATCH_TOKENS:-16384}
DRAFT_VOCAB=${DRAFT_VOCAB:-32000}
MAX_NEW=${MAX_NEW:-64}
REGEN_MAX_NEW=${REGEN_MAX_NEW:-256}
REGEN_SHARDS=${REGEN_SHARDS:-8}
REGEN_BATCH=${REGEN_BATCH:-64}  # 128 took 13-21 GB a process on an H200: 8 of them and a training did not fit
EVAL_SHARDS=${EVAL_SHARDS:-4}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:+--limit $LIMIT}   # eval only the first LIMIT prompts (smoke runs)
mkdir -p "$work"
talon() { python -m pipeline "$@"; }
log() { echo "$(date +%T) $*" >> "$work/progress.log"; }

train_draft() {  # name cache teacher
  log "train $1 start"
  talon train --cache "$2" --out "$work/run_$1" --teacher "$3" --max-steps "$STEPS" --ttt-steps 7 \
    --draft-vocab "$DRAFT_VOCAB" --batch-tokens "$BATCH_TOKENS" --lr 5e-4 --val-fraction 0.05 --log-every 20 --device "$DEVICE" \
    --json --no-progress > "$work/train_$1.json" 2> "$work/train_$1.log"
  log "train $1 exit $?"
}

eval_draft() {  # name: EVAL_SHARDS processes, then merge (runs in the background)
  (
    log "eval $1 start"
    pids=()
    for ((i = 0; i < EVAL_SHARDS; i++)); do
      OMP_NUM_THREADS=1 python -m pipeline eval --draft "$work/run_$1/export" --prompts mt-bench --max-new-tokens "$MAX_NEW" \
        $LIMIT --device "$DEVICE" --shard-index "$i" --num-shards "$EVAL_SHARDS" --report "$work/eval_$1.$i.json" \
        --plot "$work/eval_$1.$i.png" --json --no-progress > /dev/null 2> "$work/eval_$1.$i.log" &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    talon eval-merge "$work"/eval_"$1".[0-9]*.json --report "$work/eval_$1.json" --plot "$work/eval_$1.png" --json \
      > /dev/null 2> "$work/eval_$1.merge.log"
    log "eval $1 merged exit $?"
  ) &
}

if [ "$phase" = run ]; then
  log "subset start"
  if [ -n "${SUBSET:-}" ]; then  # a subset made beforehand (bench/chat_subset.py), e.g. to skip staging the data wheel
    cp "$SUBSET" "$work/sharegpt.jsonl"
  else
    python bench/chat_subset.py --n "$N" --max-exchanges 2 --out "$work/sharegpt.jsonl" || { log "subset failed"; exit 1; }
  fi
  # Convert the GGUF once before a dozen processes ask for it.
  python -c "from stage_extract.target import resolve_target; resolve_target('smollm2')" || { log "convert failed"; exit 1; }
  split -n "l/$REGEN_SHARDS" -d "$work/sharegpt.jsonl" "$work/sg_part_"
  regen_pids=()
  for part in "$work"/sg_part_*; do  # the target answers the same prompts itself
    s=${part##*_}
    OMP_NUM_THREADS=1 python -m pipeline regenerate --target smollm2 --data "$part" --out "$work/regen_$s.jsonl" \
      --max-new-tokens "$REGEN_MAX_NEW" --batch-size "$REGEN_BATCH" --device "$DEVICE" --json --no-progress \
      > "$work/regen_$s.json" 2> "$work/regen_$s.log" &
    regen_pids+=($!)
  done
  log "extract sg start"
  talon extract --data "$work/sharegpt.jsonl" --out "$work/cache_sg" --teacher both --max-length 2048 \
    --batch-tokens 65536 --device "$DEVICE" --json --no-progress > "$work/extract_sg.json" 2> "$work/extract_sg.log"
  log "extract sg exit $?"
  # One training at a time: two trainings next to two regenerations ran out of H200 memory.
  train_draft topk "$work/cache_sg" topk
  eval_draft topk
  train_draft fh "$work/cache_sg" final-hidden
  eval_draft fh
  for pid in "${regen_pids[@]}"; do wait "$pid"; done
  log "regenerate done"
  cat "$work"/regen_[0-9]*.jsonl > "$work/regen.jsonl"
  talon extract --data "$work/regen.jsonl" --out "$work/cache_regen" --max-length 2048 --batch-tokens 65536 \
    --device "$DEVICE" --json --no-progress > "$work/extract_regen.json" 2> "$work/extract_regen.log"
  log "extract regen exit $?"
  train_draft regen "$work/cache_regen" topk
  eval_draft regen
  wait
  log "all done"
elif [ "$phase" = sharegpt-drafts ]; then  # (re)train and evaluate the two ShareGPT drafts once the card has room
  until grep -q "regenerate done" "$work/progress.log" 2>/dev/null; do sleep 5; done
  train_draft topk "$work/cache_sg" topk
  eval_draft topk
  train_draft fh "$work/cache_sg" final-hidden
  eval_draft fh
  wait
  log "sharegpt drafts done"
fi

python - "$work" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
def load(name):
    p = work / name
    try:
        return json.loads(p.read_text()) if p.exists() and p.stat().st_size else None
    except json.JSONDecodeError:
        return None
for name in ("extract_sg", "extract_regen"):
    print(name, json.dumps(load(f"{name}.json")))
regen = [load(p.name) for p in sorted(work.glob("regen_[0-9]*.json"))]
regen = [r for r in regen if r]
if regen:
    tokens, seconds = sum(r["generated_tokens"] for r in regen), max(r["seconds"] for r in regen)
    print(f"regenerate: {sum(r['records_written'] for r in regen)} conversations, {tokens} tokens, "
          f"{len(regen)} processes, {seconds:.0f} s (slowest), {tokens / max(seconds, 1e-9):.0f} tok/s together")
print("| draft | data | teacher | steps | train tok/s | val acc k=0..6 | val tau_sim |\n|---|---|---|---|---|---|---|")
for name, data, teacher in (("topk", "ShareGPT", "top-64"), ("fh", "ShareGPT", "final-hidden"), ("regen", "regenerated", "top-64")):
    t = load(f"train_{name}.json")
    if t is None:
        print(f"| {name} | {data} | {teacher} | not finished | | | |"); continue
    v = t.get("validation") or {}
    acc = ", ".join(f"{a:.3f}" for a in v.get("step_accuracy", []))
    print(f"| {name} | {data} | {teacher} | {t['steps']} | {t['tokens_per_second']} | {acc} | {v.get('simulated_acceptance_length')} |")
print("| draft | turns | tau | tau_sim | per-position acceptance | tok/s | baseline tok/s | speedup | greedy_equal |\n|---|---|---|---|---|---|---|---|---|")
for name in ("topk", "fh", "regen"):
    e = load(f"eval_{name}.json")
    if e is None:
        print(f"| {name} | not finished | | | | | | | |"); continue
    acc = ", ".join(f"{a:.3f}" for a in e["per_position_acceptance"])
    print(f"| {name} | {e['turns']} | {e['tau']:.3f} | {e['simulated_tau']} | {acc} | {e['tokens_per_s']:.1f} | "
          f"{e['baseline_tokens_per_s']:.1f} | {e['speedup']:.3f} | {e['greedy_equal']} ({len(e['mismatches'])} turns differ) |")
PY
