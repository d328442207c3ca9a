#!/usr/bin/env bash
# Launch `r3rl train` with `accelerate launch`.
#   launch/accelerate/launch.sh RECIPE.yaml [key=value ...]
# Environment: CONFIG (default launch/accelerate/multi_gpu.yaml); NUM_PROCESSES; NUM_MACHINES,
# MACHINE_RANK, MAIN_PROCESS_IP for multi-node (run once per node); MAIN_PROCESS_PORT overrides
# the config's port (29500); ZERO=2|3 adds DeepSpeed ZeRO engines; CPU=1 runs on CPU (gloo);
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ $# -ge 1 ]] || { echo "usage: $0 RECIPE.yaml [key=value ...]" >&2; exit 2; }
recipe="$1"; shift
cmd=(accelerate launch --config_file "${CONFIG:-$HERE/multi_gpu.yaml}")
[[ -n "${NUM_PROCESSES:-}" ]] && cmd+=(--num_processes "$NUM_PROCESSES")
if [[ -n "${NUM_MACHINES:-}" ]]; then
    cmd+=(--num_machines "$NUM_MACHINES" --machine_rank "${MACHINE_RANK:?MACHINE_RANK}" \
          --main_process_ip "${MAIN_PROCESS_IP:?MAIN_PROCESS_IP}")
fi
[[ -n "${MAIN_PROCESS_PORT:-}" ]] && cmd+=(--main_process_port "$MAIN_PROCESS_PORT")
cmd+=(-m r3rl.cli train "$recipe" resume=auto)
[[ -n "${ZERO:-}" ]] && cmd+=("distributed.deepspeed=$HERE/../deepspeed/zero$ZERO.json")
cmd+=("$@")
env=()
[[ -n "${CPU:-}" ]] && env=(ACCELERATE_USE_CPU=true)
if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' ${env[@]+"${env[@]}"} "${cmd[@]}"; echo; else exec env ${env[@]+"${env[@]}"} "${cmd[@]}"; fi
