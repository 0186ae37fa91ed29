"""The facilitator client against real HTTP servers on loopback."""

from __future__ import annotations

import contextlib
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


# ---------------------------------------------------------------- the pooled http.client path


class RawServer:
    """A bare HTTP/1.1 server on loopback whose misbehaviour each test chooses; counts connections.

    ``mode``: "ok" (keep-alive JSON), "drop-after-answer" (answers, then closes the connection
    without saying so, as a keep-alive timeout does), "hang-up" (closes before answering),
    "silent" (never answers), "huge" (a body larger than the client accepts).
    """

    def __init__(self, mode: str) -> None:
        import socket
        import threading

        self.mode = mode
        self.connections = 0
        self.requests = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Any) -> None:
        with contextlib.suppress(OSError):  # the client may reset a connection it gave up on
            self._serve_one(conn)

    def _serve_one(self, conn: Any) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                self.requests += 1
                if self.mode == "hang-up":
                    return
                if self.mode == "silent":
                    conn.recv(1)  # until the client gives up
                    return
                body = b'{"kinds": []}' if self.mode != "huge" else b'{"k": "' + b"x" * (2 << 20)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + b"content-length: %d\r\n\r\n" % len(body)
                    + body
                )
                if self.mode == "drop-after-answer":
                    return

    def close(self) -> None:
        self._sock.close()
        for conn in self._open:
            conn.close()


@pytest.fixture
def raw_server(request: pytest.FixtureRequest) -> Any:
    server = RawServer(request.param)
    yield server
    server.close()


@pytest.mark.parametrize("raw_server", ["ok"], indirect=True)
def test_requests_share_one_keep_alive_connection(raw_server: RawServer) -> None:
    with FacilitatorClient(raw_server.url) as client:
        for _ in range(5):
            client.supported()
    assert (raw_server.requests, raw_server.connections) == (5, 1)


@pytest.mark.parametrize("raw_server", ["drop-after-answer"], indirect=True)
def test_a_connection_closed_while_idle_is_replaced_once(raw_server: RawServer) -> None:
    with FacilitatorClient(raw_server.url, max_attempts=1) as client:
        for _ in range(3):
            assert client.supported() == {"kinds": []}
    # No retry budget was spent: each stale connection was replaced by a fresh one.
    assert (raw_server.requests, raw_server.connections) == (3, 3)


@pytest.mark.parametrize("raw_server", ["hang-up", "silent"], indirect=True)
def test_no_answer_is_retried_then_reported(raw_server: RawServer) -> None:
    client = FacilitatorClient(raw_server.url, timeout_s=0.3, max_attempts=3)
    with client, pytest.raises(FacilitatorError) as info:
        client.supported()
    assert raw_server.requests == 3
    assert "unreachable after 3 attempts" in info.value.detail


@pytest.mark.parametrize("raw_server", ["huge"], indirect=True)
def test_an_oversized_answer_is_refused(raw_server: RawServer) -> None:
    with FacilitatorClient(raw_server.url) as client, pytest.raises(FacilitatorError) as info:
        client.supported()
    assert "exceeds" in info.value.detail


def test_refused_connection_is_retried_then_reported() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    client = FacilitatorClient(url, timeout_s=1, max_attempts=2)
    with client, pytest.raises(FacilitatorError) as info:
        client.supported()
    assert "ConnectionRefusedError" in str(info.value.__cause__)


def test_a_proxied_url_goes_through_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    from connector.facilitator.transport import proxied

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "direct.example")
    assert proxied("https://facilitator.example/x402")
    assert not proxied("https://direct.example/x402")
    assert not proxied("http://127.0.0.1:8000")  # no HTTP_PROXY for plain http
    client = FacilitatorClient("https://facilitator.example/x402")
    assert client._fast is None and client._http is not None  # nothing is sent here
    client.close()
