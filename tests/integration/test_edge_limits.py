"""Hostile and careless input at the edge: bounded size and depth, NUL bytes, out-of-range
numbers, strict filters and no internal text in error bodies. SQLite and PostgreSQL (NUL bytes
used to become 500s on PostgreSQL only)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures.api import ApiHarness
from tests.integration.test_api_admin import connection_body

PROBLEM = "application/problem+json"


@pytest.fixture
def connection_id(api: ApiHarness) -> str:
    response = api.client.post("/v1/admin/connections", json=connection_body(), headers=api.auth())
    assert response.status_code == 201, response.text
    cid: str = response.json()["id"]
    return cid


def _problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


# ---------------------------------------------------------------------------- size


def test_a_body_over_the_limit_is_413_before_it_is_parsed(api: ApiHarness) -> None:
    limit = api.runtime.settings.api_max_body_bytes
    big = json.dumps({"name": "x" * limit}).encode()
    body = _problem(api.client.post("/v1/admin/connections", content=big, headers=api.auth()), 413)
    assert str(limit) in body["detail"]

    # Without Content-Length (chunked), the stream is cut off at the limit too.
    def chunks() -> Iterator[bytes]:
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    _problem(api.client.post("/v1/admin/connections", content=chunks(), headers=api.auth()), 413)


def test_no_key_means_the_body_is_not_read(api: ApiHarness) -> None:
    big = b"{" * (api.runtime.settings.api_max_body_bytes + 10)
    body = _problem(api.client.post("/v1/admin/connections", content=big), 401)
    assert body["type"].endswith("/unauthorized")


def test_public_paywall_body_is_bounded_too(api: ApiHarness) -> None:
    big = b"x" * (api.runtime.settings.api_max_body_bytes + 1)
    _problem(api.client.post("/pay/prq_x", content=big), 413)


@pytest.mark.parametrize(
    ("action", "body", "field"),
    [
        (
            "send",
            {"to": "0x" + "11" * 20, "amount": "1", "metadata": {f"k{i}": "v" for i in range(33)}},
            "metadata",
        ),
        (
            "send",
            {"to": "0x" + "11" * 20, "amount": "1", "metadata": {"k": "v" * 513}},
            "metadata.k",
        ),
        (
            "send",
            {"url": "http://127.0.0.1:9/", "headers": {f"x-h{i}": "v" for i in range(33)}},
            "headers",
        ),
        ("send", {"url": "http://127.0.0.1:9/", "headers": {"x-h": "a\r\nb"}}, "headers.x-h"),
        ("receive", {"amount": "1", "resource": {"blob": "x" * (64 * 1024)}}, "resource"),
        (
            "verify",
            {"payment_payload": {"x": "y" * 8000, "z": ["y" * 8000] * 4}, "requirements": {}},
            "payment_payload",
        ),
    ],
)
def test_per_field_limits(
    api: ApiHarness, connection_id: str, action: str, body: dict[str, Any], field: str
) -> None:
    response = api.client.post(
        f"/v1/connections/{connection_id}/actions/{action}", json=body, headers=api.auth()
    )
    problem = _problem(response, 422)
    assert any(e["field"].startswith(field) for e in problem["errors"]), problem
    assert api.dispatched == []


@pytest.mark.parametrize("field", ["payee_deny", "payee_allow", "domain_deny", "allowed_assets"])
def test_policy_lists_are_bounded(api: ApiHarness, field: str) -> None:
    policy = {field: ["0x" + f"{i:040x}" for i in range(1001)]}
    response = api.client.post(
        "/v1/admin/connections", json=connection_body(policy=policy), headers=api.auth()
    )
    problem = _problem(response, 422)
    assert problem["errors"][0]["field"].startswith(f"policy.{field}")


# ---------------------------------------------------------------------------- depth


def test_deep_json_is_refused_before_parsing(api: ApiHarness, connection_id: str) -> None:
    depth = api.runtime.settings.api_max_json_depth
    deep = {"to": "0x" + "11" * 20, "amount": "1", "metadata": {}}
    nested: Any = "x"
    for _ in range(depth + 1):
        nested = [nested]
    raw = json.dumps({**deep, "nested": nested})
    response = api.client.post(
        f"/v1/connections/{connection_id}/actions/send",
        content=raw,
        headers={**api.auth(), "content-type": "application/json"},
    )
    problem = _problem(response, 422)
    assert problem["errors"] == [{"field": "body", "message": problem["detail"]}]


# ---------------------------------------------------------------------------- NUL bytes


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/pay/%00"),
        ("GET", "/pay/prq_%00x"),
        ("GET", "/v1/admin/payments?connection_id=%00"),
        ("GET", "/v1/admin/audit?actor=a%00b"),
        ("GET", "/v1/admin/connections/con_%00"),
        ("GET", "/v1/jobs/%00"),
    ],
)
def test_nul_in_path_or_query_is_422(api: ApiHarness, method: str, url: str) -> None:
    _problem(api.client.request(method, url, headers=api.auth()), 422)


def test_nul_in_a_body_is_422(api: ApiHarness, connection_id: str) -> None:
    for payload in (connection_body(name="a\x00b"), connection_body(rpc_url="http://a\x00b/")):
        _problem(api.client.post("/v1/admin/connections", json=payload, headers=api.auth()), 422)
    response = api.client.post(
        f"/v1/connections/{connection_id}/actions/receive",
        json={"amount": "1", "description": "nul \x00 here"},
        headers=api.auth(),
    )
    _problem(response, 422)
    # An escaped backslash before "u0000" is ordinary text, not a NUL.
    response = api.client.post(
        "/v1/admin/connections", json=connection_body(name="a\\u0000b"), headers=api.auth()
    )
    assert response.status_code == 201, response.text


# ---------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("amount", [str(2**256), "9" * 78])
def test_amounts_above_uint256_are_refused(
    api: ApiHarness, connection_id: str, amount: str
) -> None:
    for action, body in (
        ("receive", {"amount": amount}),
        ("send", {"to": "0x" + "11" * 20, "amount": amount}),
        ("send", {"url": "http://127.0.0.1:9/", "max_amount": amount}),
    ):
        response = api.client.post(
            f"/v1/connections/{connection_id}/actions/{action}", json=body, headers=api.auth()
        )
        assert "uint256" in _problem(response, 422)["detail"]
    assert api.dispatched == []


def test_the_largest_uint256_is_accepted(api: ApiHarness, connection_id: str) -> None:
    response = api.client.post(
        f"/v1/connections/{connection_id}/actions/send",
        json={"to": "0x" + "11" * 20, "amount": str(2**256 - 1), "dry_run": True},
        headers={**api.auth(), "idempotency-key": "largest-uint256"},  # send needs a key
    )
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("value", [2**256, str(2**256), "12abc", "1e3", -1, 1.5])
def test_policy_amounts_are_checked_without_python_text(api: ApiHarness, value: Any) -> None:
    response = api.client.post(
        "/v1/admin/connections",
        json=connection_body(policy={"max_per_payment": value}),
        headers=api.auth(),
    )
    problem = _problem(response, 422)
    assert "invalid literal" not in response.text and "base 10" not in response.text
    assert problem["errors"][0]["field"] == "policy.max_per_payment"


# ---------------------------------------------------------------------------- small leaks


def test_malformed_json_names_the_body_not_a_byte_offset(api: ApiHarness) -> None:
    response = api.client.post(
        "/v1/admin/connections",
        content=b'{"name": "x",,}',
        headers={**api.auth(), "content-type": "application/json"},
    )
    problem = _problem(response, 422)
    assert problem["errors"] == [{"field": "body", "message": "the request body is not valid JSON"}]
    assert "JSON decode error" not in response.text


@pytest.mark.parametrize(
    "url",
    [
        "/v1/admin/deliveries?status=bogus",
        "/v1/admin/payments?state=bogus",
        "/v1/admin/audit?since=1700000000.5",
        "/v1/admin/audit?since=1700000000",
        "/v1/admin/audit?since=yesterday",
    ],
)
def test_bad_filters_are_422_not_an_empty_list(api: ApiHarness, url: str) -> None:
    _problem(api.client.get(url, headers=api.auth()), 422)


def test_good_filters_still_work(api: ApiHarness) -> None:
    for url in (
        "/v1/admin/deliveries?status=dead",
        "/v1/admin/payments?state=settled",
        "/v1/admin/audit?since=2026-01-31T12:00:00Z",
        "/v1/admin/audit?since=2026-01-31",
    ):
        assert api.client.get(url, headers=api.auth()).status_code == 200, url
    response = api.client.post(
        "/v1/admin/deliveries/redeliver", json={"since": 1700000000}, headers=api.auth()
    )
    _problem(response, 422)


def test_405_names_the_allowed_methods(api: ApiHarness) -> None:
    response = api.client.put("/v1/admin/keys", headers=api.auth())
    _problem(response, 405)
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}


@pytest.mark.parametrize(
    "name", ["Authorization", "cookie", "Proxy-Authorization", "X-API-Key", "x-session-token"]
)
def test_send_refuses_credential_headers(api: ApiHarness, connection_id: str, name: str) -> None:
    response = api.client.post(
        f"/v1/connections/{connection_id}/actions/send",
        json={"url": "http://127.0.0.1:9/", "headers": {name: "Bearer s3cr3t-value"}},
        headers=api.auth(),
    )
    _problem(response, 422)
    assert "s3cr3t-value" not in response.text
    assert api.dispatched == []


def test_connection_test_survives_an_unparsable_url(api: ApiHarness) -> None:
    created = api.client.post(
        "/v1/admin/connections",
        json=connection_body(
            rpc_url="http://0177.0.0.1:9/",
            facilitator_url="http://0177.0.0.1:9/",
            webhook_url="http://0177.0.0.1:9/",
        ),
        headers=api.auth(),
    )
    if created.status_code == 422:  # refused at write (URL rules): nothing left to test here
        return
    response = api.client.post(
        f"/v1/admin/connections/{created.json()['id']}/test", headers=api.auth()
    )
    assert response.status_code == 200, response.text
    assert response.json()["ok"] is False


def test_nul_in_a_header_is_422(api: ApiHarness, connection_id: str) -> None:
    response = api.client.post(
        f"/v1/connections/{connection_id}/actions/receive",
        json={"amount": "1"},
        headers={**api.auth(), "idempotency-key": "k\x00ey"},
    )
    assert _problem(response, 422)["errors"][0]["field"] == "header"
    assert api.dispatched == []


@pytest.mark.parametrize("field", ["name", "network", "rpc_url", "facilitator_url"])
def test_patch_cannot_null_a_required_field(
    api: ApiHarness, connection_id: str, field: str
) -> None:
    response = api.client.patch(
        f"/v1/admin/connections/{connection_id}", json={field: None}, headers=api.auth()
    )
    assert field in _problem(response, 422)["detail"]
    got = api.client.get(f"/v1/admin/connections/{connection_id}", headers=api.auth())
    assert got.status_code == 200 and got.json()[field]
