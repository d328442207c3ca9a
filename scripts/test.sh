#!/usr/bin/env bash
# Run the test suite in the repo's .venv (created on first use). Extra arguments go to pytest.
# Fails when a test fails and also when pytest collects no tests (its exit code 5).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
status=0
"$ROOT/.venv/bin/python" -m pytest -q "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "test.sh: pytest collected no tests" >&2
fi
exit "$status"
