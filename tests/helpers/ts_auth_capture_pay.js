// Pay an x402 paywall with the official TypeScript stack: @x402/core's x402Client and
// x402HTTPClient with @x402/evm's auth-capture client registered, exactly as an app would.
// stdin: {"clientPath": ".../auth-capture/client/index.js", "key": "0x..", "url": "http://..",
//         "asset": "0x.." (the dev token: not a default asset, so allowed explicitly with a cap),
//         "maxAmount": "<atomic units>"}
// stdout: {"first": 402, "status": <paid status>, "body": .., "settle": .., "accepted": ..}
// Test helper only.
const { privateKeyToAccount } = require("viem/accounts");
const { x402Client, x402HTTPClient } = require("@x402/core/client");

let input = "";
process.stdin.on("data", (c) => (input += c));
process.stdin.on("end", async () => {
  const req = JSON.parse(input);
  const { AuthCaptureEvmScheme } = require(req.clientPath);
  const client = new x402Client();
  client.setSpendControls({
    allowedAssets: [{ network: "eip155:*", asset: req.asset, maxAmountPerPayment: req.maxAmount }],
  });
  client.register("eip155:*", new AuthCaptureEvmScheme(privateKeyToAccount(req.key)));
  const http = new x402HTTPClient(client);

  const first = await fetch(req.url);
  const firstBody = await first.json().catch(() => undefined);
  const required = http.getPaymentRequiredResponse((name) => first.headers.get(name), firstBody);
  const payload = await http.createPaymentPayload(required);
  const paid = await fetch(req.url, { headers: http.encodePaymentSignatureHeader(payload) });
  const text = await paid.text();
  let settle = null;
  try {
    settle = http.getPaymentSettleResponse((name) => paid.headers.get(name));
  } catch (e) {
    settle = null;
  }
  process.stdout.write(
    JSON.stringify({
      first: first.status,
      status: paid.status,
      body: text,
      settle,
      accepted: payload.accepted,
      paymentId: paid.headers.get("x-x402c-payment-id"),
    }),
  );
});
