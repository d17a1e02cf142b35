#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher and a hostfile (DeepSpeed's format, one line per node):
#     worker-1 slots=8
#     worker-2 slots=8
#
# Two modes:
#  * pdsh/ssh (default): run once, on the first node. DeepSpeed starts every node over passwordless ssh
#    (pdsh must be installed; `ssh worker-2 hostname` must work without a password), in this directory's path
#    (the same checkout on every node). MASTER_ADDR defaults to the first host's `hostname -I`.
#      launchers/hostfile_deepspeed.sh hostfile [train args...]
#    tests/test_launchers.py checks the pdsh command DeepSpeed's runner builds (with a fake ssh and pdsh).
#  * no ssh: run on EVERY node yourself (e.g. from a cluster scheduler) with NODE_RANK set to the node's
#    index in the hostfile and MASTER_ADDR to the first node's address:
#      NODE_RANK=0 MASTER_ADDR=10.0.0.1 launchers/hostfile_deepspeed.sh hostfile [train args...]
#    A one-line hostfile `localhost slots=2` with NODE_RANK=0 MASTER_ADDR=127.0.0.1 trains 2 ranks on one
#    machine this way (tests/test_launchers.py runs exactly that, with ds_configs/cpu_zero1_fp32.json).
# Environment: MASTER_PORT (default 29500), OMP_NUM_THREADS (default 1 per rank, on this node: in pdsh mode
# DeepSpeed passes the other nodes only PYTHON*, MLFLOW*, UCX*, MV2* variables and the KEY=VALUE lines of a
# .deepspeed_env file in ~ or here, or of $DS_ENV_FILE; put OMP_NUM_THREADS=1 there).
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
