#!/usr/bin/env bash
# Both before/after measurements of 2026-12-02's second round, as ONE command on one GPU machine
# (device tool: carry .whl), within about 9 minutes:
#   1. benchmarks/gpu_io_run.sh  (IMAGES generated JPEGs, default 1500; DISK=0: no disk bench)
#      -> $OUT/b: env.txt, build_bench.json, build_bench.log
#   2. benchmarks/gpu_train_run.sh train with TRAIN_BENCH_ARGS (default: floor, cached and
#      vision_cached, one block each, 60 interleaved pairs each) -> $OUT/t: train_bench.{json,png,log}, env.txt
# The .md tables are dropped (the device returns at most 8 files; the JSON holds everything).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results (the device tool sets it)}"
ROOT_OUT=$OUT
rc=0
IMAGES=${IMAGES:-1500} DISK=0 OUT=$ROOT_OUT/b timeout "${BUILD_LIMIT_S:-260}" bash benchmarks/gpu_io_run.sh || rc=1
rm -f "$ROOT_OUT"/b/*.md
BUDGET_S=${TRAIN_LIMIT_S:-300} \
  TRAIN_BENCH_ARGS=${TRAIN_BENCH_ARGS:-"--modes floor,cached,vision_cached --attention sdpa --repeats 1 --steps 5 --paired 60"} \
  OUT=$ROOT_OUT/t bash benchmarks/gpu_train_run.sh train || rc=1
rm -f "$ROOT_OUT"/t/*.md
exit $rc
