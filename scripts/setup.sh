#!/usr/bin/env bash
# Create or reuse .venv at the repo root and install r3rl with its dev extras.
# Idempotent: a stamp inside .venv, keyed by pyproject.toml, this script and the GPU check,
# makes a second run return at once. Without an NVIDIA GPU, torch is pinned to the CPU build
# first, so resolving `torch>=2.4` never downloads a multi-GB CUDA wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
CPU_TORCH="torch==2.13.0"

if command -v nvidia-smi >/dev/null 2>&1; then gpu=yes; else gpu=no; fi
key="$(cat "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)-gpu=$gpu"
stamp="$VENV/.r3rl-setup-stamp"
if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "r3rl needs Python >= 3.10 (set PYTHON=/path/to/python3.x)" >&2; exit 1; }
    echo "creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if [[ $gpu == no ]]; then
    echo "no NVIDIA GPU found: installing the CPU build of torch ($CPU_TORCH)" >&2
    "${pip[@]}" "$CPU_TORCH"
fi
echo "installing r3rl[dev] into $VENV" >&2
"${pip[@]}" -e "$ROOT[dev]"
echo "$key" >"$stamp"
