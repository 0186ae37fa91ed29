"""Bounded outbound HTTP against hostile servers on loopback."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator

import pytest
from fastapi import FastAPI
from fastapi.responses import RedirectResponse, StreamingResponse

from connector.errors import UnsafeURL
from connector.payments.http_fetch import FetchFailed, HttpFetcher
from tests.fixtures.servers import LiveServer


def hostile_app() -> FastAPI:
    app = FastAPI()

    @app.get("/huge")
    def huge() -> StreamingResponse:
        def gen() -> Iterator[bytes]:
            for _ in range(64):
                yield b"x" * 65536

        return StreamingResponse(gen())

    @app.get("/drip")
    def drip() -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield b"."
                await asyncio.sleep(0.05)

        return StreamingResponse(gen())

    @app.get("/hop/{n}")
    def hop(n: int) -> RedirectResponse:
        return RedirectResponse(f"/hop/{n + 1}", status_code=302)

    @app.api_route("/to-private", methods=["GET", "POST"])
    def to_private() -> RedirectResponse:
        return RedirectResponse("http://10.0.0.1/admin", status_code=307)

    @app.get("/binary")
    def binary() -> StreamingResponse:
        return StreamingResponse(iter([bytes(range(256))]))

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(hostile_app()) as live:
        yield live


def test_huge_body_is_truncated_at_the_limit(server: LiveServer) -> None:
    fetched = HttpFetcher(max_bytes=100_000).fetch("GET", server.url + "/huge")
    assert fetched.status == 200
    assert len(fetched.body) == 100_000
    assert fetched.truncated


def test_slow_drip_hits_the_overall_deadline(server: LiveServer) -> None:
    with pytest.raises(FetchFailed) as info:
        HttpFetcher(timeout_s=1.0).fetch("GET", server.url + "/drip")
    assert "deadline" in info.value.detail or "timed out" in info.value.detail


def test_redirect_loops_are_bounded(server: LiveServer) -> None:
    with pytest.raises(FetchFailed, match="too many redirects"):
        HttpFetcher(max_redirects=3).fetch("GET", server.url + "/hop/0")


def test_every_redirect_hop_passes_the_guard_before_any_connection(server: LiveServer) -> None:
    checked: list[str] = []

    def guard(url: str) -> None:
        checked.append(url)
        if "10.0.0.1" in url:
            raise UnsafeURL(f"refused {url}")

    with pytest.raises(UnsafeURL):
        HttpFetcher(guard=guard).fetch("GET", server.url + "/to-private")
    assert checked == [server.url + "/to-private", "http://10.0.0.1/admin"]


def test_post_redirects_are_returned_not_followed(server: LiveServer) -> None:
    fetched = HttpFetcher().fetch("POST", server.url + "/to-private", body=b"{}")
    assert fetched.status == 307
    assert fetched.header("location") == "http://10.0.0.1/admin"
    assert fetched.redirects == []


def test_binary_bodies_come_back_as_base64(server: LiveServer) -> None:
    fetched = HttpFetcher().fetch("GET", server.url + "/binary")
    text, encoding = fetched.body_for_result()
    assert encoding == "base64"
    assert base64.b64decode(text) == bytes(range(256))
