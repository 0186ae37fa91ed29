"""The facilitator app answers problem JSON for every error; numbers are range-checked."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.facilitator_app import create_facilitator_app
from connector.facilitator.local import LocalFacilitator

PAYER = "0x" + "11" * 20
PAY_TO = "0x" + "22" * 20
ASSET = "0x" + "33" * 20


def _body(**authorization: Any) -> dict[str, Any]:
    requirement = {
        "scheme": "exact",
        "network": "eip155:31337",
        "amount": "10",
        "asset": ASSET,
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "DevUSD", "version": "1"},
    }
    auth = {
        "from": PAYER,
        "to": PAY_TO,
        "value": "10",
        "validAfter": "0",
        "validBefore": "99999999999",
        "nonce": "0x" + "00" * 32,
        **authorization,
    }
    return {
        "x402Version": 2,
        "paymentPayload": {
            "x402Version": 2,
            "accepted": requirement,
            "payload": {"signature": "0x" + "00" * 65, "authorization": auth},
        },
        "paymentRequirements": requirement,
    }


@pytest.fixture
def client() -> TestClient:
    facilitator = LocalFacilitator(None, None, network="eip155:31337")  # type: ignore[arg-type]
    return TestClient(create_facilitator_app(facilitator), raise_server_exceptions=False)


@pytest.mark.parametrize("field", ["value", "validAfter", "validBefore"])
@pytest.mark.parametrize("number", [2**256, 2**300])
def test_integers_above_uint256_are_a_400_problem(
    client: TestClient, field: str, number: int
) -> None:
    for path in ("/verify", "/settle"):
        response = client.post(path, json=_body(**{field: number}))
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["errors"][0]["field"].endswith(f"authorization.{field}")


def test_unknown_paths_and_methods_are_problems(client: TestClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    response = client.get("/verify")
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
    assert "POST" in response.headers["allow"]


def test_an_unexpected_failure_is_a_500_problem_not_plain_text() -> None:
    class Broken:
        def verify(self, body: Any) -> Any:
            raise RuntimeError("secret internals")

    client = TestClient(create_facilitator_app(Broken()), raise_server_exceptions=False)  # type: ignore[arg-type]
    response = client.post("/verify", json={})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert "secret internals" not in response.text


def test_with_api_keys_a_body_without_a_key_is_not_read() -> None:
    facilitator = LocalFacilitator(None, None, network="eip155:31337")  # type: ignore[arg-type]
    client = TestClient(create_facilitator_app(facilitator, api_keys=["k-123"]))
    nested = b"[" * 30_000 + b"]" * 30_000
    response = client.post("/verify", content=nested)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    response = client.post("/verify", content=nested, headers={"authorization": "Bearer k-123"})
    assert response.status_code == 400  # read (bounded), refused before parsing
