#!/usr/bin/env bash
# Install the official TypeScript x402 EVM client (@x402/evm, pinned), its x402Client
# (@x402/core) and viem into .devtools/ts-interop, for tests/integration/test_auth_capture_ts_interop.py
# and tests/e2e/test_auth_capture_receive.py (skipped without them).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.devtools/ts-interop
mkdir -p "$dest"
(cd "$dest" && npm install --silent --no-audit --no-fund --no-save \
  "@x402/evm@2.27.0" "@x402/core@2.27.0" "viem@2.48.11" >/dev/null)
echo "installed into $dest/node_modules"
