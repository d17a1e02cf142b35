#!/usr/bin/env bash
# Train with torchrun (the OpenCLIP / FastCLIP habit). Single node:
#   launchers/torchrun.sh N [train args...]
# Multi-node: run on every node with NNODES, NODE_RANK and MASTER_ADDR set:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launchers/torchrun.sh 8 --config run.json
# torchrun sets OMP_NUM_THREADS=1 per rank itself.
set -euo pipefail
N=${1:?usage: $0 NPROC_PER_NODE [train args...]}
shift
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$N" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-$((29500 + RANDOM % 1000))}" \
    -m fastclip_ds.train "$@"
