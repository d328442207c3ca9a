#!/usr/bin/env bash
# Run the test suite in the repo's .venv (created on first use). Extra arguments go to pytest.
# Fails when a test fails and also when pytest collects no tests (its exit code 5).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
# vLLM's own env (.venv-vllm) for the tests against a real vLLM server (tests/test_vllm_*.py).
# If it cannot be built those tests fail, naming the fix; R3RL_SKIP_VLLM=1 skips both.
if [[ "${R3RL_SKIP_VLLM:-}" != 1 ]]; then
    "$ROOT/scripts/setup_vllm.sh" || echo "test.sh: the vLLM env could not be built; its tests will fail" >&2
fi
cd "$ROOT"
# lint (line length included) and formatting of the library, before the tests
"$ROOT/.venv/bin/ruff" check r3rl
"$ROOT/.venv/bin/ruff" format --check r3rl
status=0
"$ROOT/.venv/bin/python" -m pytest -q "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "test.sh: pytest collected no tests" >&2
fi
exit "$status"
