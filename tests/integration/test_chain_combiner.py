"""The chain client's call combiner (``ChainClient(combine=True)``, used by the facilitator):
calls made while a round trip is in flight share the next JSON-RPC batch, each caller gets its
own answer or its own error, a lone call is a plain request, and a failed round trip fails only
the calls it carried. Against a real JSON-RPC stub served on loopback, which can hold a request
so that the test knows exactly which calls are queued behind it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse

from connector.chain import ChainClient
from connector.chain.client import RpcError
from tests.fixtures.servers import LiveServer


class Stub:
    """Answers ``echo`` with its first parameter and ``fail`` with a JSON-RPC error; records
    every request body. ``hold`` makes the next request wait until ``release()``."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.status = 200
        self._hold: threading.Event | None = None  # taken by the next request
        self._gate: threading.Event | None = None
        self.holding = threading.Event()

    def hold(self) -> None:
        self._gate = self._hold = threading.Event()

    def release(self) -> None:
        assert self._gate is not None
        self._gate.set()

    def answer(self, body: Any) -> Any:
        self.bodies.append(body)
        gate, self._hold = self._hold, None
        if gate is not None:
            self.holding.set()
            gate.wait(10)
        if self.status != 200:
            return JSONResponse({"error": "down"}, status_code=self.status)
        if isinstance(body, list):
            return [self._one(item) for item in body]
        return self._one(body)

    @staticmethod
    def _one(call: dict[str, Any]) -> dict[str, Any]:
        if call["method"] == "fail":
            return {"jsonrpc": "2.0", "id": call["id"], "error": {"code": 3, "message": "no"}}
        return {"jsonrpc": "2.0", "id": call["id"], "result": call["params"][0]}


@pytest.fixture
def stub() -> Iterator[tuple[Stub, str]]:
    state = Stub()
    app = FastAPI()

    @app.post("/")
    def rpc(body: Any = Body(...)) -> Any:  # sync: runs in a thread, so it may block
        return state.answer(body)

    with LiveServer(app) as server:
        yield state, server.url


def _queued(client: ChainClient, count: int) -> None:
    assert client.combiner is not None
    deadline = time.monotonic() + 10
    while client.combiner.queued < count:
        assert time.monotonic() < deadline, "calls did not queue"
        time.sleep(0.005)


def _behind_held_call(
    client: ChainClient, stub: Stub, pool: ThreadPoolExecutor, calls: list[Callable[[], Any]]
) -> tuple[Future[Any], list[Future[Any]]]:
    """Start one call that the stub holds, queue ``calls`` behind it, then let it go."""
    stub.hold()
    first = pool.submit(client.rpc, "echo", ["first"])
    assert stub.holding.wait(10)
    futures = [pool.submit(call) for call in calls]
    _queued(client, len(calls))
    stub.release()
    return first, futures


def test_a_lone_call_is_a_plain_request(stub: tuple[Stub, str]) -> None:
    server, url = stub
    client = ChainClient(url, combine=True)
    assert client.rpc("echo", [7]) == 7
    assert isinstance(server.bodies[0], dict) and server.bodies[0]["method"] == "echo"
    client.close()


def test_calls_made_during_a_round_trip_share_the_next_batch(stub: tuple[Stub, str]) -> None:
    server, url = stub
    client = ChainClient(url, combine=True)
    calls: list[Callable[[], Any]] = [
        (lambda i=i: client.rpc("echo", [i])) for i in range(5)  # type: ignore[misc]
    ]
    calls.append(lambda: client.rpc("fail", [0]))
    calls.append(lambda: client.rpc_batch([("echo", ["a"]), ("echo", ["b"])]))
    with ThreadPoolExecutor(10) as pool:
        first, futures = _behind_held_call(client, server, pool, calls)
        assert first.result(10) == "first"
        assert [f.result(10) for f in futures[:5]] == [0, 1, 2, 3, 4]
        with pytest.raises(RpcError, match="no"):  # only the failing call's caller sees it
            futures[5].result(10)
        assert futures[6].result(10) == ["a", "b"]
    assert len(server.bodies) == 2  # the held request, then one batch of everything queued
    batch = server.bodies[1]
    assert isinstance(batch, list) and len(batch) == 8
    assert client.combiner is not None and client.combiner.queued == 0
    client.close()


def test_a_batch_never_exceeds_max_batch(stub: tuple[Stub, str]) -> None:
    server, url = stub
    client = ChainClient(url, combine=True, max_batch=3)
    calls: list[Callable[[], Any]] = [
        (lambda i=i: client.rpc("echo", [i])) for i in range(7)  # type: ignore[misc]
    ]
    with ThreadPoolExecutor(10) as pool:
        first, futures = _behind_held_call(client, server, pool, calls)
        first.result(10)
        assert sorted(f.result(10) for f in futures) == list(range(7))
    sizes = [len(b) if isinstance(b, list) else 1 for b in server.bodies[1:]]
    assert sizes == [3, 3, 1]
    client.close()


def test_a_failed_round_trip_fails_its_calls_and_the_next_call_works(
    stub: tuple[Stub, str],
) -> None:
    server, url = stub
    client = ChainClient(url, combine=True, max_attempts=1)
    calls: list[Callable[[], Any]] = [
        (lambda i=i: client.rpc("echo", [i])) for i in range(3)  # type: ignore[misc]
    ]
    with ThreadPoolExecutor(5) as pool:
        server.status = 502
        first, futures = _behind_held_call(client, server, pool, calls)
        for future in [first, *futures]:
            with pytest.raises(RpcError, match="HTTP 502"):
                future.result(10)
    server.status = 200
    assert client.rpc("echo", ["again"]) == "again"
    client.close()
