"""The "test connection" service: check each credential and report every check separately.

Checks: facilitator ``/supported`` with the apiKey (and that it supports the network), RPC chain
id matches the network, wallet balance readable, and the webhook URL accepts a signed ping.
Each check has its own timeout; one failing does not stop the others.

Every call goes through the runtime's SSRF policy (the facilitator and RPC clients are guarded,
the webhook ping uses a guarded transport), and a check's ``detail`` is written by us: it never
quotes what the remote server answered, so pointing a URL at an internal service reveals nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
from pydantic import BaseModel

import connector.payments.protocol as proto
from connector.connections import service as connections
from connector.errors import ConnectorError
from connector.events.outbox import record_event
from connector.ids import new_id
from connector.payments.context_loader import load_connection
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.webhooks.signing import headers_for
from connector.x402.networks import chain_id_of, to_v1_name


class CheckResult(BaseModel):
    name: str
    ok: bool
    detail: str
    latency_ms: int


class ConnectionTestReport(BaseModel):
    connection_id: str
    ok: bool
    checks: list[CheckResult]


class CheckFailed(Exception):
    """A check's own verdict; its text is ours, never the remote server's."""


def _timed(name: str, check: Callable[[], str]) -> CheckResult:
    start = time.perf_counter()
    try:
        detail, ok = check(), True
    except (ConnectorError, CheckFailed) as exc:
        detail, ok = str(getattr(exc, "detail", exc))[:300], False
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        detail, ok = f"connection failed ({type(exc).__name__})", False
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # Parsing a malformed answer: name the failure, never quote the answer.
        detail, ok = f"unexpected answer ({type(exc).__name__})", False
    except Exception as exc:  # a check must fail, never the whole test (no internal text shown)
        detail, ok = f"check failed unexpectedly ({type(exc).__name__})", False
    return CheckResult(
        name=name, ok=ok, detail=detail, latency_ms=int((time.perf_counter() - start) * 1000)
    )


def run_connection_test(rt: Runtime, connection_id: str) -> ConnectionTestReport:
    ctx = load_connection(rt, connection_id)
    with UnitOfWork(rt.engine) as uow:
        conn = connections.get(uow.session, connection_id)
    settings = rt.settings

    def facilitator() -> str:
        supported = rt.facilitator(ctx.facilitator_url, ctx.api_key()).supported()
        networks = {str(k.get("network")) for k in supported["kinds"] if isinstance(k, dict)}
        wanted = {ctx.network, to_v1_name(ctx.network)}
        if not networks & wanted and not any(n.endswith(":*") for n in networks):
            raise CheckFailed(
                f"facilitator does not list {ctx.network} ({len(networks)} other networks)"
            )
        return f"reachable; supports {ctx.network}"

    def rpc() -> str:
        got = rt.chain(ctx.rpc_url).chain_id()
        expected = chain_id_of(ctx.network)
        if got != expected:
            raise CheckFailed(f"RPC is chain {got}, connection network is chain {expected}")
        return f"chain id {got}"

    def balance() -> str:
        asset, _, _ = proto.asset_for(rt, ctx, ctx.network, None)
        address = ctx.wallet_address or ctx.receiving_address
        value = rt.chain(ctx.rpc_url).token_balance(asset, address)
        return f"{value} atomic units of {asset} at {address}"

    def webhook() -> str:
        if not conn.webhook_url:
            return "no webhook URL configured (skipped)"
        body = json.dumps({"type": "webhook.test", "data": {"ping": True}}).encode()
        msg_id = new_id("evt")
        stamp = int(datetime.now(UTC).timestamp())
        headers = headers_for(connections.webhook_secrets(rt.vault, conn), msg_id, stamp, body)
        transport = rt.outbound().transport()
        with httpx.Client(
            transport=transport, timeout=settings.webhook_timeout_s, follow_redirects=False
        ) as client:
            response = client.post(
                conn.webhook_url,
                content=body,
                headers={**headers, "content-type": "application/json"},
            )
        if not 200 <= response.status_code < 300:
            raise CheckFailed(f"webhook answered HTTP {response.status_code}")
        return f"HTTP {response.status_code}"

    checks = [
        _timed("facilitator", facilitator),
        _timed("rpc", rpc),
        _timed("wallet_balance", balance),
        _timed("webhook", webhook),
    ]
    report = ConnectionTestReport(
        connection_id=connection_id, ok=all(c.ok for c in checks), checks=checks
    )
    with UnitOfWork(rt.engine) as uow:
        record_event(
            uow.session,
            "connection.test_succeeded" if report.ok else "connection.test_failed",
            connection_id,
            {"report": report.model_dump()},
        )
        uow.commit()
    return report
