#!/usr/bin/env bash
# Serve a VLM judge with vLLM's OpenAI-compatible server, for the `vlm_judge` reward.
#
#   launch/vllm/vllm_judge.sh qwen72b         # Qwen2.5-VL-72B-Instruct-AWQ, yes/no questions (4 GPUs)
#   launch/vllm/vllm_judge.sh unifiedreward   # UnifiedReward (Qwen2.5-VL-7B), 1-5 pointwise score (1 GPU)
#   MODEL=/path/to/vlm launch/vllm/vllm_judge.sh local   # any local VLM folder, GPU or CPU
#
# It runs launch/vllm/serve.sh, which uses the project's vLLM env (.venv-vllm, made by
# scripts/setup_vllm.sh: the GPU build on GPU machines, the CPU build elsewhere). Settings come
# from the environment, with these defaults:
#   MODEL      model id or local folder (default per judge below)
#   TP         tensor-parallel GPUs            PORT   port (8000)
#   MAX_LEN    max model length in tokens     HOST   bind address (0.0.0.0: trainers are remote)
#   MAX_SEQS   concurrent sequences           MAX_PIXELS  image size cap in pixels (~1 MP, Qwen-VL)
#   JUDGE_API_KEY  if set, clients must send it (recipe: api_key_env: JUDGE_API_KEY)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
judge="${1:-}"
extra=()
case "$judge" in
    qwen72b)
        export MODEL="${MODEL:-Qwen/Qwen2.5-VL-72B-Instruct-AWQ}"
        export TP="${TP:-4}"            # AWQ weights ~41 GB: 4 x 80 GB leaves room for the KV cache
        export MAX_LEN="${MAX_LEN:-8192}" MAX_SEQS="${MAX_SEQS:-128}"
        extra+=(--mm-processor-kwargs "{\"max_pixels\": ${MAX_PIXELS:-1003520}}")
        ;;
    unifiedreward)
        export MODEL="${MODEL:-CodeGoat24/UnifiedReward-qwen-7b}"
        export TP="${TP:-1}" MAX_LEN="${MAX_LEN:-8192}" MAX_SEQS="${MAX_SEQS:-64}"
        extra+=(--mm-processor-kwargs "{\"max_pixels\": ${MAX_PIXELS:-1003520}}")
        ;;
    local)
        [[ -n "${MODEL:-}" ]] || { echo "$0 local: set MODEL to the judge's folder" >&2; exit 2; }
        ;;
    *)
        echo "usage: $0 qwen72b|unifiedreward|local   (env: MODEL TP PORT HOST MAX_LEN MAX_SEQS MAX_PIXELS JUDGE_API_KEY)" >&2
        exit 2
        ;;
esac

export NAME="$judge"                       # the recipe's `model:` is this short name
export HOST="${HOST:-0.0.0.0}"
export API_KEY="${JUDGE_API_KEY:-}"
exec "$here/serve.sh" "$MODEL" \
    --limit-mm-per-prompt '{"image": 1, "video": 0}' \
    --max-logprobs 20 \
    --enable-prefix-caching \
    "${extra[@]}"
# --limit-mm-per-prompt: one image per judge question; --max-logprobs 20: vlm_judge asks for
# top_logprobs=20 (P(yes)); --enable-prefix-caching: the same image is asked several questions
