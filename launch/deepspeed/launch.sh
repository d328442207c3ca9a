#!/usr/bin/env bash
# Launch `r3rl train` with the DeepSpeed launcher, one ZeRO engine per trained policy.
#   launch/deepspeed/launch.sh RECIPE.yaml [key=value ...]
# Environment: ZERO=2|3 (default 2) picks launch/deepspeed/zero$ZERO.json; HOSTFILE (multi-node,
# see hostfile.example; default: this machine only); NUM_GPUS per node (default: all; on CPU
# machines the launcher still needs it: NUM_GPUS=2 runs 2 processes with gloo);
# MASTER_ADDR / MASTER_PORT; DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ $# -ge 1 ]] || { echo "usage: $0 RECIPE.yaml [key=value ...]" >&2; exit 2; }
recipe="$1"; shift
cmd=(deepspeed)
[[ -n "${HOSTFILE:-}" ]] && cmd+=(--hostfile "$HOSTFILE")
[[ -n "${NUM_GPUS:-}" ]] && cmd+=(--num_gpus "$NUM_GPUS")
[[ -n "${MASTER_ADDR:-}" ]] && cmd+=(--master_addr "$MASTER_ADDR")
cmd+=(--master_port "${MASTER_PORT:-29500}")
# r3rl reads LOCAL_RANK from the environment; its CLI takes no --local_rank argument
cmd+=(--no_local_rank --module r3rl.cli train "$recipe" "distributed.deepspeed=$HERE/zero${ZERO:-2}.json" resume=auto "$@")
if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
