"""The "test connection" service checks every credential and reports each check."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request, Response
from standardwebhooks.webhooks import Webhook

from api.stack import Stack
from tests.fixtures.servers import LiveServer, free_port
from tests.fixtures.stack import make_agent

pytestmark = [pytest.mark.chain, pytest.mark.xdist_group("stack")]


class PingReceiver:
    def __init__(self) -> None:
        self.secret = ""
        self.verified: list[str] = []
        self.lock = threading.Lock()

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/ping")
        async def ping(request: Request) -> Response:
            Webhook(self.secret).verify(await request.body(), dict(request.headers))
            with self.lock:
                self.verified.append(request.headers["webhook-id"])
            return Response(status_code=204)

        return app


@pytest.fixture
def receiver() -> Iterator[tuple[PingReceiver, str]]:
    r = PingReceiver()
    with LiveServer(r.app()) as server:
        yield r, server.url + "/ping"


def test_all_checks_pass_with_good_credentials(
    stack: Stack, receiver: tuple[PingReceiver, str]
) -> None:
    ping, url = receiver
    agent = make_agent(stack, stack.accounts[10], webhook_url=url)
    created = agent.http.get(f"/v1/admin/connections/{agent.connection_id}").json()
    assert created["webhook_url"] == url
    # the secret was shown once at creation; rotate to learn a fresh one for the receiver
    rotated = agent.http.post(
        f"/v1/admin/connections/{agent.connection_id}/rotate-webhook-secret"
    ).json()
    ping.secret = rotated["webhook_secret_once"]
    report = agent.http.post(f"/v1/admin/connections/{agent.connection_id}/test").json()
    assert report["ok"] is True, report
    assert [c["name"] for c in report["checks"]] == [
        "facilitator",
        "rpc",
        "wallet_balance",
        "webhook",
    ]
    assert len(ping.verified) == 1  # the ping was signed and verified by the receiver


def test_each_broken_credential_is_reported_separately(stack: Stack) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    agent = make_agent(
        stack,
        stack.accounts[10],
        facilitator_url=dead,
        network="base-sepolia",
        webhook_url=dead + "/x",
    )
    report = agent.http.post(f"/v1/admin/connections/{agent.connection_id}/test").json()
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is False
    assert not checks["facilitator"]["ok"] and "unreachable" in checks["facilitator"]["detail"]
    assert not checks["rpc"]["ok"] and "chain 31337" in checks["rpc"]["detail"]
    assert not checks["webhook"]["ok"]
    events = agent.http.get("/v1/admin/events", params={"type": "connection.test_failed"}).json()
    assert any(e["connection_id"] == agent.connection_id for e in events["data"])
