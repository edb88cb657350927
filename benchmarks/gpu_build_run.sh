#!/usr/bin/env bash
# The build benchmarks of docs/PERFORMANCE.md on one GPU machine, as ONE command from the
# repository root (device tool: carry .whl):
#
#   bash benchmarks/gpu_build_run.sh
#
# Installs the carried wheels (.whl/, lmdb the GPU image lacks) into /tmp/site, records the card,
# then runs, each under its own time limit and in this order (BUDGET_S seconds in all, default
# 570; a step that no longer fits is skipped and says so):
#   frame_reuse_bench.py            VGGT-1B build on JanusVLN-style annotations, per-unit vs reuse
#   vision_build_bench.py --compile the qwen2.5-vl-vision build vs its bare forward
#   vision_attention_bench.py --compile  the tower forward: stock, one_call, compiled blocks
#   frame_reuse_bench.py --compile  as the first, with the blocks compiled
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
step frame_reuse 110 "$PY" benchmarks/frame_reuse_bench.py --out "$OUT" --episodes 3 --batch-frames 72 --repeats 1
step vision_build 240 "$PY" benchmarks/vision_build_bench.py --out "$OUT" --compile --images 384
step vision_attention 60 "$PY" benchmarks/vision_attention_bench.py --out "$OUT" --compile
step frame_reuse_compiled 200 "$PY" benchmarks/frame_reuse_bench.py --out "$OUT/compiled" --episodes 3 \
  --batch-frames 72 --repeats 1 --compile
echo "done in $(( $(date +%s) - start )) s"; ls -la "$OUT"
exit $rc
