#!/usr/bin/env bash
# Serve a VLM judge with vLLM's OpenAI-compatible server, for the `vlm_judge` reward.
#
#   launch/vllm/vllm_judge.sh qwen72b         # Qwen2.5-VL-72B-Instruct-AWQ, yes/no questions (4 GPUs)
#   launch/vllm/vllm_judge.sh unifiedreward   # UnifiedReward (Qwen2.5-VL-7B), 1-5 pointwise score (1 GPU)
#
# Run it in the judge's own environment (vllm pins its own torch/transformers; see README.md
# beside this script). Settings come from the environment, with these defaults:
#   MODEL      model id or local folder (default per judge below)
#   TP         tensor-parallel GPUs            PORT   port (8000)
#   MAX_LEN    max model length in tokens     HOST   bind address (0.0.0.0: trainers are remote)
#   MAX_SEQS   concurrent sequences           MAX_PIXELS  image size cap in pixels (~1 MP)
#   JUDGE_API_KEY  if set, clients must send it (recipe: api_key_env: JUDGE_API_KEY)
set -euo pipefail

judge="${1:-}"
case "$judge" in
    qwen72b)
        MODEL="${MODEL:-Qwen/Qwen2.5-VL-72B-Instruct-AWQ}"
        TP="${TP:-4}"            # AWQ weights ~41 GB: 4 x 80 GB leaves room for the KV cache
        MAX_LEN="${MAX_LEN:-8192}"
        MAX_SEQS="${MAX_SEQS:-128}"
        ;;
    unifiedreward)
        MODEL="${MODEL:-CodeGoat24/UnifiedReward-qwen-7b}"
        TP="${TP:-1}"
        MAX_LEN="${MAX_LEN:-8192}"
        MAX_SEQS="${MAX_SEQS:-64}"
        ;;
    *)
        echo "usage: $0 qwen72b|unifiedreward   (env: MODEL TP PORT HOST MAX_LEN MAX_SEQS MAX_PIXELS JUDGE_API_KEY)" >&2
        exit 2
        ;;
esac

args=(
    "$MODEL"
    --host "${HOST:-0.0.0.0}"
    --port "${PORT:-8000}"
    --served-model-name "$judge"          # the recipe's `model:` is this short name
    --tensor-parallel-size "$TP"
    --max-model-len "$MAX_LEN"
    --max-num-seqs "$MAX_SEQS"
    --gpu-memory-utilization "${GPU_MEM:-0.90}"
    --limit-mm-per-prompt '{"image": 1, "video": 0}'   # one image per judge question
    --mm-processor-kwargs "{\"max_pixels\": ${MAX_PIXELS:-1003520}}"
    --max-logprobs 20                     # vlm_judge asks for top_logprobs=20 (yes/no probability)
    --enable-prefix-caching               # the same image is asked several questions
)
if [[ -n "${JUDGE_API_KEY:-}" ]]; then
    args+=(--api-key "$JUDGE_API_KEY")
fi
exec vllm serve "${args[@]}"
