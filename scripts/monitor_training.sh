#!/usr/bin/env bash
# Show how a training run is going: s/it, data time per step, feature-cache hit rate, loss, read
# from the run's logs, and GPU memory from nvidia-smi where it exists.
#
#   scripts/monitor_training.sh runs/qwen2.5-vl-vggt          # once
#   INTERVAL=30 scripts/monitor_training.sh runs/qwen2.5-vl-vggt   # every 30 s until Ctrl-C
#
# The logs: <OUTPUT_DIR>/metrics.rank<R>.jsonl, which training.trainer.FeatstoreTrainer writes on
# every rank at every logging step; where there are none (an older run), the printed log lines
# ({'loss': ..., 'data_time': ...}) in LOG_FILE (default <OUTPUT_DIR>/train*.log).
# Variables: OUTPUT_DIR (or the first argument; default runs/qwen2.5-vl-vggt), LOG_FILE,
# INTERVAL (seconds; 0, the default, prints once), PYTHON (default python).
set -euo pipefail
OUTPUT_DIR=${1:-${OUTPUT_DIR:-runs/qwen2.5-vl-vggt}}
PYTHON=${PYTHON:-python}
INTERVAL=${INTERVAL:-0}
[ -d "$OUTPUT_DIR" ] || { echo "OUTPUT_DIR=$OUTPUT_DIR is not a directory: give the run's --output_dir" >&2; exit 2; }

report() {
  "$PYTHON" - "$OUTPUT_DIR" "${LOG_FILE:-}" <<'PY'
import ast, glob, json, os, re, sys

out_dir, log_file = sys.argv[1], sys.argv[2]


def from_metrics():
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "metrics.rank*.jsonl"))):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass  # a line being written right now
    return rows


def from_printed_lines():
    rows = []
    paths = [log_file] if log_file else sorted(glob.glob(os.path.join(out_dir, "train*.log")))
    for path in paths:
        with open(path, errors="replace") as f:
            for line in f:
                m = re.search(r"\{'loss'.*\}", line)
                if m:
                    try:
                        d = ast.literal_eval(m.group(0))
                    except (ValueError, SyntaxError):
                        continue
                    rows.append({k: (float(v) if isinstance(v, str) else v) for k, v in d.items()})
    return rows


rows = from_metrics()
source = "metrics files"
if not rows:
    rows, source = from_printed_lines(), "log lines"
train = [r for r in rows if "loss" in r]
if not train:
    print(f"{out_dir}: no training log yet")
    sys.exit(0)
ranks = sorted({r.get("rank", 0) for r in train})
# Printed lines carry no step: there the last line is the latest.
last = max((r for r in train if r.get("rank", 0) == ranks[0]), key=lambda r: r.get("step", 0)) \
    if source == "metrics files" else train[-1]


def num(key, fmt):
    v = last.get(key)
    return "-" if v is None else format(float(v), fmt)


hits, misses = last.get("cache_hits"), last.get("cache_misses")
cache = "-" if hits is None else f"{num('cache_hit_rate', '.1%')} ({int(hits)} hits, {int(misses)} misses, {int(last.get('cache_computed', 0))} computed)"
print(f"step {last.get('step', '-')}  s/it {num('step_time', '.4g')}  data_time {num('data_time', '.4g')} s"
      f"  cache hit rate {cache}  loss {num('loss', '.4f')}  [{source}, ranks {len(ranks)}]")
PY
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv,noheader \
      | sed 's/^/GPU memory (index, used, total): /'
  else
    echo "GPU memory: nvidia-smi not found"
  fi
}

report
while [ "$INTERVAL" != 0 ]; do
  sleep "$INTERVAL"
  report
done
