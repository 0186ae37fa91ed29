"""Signature verification throughput on one core: ours vs the SDK vs raw coincurve."""

from __future__ import annotations

import os
import time

from coincurve import PublicKey
from eth_account import Account
from x402.mechanisms.evm.eip712 import hash_eip3009_authorization
from x402.mechanisms.evm.types import ExactEIP3009Authorization
from x402.mechanisms.evm.verify import verify_eoa_signature

from connector.x402 import exact_evm
from connector.x402.requirement import Requirement

N = int(os.environ.get("BENCH_N", "20000"))


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

    print(f"verify/s (one core, signature part, N={N})")
    r_ours, r_sdk, r_raw = rate(ours), rate(sdk), rate(raw)
    print(f"  ours (digest + coincurve recover + all field checks): {r_ours:10,.0f}/s")
    print(f"  official SDK hash_eip3009_authorization + verify_eoa: {r_sdk:10,.0f}/s")
    print(f"  raw coincurve recover (no hashing, no checks):        {r_raw:10,.0f}/s")
    print(f"  ours / SDK = {r_ours / r_sdk:.2f}x   ours / raw = {r_ours / r_raw:.2f}x")
    print(f"sign/s: ours {rate(ours_sign, N // 4):,.0f}/s")


if __name__ == "__main__":
    main()
