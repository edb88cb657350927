#!/usr/bin/env bash
# The storage benchmarks on one GPU machine, as ONE command from the repository root:
#
#   bash benchmarks/gpu_io_run.sh          (device tool: carry .whl)
#
# 1. installs the carried lmdb wheel (.whl/) into /tmp/site;
# 2. benchmarks/build_bench.py --compile: bare forward, build, compiled bare forward and compiled
#    build side by side, with the build's stage times (decode wait, encode, device->host wait,
#    serialise+CRC, commit+fsync) of each build in build_bench.json;
# 3. benchmarks/disk_bench.py: the disk's direct-I/O bandwidth (sequential, random, several queue
#    depths) and featstore's cold reads (one reader, WORKERS DataLoader workers) on the same disk.
# DISK=0 skips step 3. Results in $OUT: env.txt, build_bench.{json,md,log}, disk_bench.{json,log}.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results (the device tool sets it)}"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/io_bench_work}
IMAGES=${IMAGES:-1000}
mkdir -p "$OUT" "$WORK/build" "$WORK/disk"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/lmdb-*.whl \
  || { echo "error: installing .whl/lmdb-*.whl failed: carry .whl" >&2; exit 1; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ date -u '+%Y-%m-%d %H:%M:%S UTC'; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; df -h "$WORK" | tail -1
  "$PY" -c 'import torch, lmdb; print("torch", torch.__version__, "lmdb", lmdb.__version__)'; } >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
rc=0
"$PY" benchmarks/build_bench.py --out "$OUT" --workdir "$WORK/build" --images "$IMAGES" --naive-images 100 --compile 2>&1 \
  | tee "$OUT/build_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
if [ "${DISK:-1}" = 1 ]; then
  "$PY" benchmarks/disk_bench.py --out "$OUT" --workdir "$WORK/disk" --file-mb "${FILE_MB:-4096}" --seconds 3 \
    --entries "${ENTRIES:-1500}" --workers "${WORKERS:-8}" 2>&1 | tee "$OUT/disk_bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi
rm -rf "$WORK"
exit $rc
