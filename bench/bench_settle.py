"""Settles/s through our facilitator (`x402c facilitator --config`, its own process, over HTTP,
concurrent clients) vs pre-signed raw ``transferWithAuthorization``/s sent back to back from one
key (receipts awaited at the end).

Method: every run gets a fresh anvil (anvil slows down as its chain grows, so a later run on an
older chain would be slower whatever it runs); raw and ours are interleaved over ``--rounds``
rounds and the medians compared. ``--smoke`` is a tiny run the test suite uses to keep this
script working; its numbers mean nothing.

    .venv/bin/python bench/bench_settle.py              # 5 rounds x 400, writes bench/results
    .venv/bin/python bench/bench_settle.py --smoke --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from api.stack import free_port  # noqa: E402
from connector.chain import ChainClient  # noqa: E402
from connector.devchain.deploy import DevChainInfo, dev_accounts, start_devchain  # noqa: E402
from connector.facilitator.client import FacilitatorClient  # noqa: E402
from connector.x402 import exact_evm  # noqa: E402
from connector.x402.codec import build_payment_payload  # noqa: E402
from connector.x402.requirement import Requirement  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "bench_settle.json"


def _requirement(info: DevChainInfo) -> Requirement:
    return Requirement(
        scheme="exact", network=info.network, amount=1, asset=info.token,
        pay_to=dev_accounts(10)[9].address, max_timeout_seconds=600,
        extra={"name": info.token_name, "version": info.token_version},
    )  # fmt: skip


def run_raw(n: int) -> float:
    """Pre-signed authorizations, raw transactions back to back from one gas key."""
    node, info = start_devchain(fund_count=10)
    chain = ChainClient(info.rpc_url)
    try:
        accounts = dev_accounts(20)
        req = _requirement(info)
        signed = [exact_evm.sign_exact(accounts[1 + i % 8], req).payload for i in range(n)]
        start = time.perf_counter()
        hashes = []
        for p in signed:
            a = p.authorization
            tx = chain.send_transfer_with_authorization(
                info.token, from_=a.from_, to=a.to, value=a.value,
                valid_after=a.valid_after, valid_before=a.valid_before, nonce=a.nonce,
                signature=p.signature, gas_key=accounts[18],
            )  # fmt: skip
            hashes.append(tx)
        for h in hashes:
            assert chain.wait_for_receipt(h).status == 1
        return n / (time.perf_counter() - start)
    finally:
        chain.close()
        node.stop()


def run_ours(n: int, concurrency: int) -> tuple[float, int]:
    """Our facilitator as deployed, from a config file; returns (settles/s, nonce errors seen
    in its answers)."""
    folder = Path(tempfile.mkdtemp())
    node, info = start_devchain(fund_count=10)
    port = free_port()
    config = folder / "facilitator.json"
    config.write_text(
        json.dumps(
            {
                "mode": "dev",
                "port": port,
                "signer": {"dev_mnemonic_index": 19},
                "networks": [
                    {"network": info.network, "rpc_urls": [info.rpc_url], "tokens": [info.token]}
                ],
                "gas_check_interval_s": 3600,
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "facilitator", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("facilitator did not start")
            time.sleep(0.05)
        accounts = dev_accounts(20)
        req = _requirement(info)
        wires = [
            build_payment_payload(exact_evm.sign_exact(accounts[1 + i % 8], req).payload, req, 2)
            for i in range(n)
        ]
        with FacilitatorClient(url) as client, ThreadPoolExecutor(concurrency) as pool:
            client.supported()  # warm the connection pool outside the clock
            start = time.perf_counter()
            results = list(pool.map(lambda w: client.settle(w, req.to_v2()), wires))
            rate = n / (time.perf_counter() - start)
        failed = [r for r in results if not r.get("success")]
        if failed:
            raise RuntimeError(f"{len(failed)} settles failed, e.g. {failed[0]}")
        nonce_errors = sum("nonce" in str(r.get("errorReason", "")) for r in results)
        return rate, nonce_errors
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        node.stop()


def measure(n: int, rounds: int, concurrency: int) -> dict[str, Any]:
    raw: list[float] = []
    ours: list[float] = []
    nonce_errors = 0
    for _ in range(rounds):  # interleaved: drift of the machine hits both alike
        raw.append(run_raw(n))
        rate, errors = run_ours(n, concurrency)
        ours.append(rate)
        nonce_errors += errors
    raw_median, ours_median = statistics.median(raw), statistics.median(ours)
    ratio = round(ours_median / raw_median, 3) if raw_median else None
    return {
        "bench": "bench_settle",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": [
            {
                "what": f"settles/s, N={n} per run, {concurrency} concurrent HTTP clients, "
                f"median of {rounds} interleaved rounds, fresh anvil per run",
                "ours": f"{ours_median:.1f}/s (runs: {', '.join(f'{r:.1f}' for r in ours)})",
                "baseline": f"raw pre-signed transferWithAuthorization back to back: "
                f"{raw_median:.1f}/s (runs: {', '.join(f'{r:.1f}' for r in raw)})",
                "ratio": ratio,
            },
            {
                "what": "nonce errors in our facilitator's answers, all runs",
                "ours": str(nonce_errors),
                "baseline": "0",
                "ratio": None,
            },
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="tiny run (for the test suite)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.rounds, args.concurrency = 12, 1, 4
    result = measure(args.n, args.rounds, args.concurrency)
    out = args.out or (None if args.smoke else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["rows"]:
        print(f"{row['what']}\n  ours:     {row['ours']}\n  baseline: {row['baseline']}")
        if row["ratio"] is not None:
            print(f"  ours / baseline = {row['ratio']:.2f}x (target >= 0.8x)")
    return result


if __name__ == "__main__":
    main()
