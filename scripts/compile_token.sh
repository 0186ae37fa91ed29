#!/usr/bin/env bash
# Regenerate connector/devchain/artifacts/DevUSD.json from the Solidity source with the pinned
# npm solc (a WebAssembly build: no compiler download, works with only the npm registry).
set -euo pipefail
cd "$(dirname "$0")/.."
SOLC_VERSION=0.8.37
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm install --silent --no-audit --no-fund "solc@${SOLC_VERSION}" >/dev/null)
NODE_PATH="$work/node_modules" node - <<'JS'
const fs = require("fs");
const crypto = require("crypto");
const solc = require("solc");
const path = "connector/devchain/contracts/DevUSD.sol";
const source = fs.readFileSync(path, "utf8");
const input = {
  language: "Solidity",
  sources: { "DevUSD.sol": { content: source } },
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: "paris",
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } },
  },
};
const out = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (out.errors || []).filter((e) => e.severity === "error");
if (errors.length) { console.error(errors.map((e) => e.formattedMessage).join("\n")); process.exit(1); }
const c = out.contracts["DevUSD.sol"]["DevUSD"];
const artifact = {
  contractName: "DevUSD",
  compiler: "solc " + solc.version(),
  evmVersion: "paris",
  optimizer: { enabled: true, runs: 200 },
  sourceSha256: crypto.createHash("sha256").update(source).digest("hex"),
  abi: c.abi,
  bytecode: "0x" + c.evm.bytecode.object,
};
fs.writeFileSync("connector/devchain/artifacts/DevUSD.json", JSON.stringify(artifact, null, 2) + "\n");
console.log("wrote connector/devchain/artifacts/DevUSD.json (" + c.evm.bytecode.object.length / 2 + " bytes)");
JS
