#!/usr/bin/env bash
# Train on two (or NNODES) nodes of 8 GPUs (H800): run this on every node with the same
# MASTER_ADDR/MASTER_PORT and that node's NODE_RANK. DeepSpeed ZeRO-2 by default. The other
# settings come from the environment: scripts/train_args.sh lists them with their defaults.
#
#   node 0: MASTER_ADDR=10.0.0.1 NODE_RANK=0 DATA_ROOT=/data/r2r USE_VGGT_CACHE=true VGGT_WEIGHTS=/ckpt/VGGT-1B/model.safetensors \
#     scripts/train_2node_h800.sh
#   node 1: MASTER_ADDR=10.0.0.1 NODE_RANK=1 DATA_ROOT=/data/r2r USE_VGGT_CACHE=true VGGT_WEIGHTS=/ckpt/VGGT-1B/model.safetensors \
#     scripts/train_2node_h800.sh
#
# Own variables: MASTER_ADDR and NODE_RANK (required: a wrong default would leave the nodes
# waiting for each other), MASTER_PORT (default 29500), NNODES (default 2), NPROC_PER_NODE
# (default 8). LOG_FILE defaults to $OUTPUT_DIR/train.node<NODE_RANK>.log.
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0, the same on every node}"
: "${NODE_RANK:?set NODE_RANK to the rank of this node: 0 on the node at MASTER_ADDR, then 1 ... NNODES-1}"
source "$(dirname "$0")/train_args.sh"
LOG_FILE=${LOG_FILE:-$OUTPUT_DIR/train.node$NODE_RANK.log}
run_logged "$PYTHON" -m torch.distributed.run --nnodes "${NNODES:-2}" --node_rank "$NODE_RANK" \
  --nproc_per_node "${NPROC_PER_NODE:-8}" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  -m training.train "${train_args[@]}"
