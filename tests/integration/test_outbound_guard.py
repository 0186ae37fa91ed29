"""Every outbound client a connection drives (RPC, facilitator, webhook ping, ``send``) goes through
one SSRF policy; URLs are vetted when written; nothing a remote server says is echoed back.

Names resolve through a stub; the ``connects`` fixture refuses (and records) any TCP connect to a
non-loopback address, so "refused before any connection" is checked, never tried for real.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from api.app import create_app
from connector import admin_keys
from connector.actions.service import run_job
from connector.connections import service as connections
from connector.connections.schemas import ConnectionCreate
from connector.errors import UnsafeURL
from connector.facilitator.client import FacilitatorClient
from connector.net.ssrf import OutboundPolicy
from connector.payments.protocol import fetcher_for
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage.db import transaction
from connector.storage.models.connections import Connection
from connector.vault import MasterKeyRing
from tests.fixtures.api import ApiHarness
from tests.fixtures.net import ConnectRecorder
from tests.fixtures.servers import LiveServer

WHSEC = "whsec_" + base64.b64encode(b"s" * 32).decode()
SECRET_TEXT = "INTERNAL-ONLY-7f3a9c"
NAMES = {
    "public.example": ["93.184.216.34"],
    "internal.example": ["10.0.0.1"],
    "meta.example": ["169.254.169.254"],
    "mixed.example": ["93.184.216.34", "192.168.1.20"],
}


def resolver(host: str, port: int) -> list[str]:
    if host in NAMES:
        return NAMES[host]
    raise OSError(f"stub resolver: unknown {host}")


@dataclass
class Strict:
    client: TestClient
    runtime: Runtime
    headers: dict[str, str]


@pytest.fixture
def strict(engine: Engine, tmp_path: Path) -> Iterator[Strict]:
    """The production policy: no loopback, nothing private, a stub resolver."""
    settings = Settings(data_dir=tmp_path, master_keys=MasterKeyRing.generate_spec("s1"))
    rt = Runtime(settings=settings, engine=engine, resolver=resolver)
    with transaction(engine) as s:
        _, key = admin_keys.create_key(s, name="ops", scopes=["admin"], principal="ops")
    rt.dispatch = lambda task, args: None
    yield Strict(TestClient(create_app(runtime=rt)), rt, {"authorization": f"Bearer {key}"})
    rt.close()


def body(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "Agent",
        "network": "base-sepolia",
        "rpc_url": "https://public.example/rpc",
        "facilitator_url": "https://public.example/facilitator",
        "api_key": "fac_live_0123456789abcdef",
        "webhook_url": "https://public.example/hook",
        "webhook_secret": WHSEC,
        **overrides,
    }


UNSAFE = [
    "http://127.0.0.1:8545/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "http://[::1]:8545/",
    "http://internal.example/",
    "http://meta.example/",
    "http://mixed.example/",
    "http://0177.0.0.1/",
    "http://2130706433/",
    "http://unresolvable.invalid/",
]


@pytest.mark.parametrize("field", ["rpc_url", "facilitator_url", "webhook_url"])
def test_unsafe_urls_are_refused_when_a_connection_is_created(
    strict: Strict, field: str, connects: ConnectRecorder
) -> None:
    for url in UNSAFE:
        response = strict.client.post(
            "/v1/admin/connections", json=body(**{field: url}), headers=strict.headers
        )
        assert response.status_code == 422, (url, response.text)
        problem = response.json()
        assert response.headers["content-type"].startswith("application/problem+json")
        assert problem["errors"][0]["field"] == field, problem
    with transaction(strict.runtime.engine) as s:
        assert s.execute(select(func.count()).select_from(Connection)).scalar_one() == 0
    assert connects.refused == []


@pytest.mark.parametrize("field", ["rpc_url", "facilitator_url", "webhook_url"])
def test_unsafe_urls_are_refused_by_patch_and_nothing_changes(
    strict: Strict, field: str, connects: ConnectRecorder
) -> None:
    created = strict.client.post("/v1/admin/connections", json=body(), headers=strict.headers)
    assert created.status_code == 201, created.text
    conn_id = created.json()["id"]
    for url in ("http://10.0.0.1/", "http://internal.example/x", "http://127.0.0.1:9/"):
        response = strict.client.patch(
            f"/v1/admin/connections/{conn_id}", json={field: url}, headers=strict.headers
        )
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["field"] == field
    after = strict.client.get(f"/v1/admin/connections/{conn_id}", headers=strict.headers).json()
    assert after[field] == body()[field]
    ok = strict.client.patch(
        f"/v1/admin/connections/{conn_id}",
        json={field: "https://public.example/other"},
        headers=strict.headers,
    )
    assert ok.status_code == 200 and ok.json()[field] == "https://public.example/other"
    assert connects.refused == []


def _legacy_connection(rt: Runtime, **urls: str) -> str:
    """A row written before URLs were vetted (or whose host moved since): only the connect-time
    guard stands between it and the internal network."""
    with transaction(rt.engine) as s:
        return connections.create(s, rt.vault, ConnectionCreate.model_validate(body(**urls))).id


def test_connection_test_refuses_every_internal_target_before_connecting(
    strict: Strict, connects: ConnectRecorder
) -> None:
    conn_id = _legacy_connection(
        strict.runtime,
        rpc_url="http://internal.example:8545/",
        facilitator_url="http://meta.example/",
        webhook_url="http://10.0.0.1/hook",
    )
    report = strict.client.post(f"/v1/admin/connections/{conn_id}/test", headers=strict.headers)
    assert report.status_code == 200, report.text
    checks = {c["name"]: c for c in report.json()["checks"]}
    for name in ("facilitator", "rpc", "wallet_balance", "webhook"):
        assert checks[name]["ok"] is False, checks[name]
        assert "refused" in checks[name]["detail"], checks[name]
    assert connects.refused == []


def test_clients_of_a_connection_refuse_internal_targets_before_connecting(
    strict: Strict, connects: ConnectRecorder
) -> None:
    rt = strict.runtime
    with pytest.raises(UnsafeURL):
        rt.chain("http://internal.example:8545/").chain_id()
    with pytest.raises(UnsafeURL):
        rt.chain("http://169.254.169.254/").chain_id()
    with pytest.raises(UnsafeURL):
        rt.facilitator("http://meta.example/", "fac_live_key").supported()
    with pytest.raises(UnsafeURL):
        rt.facilitator("http://10.0.0.1:8080/", "fac_live_key").supported()
    with pytest.raises(UnsafeURL):
        fetcher_for(rt).fetch("GET", "http://internal.example/paid")
    assert connects.refused == []


def test_balance_action_on_an_internal_rpc_fails_with_a_clear_problem(
    strict: Strict, connects: ConnectRecorder
) -> None:
    conn_id = _legacy_connection(strict.runtime, rpc_url="http://internal.example:8545/")
    with transaction(strict.runtime.engine) as s:
        _, key = admin_keys.create_key(
            s, name="wf", scopes=["actions"], principal="wf", connections=[conn_id]
        )
    response = strict.client.post(
        f"/v1/connections/{conn_id}/actions/balance",
        json={},
        headers={"authorization": f"Bearer {key}", "idempotency-key": "b1"},
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    run_job(strict.runtime, job_id)
    job = strict.client.get(f"/v1/jobs/{job_id}", headers={"authorization": f"Bearer {key}"})
    assert job.json()["status"] == "failed", job.json()
    assert job.json()["error"]["type"].endswith("/unsafe_url")
    assert connects.refused == []


def test_dns_rebinding_on_the_pooled_facilitator_transport_is_refused(
    connects: ConnectRecorder,
) -> None:
    answers = [["93.184.216.34"], ["10.0.0.1"]]
    policy = OutboundPolicy(resolver=lambda host, port: answers.pop(0) if answers else ["10.0.0.1"])
    policy.check_url("http://rebind.example/")  # when written: public
    client = FacilitatorClient("http://rebind.example/", api_key="fac_live_key", guard=policy)
    assert client._fast is not None  # the http.client path, not httpx
    with client, pytest.raises(UnsafeURL):
        client.supported()  # when connecting: private
    assert connects.refused == []


def test_a_proxied_facilitator_url_is_checked_before_the_request(
    monkeypatch: pytest.MonkeyPatch, connects: ConnectRecorder
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    client = FacilitatorClient(
        "http://internal.example/", guard=OutboundPolicy(resolver=resolver), max_attempts=1
    )
    assert client._http is not None  # the proxied (httpx) path
    with client, pytest.raises(UnsafeURL):
        client.supported()
    assert connects.refused == [] and connects.loopback == []  # not even the proxy was called


def test_the_pooled_transport_connects_to_the_vetted_address_and_keeps_the_host_name(
    connects: ConnectRecorder,
) -> None:
    seen: list[dict[str, str | None]] = []
    app = FastAPI()

    @app.get("/supported")
    def supported(request: Request) -> dict[str, Any]:
        seen.append(
            {"host": request.headers.get("host"), "auth": request.headers.get("authorization")}
        )
        return {"kinds": []}

    with LiveServer(app) as server:
        # "fac.test" exists only in this resolver: the client cannot have asked DNS itself.
        policy = OutboundPolicy(allow_loopback=True, resolver=lambda h, p: ["127.0.0.1"])
        url = f"http://fac.test:{server.port}"
        with FacilitatorClient(url, api_key="fac_live_key", guard=policy) as client:
            assert client.supported() == {"kinds": []}
    assert seen[0] == {"host": f"fac.test:{server.port}", "auth": "Bearer fac_live_key"}
    assert ("127.0.0.1", server.port) in connects.loopback


def internal_service() -> FastAPI:
    """What an internal service might answer: text that must never reach an API caller."""
    app = FastAPI()

    @app.get("/fac/supported")
    def supported() -> PlainTextResponse:
        return PlainTextResponse(SECRET_TEXT, status_code=404)

    @app.post("/rpc")
    async def rpc(request: Request) -> JSONResponse:
        call = json.loads(await request.body())
        if isinstance(call, list):
            return JSONResponse([{"id": c["id"], "error": SECRET_TEXT} for c in call])
        if call["method"] == "eth_chainId":
            return JSONResponse({"jsonrpc": "2.0", "id": call["id"], "result": SECRET_TEXT})
        return JSONResponse({"jsonrpc": "2.0", "id": call["id"], "error": SECRET_TEXT})

    @app.post("/hook")
    def hook() -> PlainTextResponse:
        return PlainTextResponse(SECRET_TEXT, status_code=500)

    return app


def test_connection_test_never_echoes_what_the_remote_answered(api: ApiHarness) -> None:
    with LiveServer(internal_service()) as server:
        created = api.client.post(
            "/v1/admin/connections",
            json=body(
                rpc_url=f"{server.url}/rpc",
                facilitator_url=f"{server.url}/fac",
                webhook_url=f"{server.url}/hook",
            ),
            headers=api.auth(),
        )
        assert created.status_code == 201, created.text
        report = api.client.post(
            f"/v1/admin/connections/{created.json()['id']}/test", headers=api.auth()
        )
    assert report.status_code == 200
    assert [c["ok"] for c in report.json()["checks"]] == [False] * 4, report.text
    assert SECRET_TEXT not in report.text
    events = api.client.get("/v1/admin/events", headers=api.auth())
    assert SECRET_TEXT not in events.text
