#!/usr/bin/env bash
# The main job: train the shapes-world demo on CPU (tiny models built and pretrained locally,
# nothing downloaded). Extra arguments are recipe overrides, e.g. trainer.max_steps=10.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/r3rl" train recipes/shapes_cpu.yaml "$@"
