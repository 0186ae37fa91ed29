#!/usr/bin/env bash
# Regenerate connector/devchain/artifacts/AuthCaptureEscrow.json (our dev-chain escrow, token
# store and collectors for x402 `authCapture`) with the same pinned npm solc as DevUSD.
# The artifact carries creation and runtime bytecode per contract: the dev chain deploys the
# collectors (their escrow address is an immutable) and copies runtime code to the canonical
# addresses with anvil_setCode.
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
const path = "connector/devchain/contracts/AuthCaptureEscrow.sol";
const source = fs.readFileSync(path, "utf8");
const input = {
  language: "Solidity",
  sources: { "AuthCaptureEscrow.sol": { content: source } },
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: "paris",
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
  },
};
const out = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (out.errors || []).filter((e) => e.severity === "error");
if (errors.length) { console.error(errors.map((e) => e.formattedMessage).join("\n")); process.exit(1); }
const wanted = ["AuthCaptureEscrow", "ERC3009PaymentCollector", "OperatorRefundCollector", "TokenStore"];
const contracts = {};
for (const name of wanted) {
  const c = out.contracts["AuthCaptureEscrow.sol"][name];
  contracts[name] = {
    abi: c.abi,
    bytecode: "0x" + c.evm.bytecode.object,
    deployedBytecode: "0x" + c.evm.deployedBytecode.object,
  };
}
const artifact = {
  compiler: "solc " + solc.version(),
  evmVersion: "paris",
  optimizer: { enabled: true, runs: 200 },
  sourceSha256: crypto.createHash("sha256").update(source).digest("hex"),
  contracts,
};
fs.writeFileSync("connector/devchain/artifacts/AuthCaptureEscrow.json", JSON.stringify(artifact, null, 2) + "\n");
for (const name of wanted) console.log(name, contracts[name].deployedBytecode.length / 2 - 1, "runtime bytes");
JS
