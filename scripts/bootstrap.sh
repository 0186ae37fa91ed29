#!/usr/bin/env bash
# Idempotent setup: a virtualenv with the project and its dev tools, and the pinned anvil binary.
# Safe to run again; it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

ANVIL_VERSION="${ANVIL_VERSION:-1.7.1}"
PY="${PYTHON:-python3}"

ANVIL_ONLY=0
[ "${1:-}" = "--anvil-only" ] && ANVIL_ONLY=1

if [ "$ANVIL_ONLY" = 0 ] && [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv"
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$ANVIL_ONLY" = 0 ] && [ ! -f "$stamp" ]; then
  echo "[bootstrap] installing Python dependencies"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  # setuptools prints advisory blocks while building the editable install; keep the output for
  # a failure and stay quiet on success.
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

if [ ! -x .devtools/bin/anvil ] || ! .devtools/bin/anvil --version 2>/dev/null | grep -q "Version: ${ANVIL_VERSION}"; then
  echo "[bootstrap] fetching anvil ${ANVIL_VERSION} from the npm registry"
  mkdir -p .devtools/bin
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@foundry-rs/anvil-linux-amd64@${ANVIL_VERSION}" >/dev/null 2>&1 && tar xzf ./*.tgz)
  install -m 0755 "$tmp/package/bin/anvil" .devtools/bin/anvil
  rm -rf "$tmp"
fi
# The official TypeScript x402 client (pinned), so the interop tests run instead of skipping.
if [ "$ANVIL_ONLY" = 0 ] && [ ! -d .devtools/ts-interop/node_modules/@x402/evm ]; then
  echo "[bootstrap] installing the TypeScript x402 client for interop tests"
  bash scripts/setup_ts_interop.sh >/dev/null
fi
echo "[bootstrap] ready: $(.devtools/bin/anvil --version | head -1)"
