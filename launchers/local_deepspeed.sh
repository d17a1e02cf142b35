#!/usr/bin/env bash
# Train on this machine with the deepspeed launcher: N ranks (GPUs, or CPU processes on gloo).
#   launchers/local_deepspeed.sh N [train args...]
#   launchers/local_deepspeed.sh 2 --config my_run.json --deepspeed_config ds_configs/cpu_zero2_fp32.json
# Environment: MASTER_PORT (default: random in 29500-30499), OMP_NUM_THREADS (default 1 per rank on CPU).
set -euo pipefail
N=${1:?usage: $0 NUM_RANKS [train args...]}
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the deepspeed launcher does not set it; 2 ranks on 2 cores oversubscribe otherwise
exec deepspeed --num_gpus "$N" --master_port "${MASTER_PORT:-$((29500 + RANDOM % 1000))}" \
    --module fastclip_ds.train "$@"
