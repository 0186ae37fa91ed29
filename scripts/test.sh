#!/usr/bin/env bash
# The test command: lint, strict typing of the domain, then the whole suite in parallel.
# pytest's exit code 5 ("no tests collected") is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.devtools/bin:$PWD/.venv/bin:$PATH"
.venv/bin/ruff check . || exit 1
.venv/bin/mypy connector || exit 1
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadgroup "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
