"""Signature verification throughput on one core: ours vs the SDK vs raw coincurve.

The three are measured in interleaved rounds (ours, SDK, raw, ours, SDK, raw, ...) and the median
of each reported, with the ratio taken per round, because this shared machine's speed drifts by
tens of percent over seconds. ``--smoke`` runs a tiny size (the test suite does, so the bench
cannot rot); it prints the same figures and records nothing unless ``BENCH_RESULTS_DIR`` is set.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from coincurve import PublicKey
from eth_account import Account
from x402.mechanisms.evm.eip712 import hash_eip3009_authorization
from x402.mechanisms.evm.types import ExactEIP3009Authorization
from x402.mechanisms.evm.verify import verify_eoa_signature

from connector.x402 import exact_evm
from connector.x402.requirement import Requirement

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record

SMOKE = "--smoke" in sys.argv
N = int(os.environ.get("BENCH_N", "50" if SMOKE else "5000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1" if SMOKE else "7"))


def rate(fn, n: int = N) -> float:  # type: ignore[no-untyped-def]
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    account = Account.create()
    req = Requirement(
        scheme="exact", network="eip155:84532", amount=10_000,
        asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e", pay_to=Account.create().address,
        max_timeout_seconds=300, extra={"name": "USDC", "version": "2"},
    )  # fmt: skip
    signed = exact_evm.sign_exact(account, req)
    payload = signed.payload
    now = int(time.time())

    def ours() -> None:
        result = exact_evm.verify_exact_offline(
            payload, req, scheme="exact", network=req.network, now=now
        )
        assert result.is_valid

    auth = payload.authorization
    sdk_auth = ExactEIP3009Authorization(
        from_address=auth.from_, to=auth.to, value=str(auth.value),
        valid_after=str(auth.valid_after), valid_before=str(auth.valid_before), nonce=auth.nonce,
    )  # fmt: skip

    def sdk() -> None:
        digest = hash_eip3009_authorization(sdk_auth, 84532, req.asset, "USDC", "2")
        assert verify_eoa_signature(digest, payload.signature, auth.from_)

    digest = exact_evm.authorization_digest(
        auth, token_name="USDC", token_version="2", chain_id=84532, asset=req.asset
    )
    sig = payload.signature[:64] + bytes([payload.signature[64] - 27])

    def raw() -> None:
        PublicKey.from_signature_and_message(sig, digest, hasher=None)

    def ours_sign() -> None:
        exact_evm.sign_exact(account, req)

    runs: dict[str, list[float]] = {"ours": [], "sdk": [], "raw": []}
    vs_raw: list[float] = []
    vs_sdk: list[float] = []
    for _ in range(ROUNDS):
        r_ours, r_sdk, r_raw = rate(ours), rate(sdk), rate(raw)
        runs["ours"].append(r_ours)
        runs["sdk"].append(r_sdk)
        runs["raw"].append(r_raw)
        vs_raw.append(r_ours / r_raw)
        vs_sdk.append(r_ours / r_sdk)
    m = {k: statistics.median(v) for k, v in runs.items()}
    ratio_raw, ratio_sdk = statistics.median(vs_raw), statistics.median(vs_sdk)
    print(f"verify/s (one core, signature part, N={N} per run, {ROUNDS} interleaved rounds)")
    print(f"  ours (digest + coincurve recover + all field checks): {m['ours']:10,.0f}/s")
    print(f"  official SDK hash_eip3009_authorization + verify_eoa: {m['sdk']:10,.0f}/s")
    print(f"  raw coincurve recover (no hashing, no checks):        {m['raw']:10,.0f}/s")
    print(f"  ours / SDK = {ratio_sdk:.2f}x   ours / raw = {ratio_raw:.2f}x  (medians of rounds)")
    sign_rate = rate(ours_sign, max(1, N // 4))
    print(f"sign/s: ours {sign_rate:,.0f}/s")
    record.write(
        "verify",
        [
            record.row(
                "exact-EVM signature verification, one core (vs raw coincurve recover)",
                f"{m['ours']:,.0f}/s",
                f"raw coincurve recover {m['raw']:,.0f}/s",
                ratio_raw,
            ),
            record.row(
                "exact-EVM signature verification, one core (vs official SDK)",
                f"{m['ours']:,.0f}/s",
                f"SDK hash + verify_eoa {m['sdk']:,.0f}/s",
                ratio_sdk,
            ),
        ],
        smoke=SMOKE,
    )


if __name__ == "__main__":
    main()
