"""Admin API: authentication on every route, CRUD with masked reads, problem+json errors, and no
secret in any response or log line of a full session."""

from __future__ import annotations

import base64
import logging
import re
from typing import Any

import pytest
from sqlalchemy import func, select

from connector.storage.db import transaction
from connector.storage.models.connections import Connection
from tests.fixtures.api import ApiHarness

API_KEY = "fac_live_9f8e7d6c5b4a39281706"
PRIVATE_KEY = "0x" + "4c" * 32
WHSEC = "whsec_" + base64.b64encode(b"q" * 32).decode()
PUBLIC = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/healthz", "/metrics",
          "/v1/manifest", "/pay/{request_id}"}  # fmt: skip
SCOPE_OF_PREFIX = [("/v1/admin", "read"), ("/v1/connections", "actions"), ("/v1/jobs", "actions"),
                   ("/v1/hooks", "actions")]  # fmt: skip


def connection_body(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "Agent",
        "network": "base-sepolia",
        "rpc_url": "https://rpc.example.com",
        "facilitator_url": "https://facilitator.example.com",
        "api_key": API_KEY,
        "webhook_url": "https://hooks.example.com/x",
        "webhook_secret": WHSEC,
        "private_key": PRIVATE_KEY,
        **overrides,
    }


def all_operations(api: ApiHarness) -> list[tuple[str, str]]:
    schema = api.client.get("/openapi.json").json()
    return [(m.upper(), p) for p, item in schema["paths"].items() for m in item]


def test_every_route_needs_a_key_and_the_right_scope(api: ApiHarness) -> None:
    operations = all_operations(api)
    assert len(operations) > 25
    for method, path in operations:
        if path in PUBLIC:
            continue
        url = re.sub(r"\{[^}]+\}", "x", path)
        assert api.client.request(method, url).status_code == 401, (method, path)
        bad = {"authorization": "Bearer x402c_sk_nope_nope"}
        assert api.client.request(method, url, headers=bad).status_code == 401, (method, path)
        needed = next(scope for prefix, scope in SCOPE_OF_PREFIX if path.startswith(prefix))
        wrong = "actions" if needed != "actions" else "read"
        response = api.client.request(method, url, headers=api.auth(wrong))
        assert response.status_code == 403, (method, path, response.status_code)
        assert response.headers["content-type"].startswith("application/problem+json")


def test_read_scope_cannot_write(api: ApiHarness) -> None:
    response = api.client.post(
        "/v1/admin/connections", json=connection_body(), headers=api.auth("read")
    )
    assert response.status_code == 403


def test_full_crud_session_leaks_no_secret(
    api: ApiHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[str] = []

    def call(method: str, url: str, **kw: Any) -> Any:
        response = api.client.request(method, url, headers=api.auth(), **kw)
        bodies.append(response.text + str(dict(response.headers)))
        return response

    created = call("POST", "/v1/admin/connections", json=connection_body())
    assert created.status_code == 201, created.text
    conn = created.json()
    assert (conn["has_api_key"] and conn["api_key_hint"] == "…7060"[-5:]) or conn["api_key_hint"]
    assert conn["webhook_secret_once"] is None  # supplied by the caller: never echoed
    call("GET", f"/v1/admin/connections/{conn['id']}")
    call("GET", "/v1/admin/connections")
    call(
        "PATCH",
        f"/v1/admin/connections/{conn['id']}",
        json={"name": "Renamed", "api_key": API_KEY + "x"},
    )
    call("POST", f"/v1/admin/connections/{conn['id']}/rotate-wallet")
    call("GET", "/v1/admin/audit")
    assert call("DELETE", f"/v1/admin/connections/{conn['id']}").status_code == 204
    assert call("GET", f"/v1/admin/connections/{conn['id']}").status_code == 404
    raw_key = bytes.fromhex(PRIVATE_KEY[2:])
    forms = [
        API_KEY,
        PRIVATE_KEY,
        PRIVATE_KEY[2:],
        PRIVATE_KEY[2:].upper(),
        base64.b64encode(raw_key).decode(),
        base64.urlsafe_b64encode(raw_key).decode(),
        WHSEC,
        WHSEC.removeprefix("whsec_"),
        base64.b64encode(API_KEY.encode()).decode(),
        API_KEY.encode().hex(),
    ]
    haystack = "\n".join(bodies) + "\n".join(
        r.getMessage() + str(r.__dict__) for r in caplog.records
    )
    for form in forms:
        assert form not in haystack, f"secret leaked in form {form[:6]}…"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "n" * 1000),
        ("rpc_url", "javascript:alert(1)"),
        ("facilitator_url", "nope"),
        ("private_key", "0xabc"),
        ("network", "atlantis"),
        ("webhook_url", "ftp://x"),
    ],
)
def test_bad_input_is_a_422_problem_naming_the_field_and_writes_nothing(
    api: ApiHarness, field: str, value: str
) -> None:
    response = api.client.post(
        "/v1/admin/connections", json=connection_body(**{field: value}), headers=api.auth()
    )
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["type"].endswith("/validation_failed")
    assert [e["field"] for e in problem["errors"]] == [field]
    with transaction(api.runtime.engine) as s:
        assert s.execute(select(func.count()).select_from(Connection)).scalar_one() == 0


def test_cursor_pagination_is_stable(api: ApiHarness) -> None:
    ids = []
    for i in range(5):
        r = api.client.post(
            "/v1/admin/connections", json=connection_body(name=f"c{i}"), headers=api.auth()
        )
        ids.append(r.json()["id"])
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"starting_after": cursor} if cursor else {})}
        page = api.client.get(
            "/v1/admin/connections", params=params, headers=api.auth("read")
        ).json()
        seen += [c["id"] for c in page["data"]]
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert seen == ids


def test_request_ids_are_returned(api: ApiHarness) -> None:
    response = api.client.get("/healthz", headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert api.client.get("/healthz").headers["x-request-id"].startswith("req_")


def test_corrupted_secret_is_a_clear_problem_not_a_crash(api: ApiHarness) -> None:
    conn = api.client.post(
        "/v1/admin/connections", json=connection_body(), headers=api.auth()
    ).json()
    with transaction(api.runtime.engine) as s:
        row = s.get(Connection, conn["id"])
        assert row is not None
        row.webhook_secret_token = row.webhook_secret_token[:-4] + "AAAA"
        s.add(row)
    response = api.client.post(
        f"/v1/admin/connections/{conn['id']}/rotate-webhook-secret", headers=api.auth()
    )
    assert response.status_code == 500
    problem = response.json()
    assert problem["type"].endswith("/secret_unreadable")
    assert conn["id"] in problem["detail"] and "webhook_secret" in problem["detail"]
    assert api.client.get("/healthz").status_code == 200
