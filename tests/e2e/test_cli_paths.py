"""The CLI as a new user meets it: one data directory, migrations on first use, user errors as
one line (never a traceback), and `x402c serve` that runs queued actions without a broker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from api.stack import free_port
from connector.devchain.deploy import DevChainInfo, dev_accounts

ROOT = Path(__file__).resolve().parents[2]


def x402c(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("X402C_")}
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        cwd=data_dir,
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "PYTHONPATH": str(ROOT), "X402C_DATA_DIR": str(data_dir / ".x402c"),
             "X402C_LOG_LEVEL": "INFO", **env},
    )  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_fresh_directory_commands_work_without_migrate(tmp_path: Path) -> None:
    listed = x402c(tmp_path, "connections", "list")
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    created = x402c(tmp_path, "admin-key", "create", "--name", "ops", "--scope", "admin")
    assert created.returncode == 0, created.stderr
    key_id, key = created.stdout.split()[0], created.stdout.split()[-1]
    assert key_id.startswith("key_") and key.startswith("x402c_sk_")
    assert "INFO" not in created.stderr  # no alembic/httpx chatter between the output lines


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    assert_one_line_error(x402c(tmp_path, "connections", "test", "conn_nope"), "conn_nope")
    assert_one_line_error(
        x402c(tmp_path, "admin-key", "create", "--name", "x", "--scope", "root"), "scopes"
    )
    (tmp_path / "c.json").write_text('{"name": "x"}')
    assert_one_line_error(x402c(tmp_path, "connections", "create", "c.json"), "network")
    (tmp_path / "bad.json").write_text("{")
    assert_one_line_error(x402c(tmp_path, "connections", "create", "bad.json"), "not JSON")
    assert_one_line_error(x402c(tmp_path, "connections", "create", "nope.json"), "nope.json")
    production = {
        "X402C_MODE": "production",
        "X402C_DATABASE_URL": f"sqlite:///{tmp_path / 'prod.db'}",
        "X402C_MASTER_KEYS": "k1:" + "A" * 43 + "=",
    }
    assert_one_line_error(x402c(tmp_path, "connections", "list", **production), "x402c migrate")
    assert_one_line_error(x402c(tmp_path, "worker"), "X402C_BROKER_URL")
    # A worker never runs against a schema its code does not match (every job would fail).
    broker = {"X402C_BROKER_URL": "redis://127.0.0.1:1/0"}  # a closed port: never reached
    assert_one_line_error(x402c(tmp_path, "worker", **production, **broker), "x402c migrate")


@pytest.mark.chain
@pytest.mark.slow
def test_serve_without_a_broker_runs_actions(tmp_path: Path, devchain: DevChainInfo) -> None:
    """The default in-memory queue: `serve` must run the job, not leave it queued forever."""
    key = x402c(tmp_path, "admin-key", "create", "--name", "ops", "--scope", "admin")
    assert key.returncode == 0, key.stderr
    admin_key = key.stdout.split()[-1]
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("X402C_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port)],
        cwd=tmp_path,
        env={
            **clean,
            "PYTHONPATH": str(ROOT),
            "X402C_DATA_DIR": str(tmp_path / ".x402c"),
            "X402C_OUTBOUND_ALLOW_LOOPBACK": "true",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"authorization": f"Bearer {admin_key}"},
            timeout=60,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if api.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
        created = api.post(
            "/v1/admin/connections",
            json={
                "name": "serve",
                "network": devchain.network,
                "rpc_url": devchain.rpc_url,
                "facilitator_url": "http://127.0.0.1:9/",
                "asset": devchain.token,
                "private_key": "0x" + dev_accounts(2)[1].key.hex(),
            },
        )
        assert created.status_code == 201, created.text
        job = api.post(
            f"/v1/connections/{created.json()['id']}/actions/balance",
            params={"wait": 30},
            json={},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        ).json()
        assert job["status"] == "succeeded", job
        assert int(job["result"]["balance"]) > 0
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert "embedded worker" in (server.stderr.read() if server.stderr else "")


def test_serve_refuses_several_processes_on_the_in_memory_queue(tmp_path: Path) -> None:
    result = x402c(tmp_path, "serve", "--workers", "2")
    assert_one_line_error(result, "--workers 1")
