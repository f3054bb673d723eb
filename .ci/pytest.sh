#!/usr/bin/env bash
# Runs the suite; pytest's exit code 5 ("no tests collected") is a failure, never a silent pass.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests; refusing to pass" >&2
    exit 1
fi
exit "$rc"
