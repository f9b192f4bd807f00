#!/usr/bin/env bash
# Run bench/gpu_suite.sh detached on the GPU machine, so it outlives one device call, and poll it.
#   bash bench/gpu_detached.sh start DIR        # copies the tree to DIR/tree, starts the suite there
#   bash bench/gpu_detached.sh poll DIR SECONDS  # waits up to SECONDS for it to end, tails the log,
#                                                # copies DIR/out (tables and logs) under $OUT
# The tree is copied because each device call re-syncs the working tree under the running job.
# SUITE and the other gpu_suite.sh variables pass through the environment of `start`.
set -u
cmd=$1; dir=$2
case $cmd in
  start)
    mkdir -p "$dir/out"
    rm -rf "$dir/tree" && cp -r . "$dir/tree"
    (cd "$dir/tree" && setsid nohup bash -c "bash bench/gpu_suite.sh '$dir/out'; echo SUITE-DONE" \
      > "$dir/suite.log" 2>&1 < /dev/null &)
    sleep 2; cat "$dir/suite.log" ;;
  poll)
    limit=${3:-500}; started=$(date +%s)
    while ! grep -q SUITE-DONE "$dir/suite.log" && [ $(( $(date +%s) - started )) -lt "$limit" ]; do sleep 5; done
    grep -v "^DEBUG" "$dir/suite.log" | tail -n 120
    if [ -n "${OUT:-}" ]; then tar -C "$dir" -czf "$OUT/suite.tgz" out suite.log; fi
    grep -q SUITE-DONE "$dir/suite.log" && echo "== finished" || echo "== still running" ;;
  *) echo "usage: gpu_detached.sh start|poll DIR [SECONDS]"; exit 2 ;;
esac
