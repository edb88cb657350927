#!/usr/bin/env bash
# Build the VGGT feature store of a data root on every GPU of this host (one process per GPU;
# all ranks commit into the one LMDB beside the data). For several hosts, give each host
# SHARD=I/N and a node-local STORE, then run `featstore merge` on the shards.
#
#   DATA_ROOT=/data/r2r WEIGHTS=/ckpt/VGGT-1B/model.safetensors scripts/build_features.sh
#   DATA_ROOT=/data/r2r ANNOTATIONS="/data/r2r/train.json" ATTENTION=causal FRAMES_KEPT=last \
#     TARGET_SIZE=644 scripts/build_features.sh
#
# Variables: DATA_ROOT (required), WEIGHTS (default facebook/VGGT-1B), ANNOTATIONS, STORE,
# NGPUS (default: all visible), SHARD (default 0/1), ENCODER (default vggt-1b), LAYER,
# ATTENTION, FRAMES_KEPT, TARGET_SIZE, WORKERS (decode workers per GPU, default 8),
# BATCH_FRAMES (default 16), EXTRA (more flags for `featstore build`).
set -euo pipefail
: "${DATA_ROOT:?set DATA_ROOT to the folder of the images}"
NGPUS=${NGPUS:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
args=(--data-root "$DATA_ROOT" --encoder "${ENCODER:-vggt-1b}" --weights "${WEIGHTS:-facebook/VGGT-1B}"
      --shard "${SHARD:-0/1}" --workers "${WORKERS:-8}" --batch-frames "${BATCH_FRAMES:-16}")
[ -n "${ANNOTATIONS:-}" ] && args+=(--annotations $ANNOTATIONS)
[ -n "${STORE:-}" ] && args+=(--store "$STORE")
[ -n "${LAYER:-}" ] && args+=(--layer "$LAYER")
[ -n "${ATTENTION:-}" ] && args+=(--attention "$ATTENTION")
[ -n "${FRAMES_KEPT:-}" ] && args+=(--frames-kept "$FRAMES_KEPT")
[ -n "${TARGET_SIZE:-}" ] && args+=(--target-size "$TARGET_SIZE")
echo "featstore build on $NGPUS GPU(s): ${args[*]} ${EXTRA:-}"
exec torchrun --standalone --nproc-per-node "$NGPUS" -m featstore build "${args[@]}" ${EXTRA:-}
