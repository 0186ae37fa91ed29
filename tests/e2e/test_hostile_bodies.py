"""A deeply nested body used to kill the process (SIGSEGV in the C JSON scanner, because py_ecc
raises the recursion limit to 100,000). These run the server in a child process, so a crash
fails the test instead of taking pytest down with it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
NESTED = b"[" * 100_000 + b"1" + b"]" * 100_000  # ~200 KB
NESTED_OBJECTS = b'{"a":' * 100_000 + b"1" + b"}" * 100_000  # ~600 KB, the report's shape


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``x402c serve`` as an operator runs it (SQLite, in-memory broker), in a child process."""
    data = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {
        **os.environ,
        "X402C_DATA_DIR": str(data),
        "X402C_BROKER_URL": "memory://",
        "X402C_API_MAX_BODY_BYTES": str(1024 * 1024),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        try:
            httpx.get(url + "/healthz", timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "x402c serve did not start"
            time.sleep(0.2)
    yield proc, url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("body", [NESTED, NESTED_OBJECTS], ids=["arrays", "objects"])
@pytest.mark.parametrize(
    "path", ["/v1/admin/connections", "/v1/connections/con_x/actions/send", "/v1/hooks"]
)
def test_nested_body_is_refused_and_the_server_lives(
    served: tuple[subprocess.Popen[bytes], str], body: bytes, path: str
) -> None:
    proc, url = served
    headers = {"content-type": "application/json"}
    # No key: refused before the body is read.
    response = httpx.post(url + path, content=body, headers=headers, timeout=30)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    # A key-shaped token: the body is read (bounded) but refused before any parser sees it.
    response = httpx.post(
        url + path,
        content=body,
        headers={**headers, "authorization": "Bearer x402c_sk_not_a_real_key"},
        timeout=30,
    )
    assert response.status_code == 422, response.text
    assert "nested deeper" in response.json()["detail"]
    assert proc.poll() is None
    assert httpx.get(url + "/healthz", timeout=10).status_code in (200, 503)


@pytest.mark.slow
def test_public_paywall_refuses_a_nested_body(served: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, url = served
    response = httpx.post(
        url + "/pay/prq_x", content=NESTED_OBJECTS, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert proc.poll() is None


def test_facilitator_app_survives_a_nested_body() -> None:
    script = (
        "from fastapi.testclient import TestClient\n"
        "from api.facilitator_app import create_facilitator_app\n"
        "client = TestClient(create_facilitator_app(None))\n"
        "for path in ('/verify', '/settle'):\n"
        "    for depth in (100000, 20000):\n"
        "        r = client.post(path, content=b'[' * depth + b']' * depth)\n"
        "        print(r.status_code, r.headers['content-type'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Over the facilitator's 64 KiB: 413; under it but 20,000 deep: a malformed request (400).
    problem = "application/problem+json"
    assert result.stdout.split() == ["413", problem, "400", problem] * 2, result.stdout


def test_recursion_limit_is_sane_after_every_import() -> None:
    script = (
        "import sys\n"
        "import api.asgi, api.stack, workers.tasks, py_ecc, eth_account, web3\n"
        "print(sys.getrecursionlimit())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "X402C_BROKER_URL": "memory://"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip()) <= 1000
