#!/usr/bin/env bash
# Build the VGGT feature store of a data root on every GPU of this host (one process per GPU;
# all ranks commit into the one LMDB beside the data). For several hosts, give each host
# SHARD=I/N and a node-local STORE, then run `featstore merge` on the shards.
#
#   DATA_ROOT=/data/r2r WEIGHTS=/ckpt/VGGT-1B/model.safetensors scripts/build_features.sh
#   DATA_ROOT=/data/r2r WEIGHTS=facebook/VGGT-1B ANNOTATIONS="/data/r2r/train.json" RECIPE=janusvln \
#     scripts/build_features.sh
#
# Variables: DATA_ROOT (required), WEIGHTS (passed as --weights only when set: a local
# model.safetensors / model.pt, or the hub id facebook/VGGT-1B on a host with internet; vggt-tiny
# needs none), ANNOTATIONS, STORE, NGPUS (default: the GPUs torch sees; with none, one CPU
# process), SHARD (default 0/1), ENCODER (default vggt-1b), RECIPE (vgllm|janusvln: --recipe, every
# encoder setting of that repository's script), LAYER, ATTENTION, FRAMES_KEPT, TARGET_SIZE, WORKERS (decode workers per process, default 8), BATCH_FRAMES (default 16),
# PYTHON (default python), EXTRA (more flags for `featstore build`), DRY_RUN=1 (print the command only).
set -euo pipefail
: "${DATA_ROOT:?set DATA_ROOT to the folder of the images}"
PYTHON=${PYTHON:-python}
if [ -z "${NGPUS:-}" ]; then
  NGPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
fi
if [ "$NGPUS" -ge 1 ]; then
  nproc=$NGPUS; where="$NGPUS GPU(s)"
else
  nproc=1; where="no GPU visible: one CPU process"
fi
args=(--data-root "$DATA_ROOT" --encoder "${ENCODER:-vggt-1b}" --shard "${SHARD:-0/1}"
      --workers "${WORKERS:-8}" --batch-frames "${BATCH_FRAMES:-16}")
[ -n "${WEIGHTS:-}" ] && args+=(--weights "$WEIGHTS")
[ -n "${RECIPE:-}" ] && args+=(--recipe "$RECIPE")
# ANNOTATIONS may name several files separated by spaces: split it on purpose.
[ -n "${ANNOTATIONS:-}" ] && args+=(--annotations $ANNOTATIONS)
[ -n "${STORE:-}" ] && args+=(--store "$STORE")
[ -n "${LAYER:-}" ] && args+=(--layer "$LAYER")
[ -n "${ATTENTION:-}" ] && args+=(--attention "$ATTENTION")
[ -n "${FRAMES_KEPT:-}" ] && args+=(--frames-kept "$FRAMES_KEPT")
[ -n "${TARGET_SIZE:-}" ] && args+=(--target-size "$TARGET_SIZE")
cmd=(torchrun --standalone --nproc-per-node "$nproc" -m featstore build "${args[@]}")
echo "featstore build on $where: ${cmd[*]} ${EXTRA:-}"
[ "${DRY_RUN:-0}" = 1 ] && exit 0
exec "${cmd[@]}" ${EXTRA:-}
