"""The facilitator client against real HTTP servers on loopback."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from connector.facilitator.client import FacilitatorClient, FacilitatorError
from tests.fixtures.servers import LiveServer, free_port


def make_app(seen: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.get("/supported")
    def supported(request: Request) -> dict[str, Any]:
        seen.append({"auth": request.headers.get("authorization")})
        return {"kinds": [{"x402Version": 2, "scheme": "exact", "network": "eip155:31337"}]}

    @app.post("/verify")
    async def verify(request: Request) -> dict[str, Any]:
        seen.append(json.loads(await request.body()))
        return {"isValid": False, "invalidReason": "invalid_exact_evm_payload_signature"}

    @app.post("/settle")
    def settle() -> JSONResponse:
        return JSONResponse({"detail": "boom"}, status_code=503)

    @app.get("/broken/supported")
    def broken() -> PlainTextResponse:
        return PlainTextResponse("not json")

    return app


@pytest.fixture(scope="module")
def server() -> Any:
    seen: list[dict[str, Any]] = []
    with LiveServer(make_app(seen)) as live:
        live.seen = seen  # type: ignore[attr-defined]
        yield live


def test_sends_api_key_and_wire_body(server: Any) -> None:
    with FacilitatorClient(server.url, api_key="fac-key-123") as client:
        assert client.supported()["kinds"][0]["network"] == "eip155:31337"
        result = client.verify({"x402Version": 2, "payload": {}}, {"scheme": "exact"})
    assert result == {"isValid": False, "invalidReason": "invalid_exact_evm_payload_signature"}
    assert server.seen[-2] == {"auth": "Bearer fac-key-123"}
    assert server.seen[-1]["x402Version"] == 2
    assert server.seen[-1]["paymentRequirements"] == {"scheme": "exact"}


def test_http_errors_are_typed_and_not_retried(server: Any) -> None:
    with FacilitatorClient(server.url) as client, pytest.raises(FacilitatorError) as info:
        client.settle({"x402Version": 1}, {})
    assert info.value.context["status_code"] == 503
    assert info.value.retryable


def test_non_json_answer_is_a_clear_error(server: Any) -> None:
    with FacilitatorClient(server.url + "/broken") as client, pytest.raises(FacilitatorError):
        client.supported()


def test_unreachable_facilitator_retries_then_fails() -> None:
    attempts: list[httpx.Request] = []

    class Refusing(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            attempts.append(request)
            return super().handle_request(request)

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    client = FacilitatorClient(url, timeout_s=1, max_attempts=3, transport=Refusing())
    with pytest.raises(FacilitatorError) as info:
        client.supported()
    assert len(attempts) == 3
    assert "unreachable" in info.value.detail
