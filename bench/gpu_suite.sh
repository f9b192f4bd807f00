#!/usr/bin/env bash
# The GPU measurements of issues #2 and #6 in one call (after staging, see ../shared/gpu/README.md):
#   SUITE="tests multi train extract reader writer io" bash bench/gpu_suite.sh [OUT_DIR]
# Each step writes its table and log under OUT_DIR (default $OUT, else bench-out) and the suite
# goes on after a failed step. `multi` needs 2 GPUs and runs first, so that a 2-GPU lease is
# spent on what needs it; the single-GPU steps then use GPU 0 alone. All five take roughly 15
# minutes on an H100, more than one 10-minute device call: split them, e.g.
# SUITE="tests multi" then SUITE="train" then SUITE="extract reader", or run it detached
# (bench/gpu_detached.sh) and poll.
set -u
out=${1:-${OUT:-bench-out}}
suite=${SUITE:-tests multi train extract reader}
mkdir -p "$out"
syn=${SYNTHETIC_CACHE:-/tmp/talon-bench-synthetic}  # synthetic 8B-shape caches (each bench sizes its own)

step() {  # name command...: run, keep the last lines of its output, never stop the suite
  local name=$1; shift
  echo "== $name: $*"
  local started=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  echo "== $name exit $? in $((SECONDS - started)) s"
  grep -v "^DEBUG" "$out/$name.log" | tail -n 25
}

gpus=$(python -c "import torch; print(torch.cuda.device_count())")
for item in $suite; do
  case $item in
    tests) step gpu_tests python -m pytest -m gpu -q -p no:cacheprovider ;;
    multi)
      if [ "$gpus" -ge 2 ]; then
        step multi_gpu python bench/multi_gpu_train.py --device cuda --nproc 2 --steps ${MULTI_STEPS:-15} \
          --cache "$syn-multi" --out "$out/multi_gpu.json"
      else
        echo "== multi_gpu skipped: $gpus GPU(s)"
      fi ;;
    train)  # the defaults (compiled step on CUDA) in every mode, then on the draft step alone: the eager
      # step (the comparison for --compile-step) and the reference soft CE (for --soft-ce fused)
      common="--device cuda --batch-tokens 8192,16384 --steps ${TRAIN_STEPS:-12} --warmup 4 --cache $syn-train"
      step train_speed env CUDA_VISIBLE_DEVICES=0 python bench/train_speed.py $common --profile 2 \
        --out "$out/train_speed.json"
      step train_speed_eager env CUDA_VISIBLE_DEVICES=0 python bench/train_speed.py $common --modes draft --profile 2 \
        --no-compile-step --out "$out/train_speed_eager.json"
      step train_speed_reference_ce env CUDA_VISIBLE_DEVICES=0 python bench/train_speed.py $common --modes draft \
        --soft-ce reference --out "$out/train_speed_reference_ce.json" ;;
    extract) step extract_speed env CUDA_VISIBLE_DEVICES=0 python bench/extract_speed.py --device cuda --sample-threads ;;
    reader) step reader_speed env CUDA_VISIBLE_DEVICES=0 python bench/reader_speed.py --device cuda ;;
    writer)  # the SmolLM2-shaped part writer without a model, beside the disk in its own write pattern
      step disk_speed python bench/disk_speed.py --gib 4 --threads 1,3 --write-mb 16.777216,0.75
      step writer_speed python bench/writer_speed.py --hidden 576 --vocab 49152 --tokens 2000000 --part-tokens 65536 \
        --batch-tokens 32768 --busy 0 --only-handoff ;;
    io)  # what bounds SmolLM2's writing on this host (about 8 minutes): the disk at 1, 3 and 6 threads
      # (page cache, and with writeback started after every write), the part writer alone on the disk
      # and in memory (tmpfs), each with the cores its threads kept busy and the GIL probe; then the
      # extraction with the same probes, on the disk (also with a tokenizer thread, and pretokenised)
      # and in memory.  Ninth session's answers (more
      # writer or sync threads, more parts in flight, raw aux planes, O_DIRECT: no help) are in
      # BENCHMARKS.md; disk_speed/writer_speed take those settings for a rerun.
      step io_disk python bench/disk_speed.py --gib 4 --threads 1,3,6 --write-modes buffered,streamed
      handoff="python bench/writer_speed.py --hidden 576 --vocab 49152 --tokens 2000000 --part-tokens 65536 \
        --batch-tokens 32768 --busy 0 --only-handoff --thread-cpu"
      step io_writer_default $handoff
      if [ -d /dev/shm ]; then
        step io_writer_tmpfs env TMPDIR=/dev/shm $handoff
        rm -rf /dev/shm/talon-*
      fi
      # bf16/topk, then bf16/both (the final state too: ~1.4x the bytes per token, more than the disk takes)
      step io_extract env CUDA_VISIBLE_DEVICES=0 python bench/extract_speed.py --device cuda --skip-8b --tokens 4000000 \
        --settings bf16/topk,bf16/both --no-compare-padded --no-compare-eager --disk-gib 2 --thread-cpu
      # the same without tokenizer processes (a thread tokenises beside the writers: the tenth session's
      # baseline) and with nothing tokenising beside the run (the ceiling)
      step io_extract_thread env CUDA_VISIBLE_DEVICES=0 python bench/extract_speed.py --device cuda --skip-8b \
        --tokens 4000000 --settings bf16/topk --no-compare-padded --no-compare-eager --disk-gib 0 --thread-cpu \
        --tokenizer-workers 0
      step io_extract_pretokenized env CUDA_VISIBLE_DEVICES=0 python bench/extract_speed.py --device cuda --skip-8b \
        --tokens 4000000 --settings bf16/topk --no-compare-padded --no-compare-eager --disk-gib 0 --thread-cpu \
        --pretokenized
      # the same extraction into memory (tmpfs): what the pipeline reaches with no disk at all
      if [ -d /dev/shm ]; then
        step io_extract_tmpfs env TMPDIR=/dev/shm CUDA_VISIBLE_DEVICES=0 python bench/extract_speed.py --device cuda \
          --skip-8b --tokens 4000000 --settings bf16/topk --no-compare-padded --no-compare-eager --disk-gib 1 --thread-cpu
        rm -rf /dev/shm/talon-*
      fi ;;
    *) echo "unknown suite item: $item (tests, multi, train, extract, reader, writer, io)" ;;
  esac
done
