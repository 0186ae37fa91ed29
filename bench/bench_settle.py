"""Settles/s through our local facilitator (over HTTP, concurrent) vs pre-signed raw
``transferWithAuthorization``/s sent back to back on the same anvil."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from api.stack import free_port
from connector.chain import ChainClient
from connector.devchain.deploy import dev_accounts, start_devchain
from connector.facilitator.client import FacilitatorClient
from connector.x402 import exact_evm
from connector.x402.codec import build_payment_payload
from connector.x402.requirement import Requirement

N = int(os.environ.get("BENCH_N", "400"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "16"))


def main() -> None:
    state = Path(tempfile.mkdtemp()) / "devchain.json"
    node, info = start_devchain(fund_count=10, state_file=state)
    try:
        accounts = dev_accounts(20)
        chain = ChainClient(info.rpc_url)
        req = Requirement(
            scheme="exact", network=info.network, amount=1, asset=info.token,
            pay_to=accounts[9].address, max_timeout_seconds=600,
            extra={"name": info.token_name, "version": info.token_version},
        )  # fmt: skip
        payers = accounts[1:9]

        # Baseline: pre-signed authorizations, raw transactions back to back from one key.
        signed = [exact_evm.sign_exact(payers[i % 8], req).payload for i in range(N)]
        start = time.perf_counter()
        hashes = []
        for p in signed:
            a = p.authorization
            hashes.append(
                chain.send_transfer_with_authorization(
                    info.token,
                    from_=a.from_,
                    to=a.to,
                    value=a.value,
                    valid_after=a.valid_after,
                    valid_before=a.valid_before,
                    nonce=a.nonce,
                    signature=p.signature,
                    gas_key=accounts[18],
                )
            )
        for h in hashes:
            assert chain.wait_for_receipt(h).status == 1
        raw_rate = N / (time.perf_counter() - start)

        # The facilitator runs in its own process, as deployed (`x402c facilitator`), so the
        # benchmark's client threads do not share its interpreter lock.
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "facilitator", "--port", str(port),
             "--devchain-state", str(state)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        wires = [
            build_payment_payload(exact_evm.sign_exact(payers[i % 8], req).payload, req, 2)
            for i in range(N)
        ]
        client = FacilitatorClient(url)
        start = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(lambda w: client.settle(w, req.to_v2()), wires))
        ours_rate = N / (time.perf_counter() - start)
        assert all(r["success"] for r in results)
        proc.terminate()
        proc.wait(timeout=10)
        print(f"settle/s (N={N}, anvil {info.rpc_url})")
        print(f"  raw pre-signed transferWithAuthorization, back to back: {raw_rate:8.1f}/s")
        print(
            f"  our facilitator, own process, over HTTP ({CONCURRENCY} concurrent): "
            f"{ours_rate:8.1f}/s"
        )
        print(f"  ours / raw = {ours_rate / raw_rate:.2f}x (target >= 0.5x)")
    finally:
        node.stop()


if __name__ == "__main__":
    main()
