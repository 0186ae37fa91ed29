"""The paying edge: our paywall next to the official SDK's FastAPI ``payment_middleware``.

Two figures, each ours vs the SDK in the same run:

* **unpaid** requests -> 402 with ``PAYMENT-REQUIRED``: requests/s and p50 for a fixed time;
* **paid** requests, pre-signed (one fresh EIP-3009 authorization each, from nine payers), through
  the *same* facilitator (ours, in its own process): payments/s and p95.

Both at each load-generator concurrency of ``BENCH_CONCURRENCY`` (comma-separated, default
``4,32``): at 4 connections the per-request work decides, at 32 the queuing.

Method: each server is one uvicorn process (``--no-access-log``; ours with warnings-only logs)
on loopback; the load comes from a separate process (``bench/load.py``, raw asyncio HTTP/1.1
keep-alive connections). Every run gets a fresh anvil and a fresh facilitator (anvil slows as its
chain grows). The two servers alternate within each round and the order flips every round; the
figures are medians over rounds and the ratios medians of per-round ratios. Ours uses its own
throwaway PostgreSQL database (created and dropped here). After each paid run the payee's
on-chain balance is checked against the number of 200s (and, for ours, against the database).

``--smoke`` runs a tiny size (the test suite does, so the bench cannot rot) and records nothing
unless ``BENCH_RESULTS_DIR`` is set.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from eth_account.signers.local import LocalAccount
from sqlalchemy import func, select
from sqlmodel import col

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record

import connector.payments.protocol as proto
from api.stack import free_port
from connector.actions.schemas import ReceiveInput
from connector.chain import ChainClient
from connector.connections import service as connections
from connector.connections.schemas import ConnectionCreate
from connector.devchain.deploy import DevChainInfo, dev_accounts, start_devchain
from connector.payments import receive
from connector.payments.context_loader import load_connection
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage import migrate
from connector.storage.db import make_engine, transaction
from connector.storage.models.payments import Payment
from connector.vault import MasterKeyRing
from connector.x402 import codec
from connector.x402.requirement import requirement_from_wire

SMOKE = "--smoke" in sys.argv
ADMIN_DSN = os.environ.get("X402C_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1" if SMOKE else "3"))
UNPAID_S = float(os.environ.get("BENCH_UNPAID_S", "0.5" if SMOKE else "5"))
PAID_N = int(os.environ.get("BENCH_PAID_N", "6" if SMOKE else "300"))
#: Connections of the load generator, one measurement each (comma-separated): low concurrency is
#: where per-request work shows, high concurrency where queuing and locks do.
CONCURRENCIES = [
    int(c) for c in os.environ.get("BENCH_CONCURRENCY", "2,4" if SMOKE else "4,32").split(",")
]
ROOT = Path(__file__).resolve().parents[1]
AMOUNT = 1


@dataclass
class Chain:
    info: DevChainInfo
    facilitator_url: str
    accounts: list[LocalAccount]


@dataclass
class Run:
    unpaid_rate: float
    unpaid_p50: float
    paid_rate: float
    paid_p95: float


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * q + 0.5) - 1))]


def wait_until(check: Any, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} did not come up")


def quiet(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@contextmanager
def fresh_chain() -> Iterator[Chain]:
    """A new anvil with DevUSD and our facilitator in its own process."""
    state = Path(tempfile.mkdtemp()) / "devchain.json"
    node, info = start_devchain(fund_count=10, state_file=state)
    port = free_port()
    fac = quiet(
        [
            *(sys.executable, "-m", "api.cli", "facilitator"),
            *("--port", str(port), "--devchain-state", str(state)),
        ]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/healthz").status_code == 200, "facilitator")
        yield Chain(info, url, dev_accounts(20))
    finally:
        stop(fac)
        node.stop()


def uvicorn_cmd(app: str, port: int, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)),
        *("--log-level", "warning", "--no-access-log", *extra),
    ]


@contextmanager
def sdk_server(chain: Chain, pay_to: str) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "SDK_NETWORK": chain.info.network,
        "SDK_FACILITATOR": chain.facilitator_url,
        "SDK_PAY_TO": pay_to,
        "SDK_AMOUNT": str(AMOUNT),
        "SDK_ASSET": chain.info.token,
        "SDK_TOKEN_NAME": chain.info.token_name,
        "SDK_TOKEN_VERSION": chain.info.token_version,
    }
    proc = quiet(uvicorn_cmd("sdk_paywall_app:app", port, "--app-dir", str(ROOT / "bench")), env)
    url = f"http://127.0.0.1:{port}/paid"
    try:
        wait_until(lambda: httpx.get(url).status_code == 402, "SDK server")
        yield url
    finally:
        stop(proc)


@contextmanager
def our_server(
    rt: Runtime, env: dict[str, str], chain: Chain, pay_to: LocalAccount
) -> Iterator[str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with transaction(rt.engine) as s:
        conn_id = connections.create(
            s,
            rt.vault,
            ConnectionCreate.model_validate(
                {
                    "name": f"bench seller {secrets.token_hex(3)}",
                    "network": chain.info.network, "rpc_url": chain.info.rpc_url,
                    "facilitator_url": chain.facilitator_url, "asset": chain.info.token,
                    "private_key": "0x" + pay_to.key.hex(),
                }
            ),
        ).id  # fmt: skip
    rt.settings.public_base_url = base
    ctx = load_connection(rt, conn_id)
    inp = ReceiveInput.model_validate(
        {"amount": str(AMOUNT), "resource": {"secret": 1}, "max_payments": 1_000_000}
    )
    request_id = receive.create_request(rt, ctx, inp).id
    proc = quiet(uvicorn_cmd("api.asgi:app", port), {**env, "X402C_PUBLIC_BASE_URL": base})
    url = f"{base}/pay/{request_id}"
    try:
        wait_until(lambda: httpx.get(url).status_code == 402, "our server")
        yield url
    finally:
        stop(proc)


def load(job: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py")],
        input=json.dumps(job).encode(),
        capture_output=True,
        check=True,
        timeout=600,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def presign(url: str, payers: list[LocalAccount], n: int) -> list[dict[str, str]]:
    """``n`` payment headers for what the 402 at ``url`` asks, round-robin over ``payers``."""
    first = httpx.get(url)
    assert first.status_code == 402, first.status_code
    required = codec.decode_b64_json(first.headers["payment-required"], "payment-required")
    accepted = required["accepts"][0]
    requirement = requirement_from_wire(accepted, 2)
    headers = []
    for i in range(n):
        signed = proto.sign_payment(
            payers[i % len(payers)], requirement, 2, required.get("resource"), accepted_raw=accepted
        )
        name, value = proto.payment_header(2, signed.wire)
        headers.append({name: value})
    return headers


def measure(url: str, chain: Chain, payee: str, concurrency: int) -> Run:
    load({"url": url, "concurrency": concurrency, "duration_s": min(1.0, UNPAID_S)})  # warm-up
    unpaid = load({"url": url, "concurrency": concurrency, "duration_s": UNPAID_S})
    if set(unpaid["statuses"]) != {"402"}:
        raise SystemExit(f"unpaid run answered {unpaid['statuses']}")
    headers = presign(url, chain.accounts[1:10], PAID_N)
    client = ChainClient(chain.info.rpc_url)
    before = client.token_balance(chain.info.token, payee)
    paid = load({"url": url, "concurrency": concurrency, "headers": headers})
    after = client.token_balance(chain.info.token, payee)
    client.close()
    if paid["statuses"] != {"200": PAID_N}:
        answers = "\n---\n".join(paid["unexpected"])
        raise SystemExit(
            f"paid run at {url} answered {paid['statuses']}; first of them:\n{answers}"
        )
    if after - before != PAID_N * AMOUNT:
        raise SystemExit(f"on-chain {after - before} != {PAID_N * AMOUNT} paid")
    return Run(
        unpaid["count"] / unpaid["elapsed_s"],
        pct(unpaid["latencies_ms"], 0.5),
        paid["count"] / paid["elapsed_s"],
        pct(paid["latencies_ms"], 0.95),
    )


def main() -> None:
    db = "x402c_bench_" + secrets.token_hex(4)
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + db
    try:
        keys = MasterKeyRing.generate_spec("s1")
        settings = Settings(
            database_url=url,
            master_keys=keys,
            data_dir=Path(tempfile.mkdtemp()),
            outbound_allow_loopback=True,  # chain and facilitator are on loopback
        )
        rt = Runtime(settings=settings, engine=make_engine(url))
        migrate.upgrade(rt.engine)
        env = {
            **os.environ,
            "X402C_DATABASE_URL": url,
            "X402C_MASTER_KEYS": keys,
            "X402C_OUTBOUND_ALLOW_LOOPBACK": "true",
            "X402C_LOG_LEVEL": "WARNING",
            "X402C_DATA_DIR": str(settings.data_dir),
        }
        runs: dict[tuple[str, int], list[Run]] = {}
        for i in range(ROUNDS):
            for concurrency in CONCURRENCIES:
                for impl in ("sdk", "ours") if i % 2 == 0 else ("ours", "sdk"):
                    payee = dev_accounts(20)[15 if impl == "ours" else 16]
                    with fresh_chain() as chain:
                        server = (
                            our_server(rt, env, chain, payee)
                            if impl == "ours"
                            else sdk_server(chain, payee.address)
                        )
                        with server as target:
                            run = measure(target, chain, payee.address, concurrency)
                    runs.setdefault((impl, concurrency), []).append(run)
                    print(
                        f"  round {i + 1} c={concurrency:<3d} {impl:4s}: unpaid "
                        f"{run.unpaid_rate:7.0f}/s p50 {run.unpaid_p50:6.1f} ms | paid "
                        f"{run.paid_rate:6.1f}/s p95 {run.paid_p95:6.0f} ms",
                        flush=True,
                    )
        expected = ROUNDS * len(CONCURRENCIES) * PAID_N
        with transaction(rt.engine) as s:
            settled = s.execute(
                select(func.count()).where(col(Payment.state) == "settled")
            ).scalar_one()
        if settled != expected:
            raise SystemExit(f"database shows {settled} settled, expected {expected}")
        report(runs)
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def report(runs: dict[tuple[str, int], list[Run]]) -> None:
    print(
        f"paywall, 1 uvicorn process each, {ROUNDS} interleaved rounds (fresh anvil + facilitator "
        "per run), medians; ratios = medians of per-round ratios"
    )

    def med(which: list[Run], attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in which)

    def ratio(ours: list[Run], sdk: list[Run], attr: str) -> float:
        pairs = zip(ours, sdk, strict=True)
        return statistics.median(getattr(o, attr) / getattr(s, attr) for o, s in pairs)

    unpaid_rows, paid_rows = [], []
    for c in CONCURRENCIES:
        ours, sdk = runs[("ours", c)], runs[("sdk", c)]
        unpaid_ratio, paid_ratio = ratio(ours, sdk, "unpaid_rate"), ratio(ours, sdk, "paid_rate")
        rounds = ", ".join(
            f"{o.paid_rate:.0f} vs {s.paid_rate:.0f}" for o, s in zip(ours, sdk, strict=True)
        )
        print(
            f"  c={c:<3d} unpaid -> 402: ours {med(ours, 'unpaid_rate'):7.0f}/s p50 "
            f"{med(ours, 'unpaid_p50'):5.1f} ms | SDK {med(sdk, 'unpaid_rate'):7.0f}/s p50 "
            f"{med(sdk, 'unpaid_p50'):5.1f} ms | {unpaid_ratio:.2f}x"
        )
        print(
            f"  c={c:<3d} paid ({PAID_N} pre-signed): ours {med(ours, 'paid_rate'):6.1f}/s p95 "
            f"{med(ours, 'paid_p95'):5.0f} ms | SDK {med(sdk, 'paid_rate'):6.1f}/s p95 "
            f"{med(sdk, 'paid_p95'):5.0f} ms | {paid_ratio:.2f}x (rounds, ours vs SDK: {rounds})"
        )
        unpaid_rows.append(
            record.row(
                f"paywall: unpaid request -> 402 (1 uvicorn process, {c} connections)",
                f"{med(ours, 'unpaid_rate'):,.0f} req/s, p50 {med(ours, 'unpaid_p50'):.1f} ms",
                f"SDK FastAPI payment_middleware {med(sdk, 'unpaid_rate'):,.0f} req/s, "
                f"p50 {med(sdk, 'unpaid_p50'):.1f} ms",
                unpaid_ratio,
            )
        )
        paid_rows.append(
            record.row(
                f"paywall: paid request, pre-signed, same facilitator, {c} connections "
                f"(median of {ROUNDS} rounds; rounds/s ours vs SDK: {rounds})",
                f"{med(ours, 'paid_rate'):,.1f}/s, p95 {med(ours, 'paid_p95'):,.0f} ms",
                f"SDK FastAPI payment_middleware {med(sdk, 'paid_rate'):,.1f}/s, "
                f"p95 {med(sdk, 'paid_p95'):,.0f} ms",
                paid_ratio,
            )
        )
    record.write("paywall", unpaid_rows + paid_rows, smoke=SMOKE)


if __name__ == "__main__":
    main()
