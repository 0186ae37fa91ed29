// Sign an authCapture requirement with the official TypeScript client (@x402/evm auth-capture).
// stdin: {"clientPath": ".../auth-capture/client/index.js", "key": "0x..", "requirements": {...}}
// stdout: the client's {x402Version, payload} as JSON. Test helper only.
const { privateKeyToAccount } = require("viem/accounts");
let input = "";
process.stdin.on("data", (c) => (input += c));
process.stdin.on("end", async () => {
  const req = JSON.parse(input);
  const { AuthCaptureEvmScheme } = require(req.clientPath);
  const scheme = new AuthCaptureEvmScheme(privateKeyToAccount(req.key));
  const out = await scheme.createPaymentPayload(2, req.requirements, {});
  process.stdout.write(JSON.stringify({ scheme: scheme.scheme, ...out }));
});
