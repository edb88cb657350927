#!/usr/bin/env bash
# The training benchmarks on one GPU machine, as ONE command from the repository root:
#
#   bash benchmarks/gpu_train_run.sh [all|train|zero]        (device tool: carry .whl)
#
# 1. installs the carried wheels (.whl/: lmdb, deepspeed and the deepspeed requirements the GPU
#    image lacks; docs/PERFORMANCE.md lists them) into /tmp/site, as the device README says;
# 2. checks `import lmdb, deepspeed, training, featstore` and records the card and versions;
# 3. runs benchmarks/train_bench.py (item 1) then benchmarks/train_zero_bench.py (item 2) on one
#    shared work folder, within BUDGET_S seconds in all (default 420): train_bench gets
#    TRAIN_BUDGET_S (default 240), the DeepSpeed runs what is left (they skip runs that no
#    longer fit, in priority order, and say so);
# 4. leaves at most 8 flat files in $OUT: train_bench.{json,md,png,log},
#    train_zero_bench.{json,md,log}, env.txt.
# Exit status: non-zero when the set-up failed or a benchmark reported a failure (its JSON says
# which); partial results are written either way.
set -uo pipefail
cd "$(dirname "$0")/.."

PART=${1:-all}
case "$PART" in
  all|train|zero) ;;
  *) echo "usage: bash benchmarks/gpu_train_run.sh [all|train|zero] (got '$PART')" >&2; exit 2 ;;
esac
: "${OUT:?set OUT to the folder for the results (the device tool sets it)}"
BUDGET_S=${BUDGET_S:-420}
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-240}
WORK=${WORK:-/tmp/train_bench_work}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}  # where the wheels are installed
SMOKE_FLAG=()
[ "${SMOKE:-0}" = 1 ] && SMOKE_FLAG=(--smoke)  # tiny presets on CPU: to try this script without a GPU
start=$(date +%s)
mkdir -p "$OUT" "$WORK"

if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "error: no wheels in .whl/: carry .whl (docs/PERFORMANCE.md, 'On the GPU machine')" >&2
  exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  || { echo "error: installing the wheels in .whl/ failed" >&2; exit 1; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# deepspeed's JIT builds (if any) find ninja on PATH
export PATH="$(dirname "$(command -v "$PY")"):$PATH"

{
  date -u '+%Y-%m-%d %H:%M:%S UTC'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" - <<'EOF'
import lmdb, deepspeed, training, featstore, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())
print("transformers", transformers.__version__, "deepspeed", deepspeed.__version__, "lmdb", lmdb.__version__)
try:
    import matplotlib
    print("matplotlib", matplotlib.__version__)
except ImportError as e:
    print("matplotlib missing:", e)
EOF
} >"$OUT/env.txt" 2>&1
status=$?
cat "$OUT/env.txt"
if [ $status -ne 0 ]; then
  echo "error: the imports failed (see env.txt above)" >&2
  exit 1
fi

left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
rc=0
if [ "$PART" != zero ]; then
  train_budget=$TRAIN_BUDGET_S
  [ "$PART" = train ] && train_budget=$(( $(left) - 10 ))
  # TRAIN_BENCH_ARGS: more flags for train_bench.py, e.g. "--modes vision_cached --attention sdpa"
  # shellcheck disable=SC2086
  "$PY" benchmarks/train_bench.py --out "$OUT" --work "$WORK" --budget-s "$train_budget" "${SMOKE_FLAG[@]}" \
    ${TRAIN_BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/train_bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi
if [ "$PART" != train ]; then
  "$PY" benchmarks/train_zero_bench.py --out "$OUT" --work "$WORK" --budget-s "$(( $(left) - 10 ))" "${SMOKE_FLAG[@]}" 2>&1 \
    | tee "$OUT/train_zero_bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi
# keep the logs under the 16 MiB a returned file may have
for f in "$OUT"/*.log; do
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 4000000 ] && { tail -c 4000000 "$f" >"$f.cut" && mv "$f.cut" "$f"; }
done
echo "done in $(( $(date +%s) - start )) s; files in $OUT:"; ls -la "$OUT"
exit $rc
