#!/usr/bin/env bash
# The build benchmarks of docs/PERFORMANCE.md on one GPU machine, as ONE command from the
# repository root (device tool: carry .whl):
#
#   bash benchmarks/gpu_build_run.sh
#
# Installs the carried wheels (.whl/, lmdb the GPU image lacks) into /tmp/site, records the card,
# then runs, each under its own time limit and in this order (BUDGET_S seconds in all, default
# 570; a step that no longer fits is skipped and says so):
#   gpu_tests                       the tests marked `gpu` (CUDA-only paths of the build: pinned
#                                   frames, uint8 frames made float32 on the GPU, frame reuse);
#                                   needs the pytest wheels in .whl/ (docs/PERFORMANCE.md)
#   frame_reuse_bench.py            VGGT-1B build on JanusVLN-style annotations, per-unit vs reuse
#   vision_build_bench.py --compile the qwen2.5-vl-vision build vs its bare forward
#   vision_attention_bench.py --compile  the tower forward: stock, one_call, compiled blocks
#   frame_reuse_bench.py --compile  as the first, with the blocks compiled
#   vision_build_probe.py           where the vision build's time goes: bare forward and builds,
#                                   compiled and eager, the loader pinning or not, 4 or 8 workers,
#                                   and the compiled blocks under CUDA graphs
# STEPS="vision_build frame_reuse_compiled" runs only the steps named.
# Results: $OUT/<benchmark>.json (the compiled frame-reuse run in $OUT/compiled/), logs, env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results (the device tool sets it)}"
BUDGET_S=${BUDGET_S:-570}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
start=$(date +%s)
mkdir -p "$OUT/compiled"
if ! ls .whl/lmdb-*.whl >/dev/null 2>&1; then
  echo "error: no lmdb wheel in .whl/: carry .whl (docs/PERFORMANCE.md, 'On the GPU machine')" >&2
  exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  || { echo "error: installing the wheels in .whl/ failed" >&2; exit 1; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ date -u '+%Y-%m-%d %H:%M:%S UTC'; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, transformers, lmdb; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} >"$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; exit 1; }
cat "$OUT/env.txt"

rc=0
step() {  # step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, what is left), log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi  # STEPS="a b": only those
  local left=$(( BUDGET_S - ($(date +%s) - start) ))
  (( limit > left )) && limit=$left
  if (( limit < 30 )); then echo "skipped $name: ${left} s left" | tee -a "$OUT/skipped.txt"; return; fi
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local status=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] || { echo "$name exited $status" | tee -a "$OUT/failed.txt"; rc=1; }
}
if "$PY" -c "import pytest" 2>/dev/null; then
  mapfile -t gpu_files < <(grep -l 'mark.gpu' tests/test_*.py)  # the others import test-only packages
  step gpu_tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${gpu_files[@]}"
elif [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" gpu_tests "* ]]; then
  echo "skipped gpu_tests: no pytest (carry its wheels in .whl/: docs/PERFORMANCE.md)" | tee -a "$OUT/skipped.txt"
fi
step frame_reuse 110 "$PY" benchmarks/frame_reuse_bench.py --out "$OUT" --episodes 3 --batch-frames 72 --repeats 1
step vision_build 240 "$PY" benchmarks/vision_build_bench.py --out "$OUT" --compile --images 384
step vision_attention 60 "$PY" benchmarks/vision_attention_bench.py --out "$OUT" --compile
step frame_reuse_compiled 200 "$PY" benchmarks/frame_reuse_bench.py --out "$OUT/compiled" --episodes 3 \
  --batch-frames 72 --repeats 1 --compile
step vision_build_probe 400 "$PY" benchmarks/vision_build_probe.py --out "$OUT" --images 512 \
  --steps "bare_c16 build_c16_w4_pin build_c16_w4_nopin same_pin_vs_nopin bare_e16 build_e16_w4_pin build_c16_w8_pin bare_c16_graphs"
echo "done in $(( $(date +%s) - start )) s"; ls -la "$OUT"
exit $rc
