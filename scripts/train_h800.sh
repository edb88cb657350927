#!/usr/bin/env bash
# Train Qwen2.5-VL with VGGT geometry features on one node of 8 GPUs (H800): torchrun, one
# process per GPU, DeepSpeed ZeRO-2 by default. All settings come from the environment:
# scripts/train_args.sh lists them with their defaults.
#
#   DATA_ROOT=/data/r2r ANNOTATIONS=/data/r2r/train.json USE_VGGT_CACHE=true \
#     VGGT_WEIGHTS=/ckpt/VGGT-1B/model.safetensors scripts/train_h800.sh
#   DATA_ROOT=/data/r2r VGGT_WEIGHTS=/ckpt/VGGT-1B/model.safetensors VGGT_MODE=online_causal_stream \
#     VGGT_FUSION=last_to_all VGGT_SCALE=0.2 DEEPSPEED=training/configs/zero3.json scripts/train_h800.sh
#
# Own variables: NPROC_PER_NODE (default 8).
set -euo pipefail
source "$(dirname "$0")/train_args.sh"
run_logged "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "${NPROC_PER_NODE:-8}" \
  -m training.train "${train_args[@]}"
