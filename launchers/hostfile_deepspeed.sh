#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher and a hostfile (DeepSpeed's format, one line per node):
#     worker-1 slots=8
#     worker-2 slots=8
#
# Two modes:
#  * pdsh/ssh (default): run once, on the first node. DeepSpeed starts every node over passwordless ssh
#    (pdsh must be installed; `ssh worker-2 hostname` must work without a password).
#      launchers/hostfile_deepspeed.sh hostfile [train args...]
#  * no ssh: run on EVERY node yourself (e.g. from a cluster scheduler) with NODE_RANK set to the node's
#    index in the hostfile and MASTER_ADDR to the first node's address:
#      NODE_RANK=0 MASTER_ADDR=10.0.0.1 launchers/hostfile_deepspeed.sh hostfile [train args...]
#    A one-line hostfile `localhost slots=2` with NODE_RANK=0 MASTER_ADDR=127.0.0.1 trains 2 ranks on one
#    machine this way (tests/test_launchers.py runs exactly that).
# Environment: MASTER_PORT (default 29500), OMP_NUM_THREADS (default 1 per rank).
set -euo pipefail
HOSTFILE=${1:?usage: $0 HOSTFILE [train args...]}
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PORT=${MASTER_PORT:-29500}
if [[ -n "${NODE_RANK:-}" ]]; then
    exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
        --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}" --master_port "$PORT" \
        --module fastclip_ds.train "$@"
fi
exec deepspeed --hostfile "$HOSTFILE" --master_port "$PORT" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} \
    --module fastclip_ds.train "$@"
