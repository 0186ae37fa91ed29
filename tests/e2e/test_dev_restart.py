"""`x402c dev` as a user runs it: a subprocess that must survive a restart.

Start it, create a connection, move money, stop it with SIGTERM, start it again: the same chain
state and address, the same single bootstrap key, the connection still works; SIGINT stops it
as cleanly; no anvil is left behind. Also: a busy port is one line, not a traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.stack import free_port
from connector.devchain.deploy import dev_accounts

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.chain, pytest.mark.slow]


def anvil_pids(chain_port: int) -> list[int]:
    """anvil processes listening on ``chain_port``, found by their command lines."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"anvil") and str(chain_port).encode() in args:
            found.append(int(entry.name))
    return found


class DevProcess:
    """``x402c dev`` on ``data_dir``; with ``cwd`` instead, on the default ``.x402c`` there."""

    def __init__(
        self, data_dir: Path | None, port: int, chain_port: int, cwd: Path | None = None
    ) -> None:
        args = ["dev", "--port", str(port), "--chain-port", str(chain_port)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("X402C_")}
        if data_dir is not None:
            args += ["--data-dir", str(data_dir)]
            env["X402C_DATA_DIR"] = str(data_dir)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", *args],
            cwd=cwd or ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "PYTHONPATH": str(ROOT)},
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.strip() == "ready":
                self._ready.set()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                stderr = self.proc.stderr.read() if self.proc.stderr else ""
                pytest.fail(f"x402c dev did not start: {self.lines} {stderr[-3000:]}")

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)

    def words(self, label: str) -> list[str]:
        """The words after ``label`` on the first line starting with it."""
        line = next(raw for raw in self.lines if raw.startswith(label))
        return line[len(label) :].split()

    def value(self, label: str) -> str:
        return self.words(label)[0]


@contextmanager
def running(data_dir: Path, port: int, chain_port: int) -> Iterator[DevProcess]:
    dev = DevProcess(data_dir, port, chain_port)
    try:
        dev.wait_ready()
        yield dev
    finally:
        if dev.proc.poll() is None:
            dev.proc.kill()
            dev.proc.wait(timeout=30)


def action(api: httpx.Client, conn: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
    response = api.post(
        f"/v1/connections/{conn}/actions/{name}",
        params={"wait": 60},
        json=body,
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert response.status_code in (200, 202), response.text
    job = response.json()
    assert job["status"] == "succeeded", job
    result: dict[str, Any] = job["result"]
    return result


def test_dev_survives_sigterm_restart_and_leaves_no_orphans(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    port, chain_port = free_port(), free_port()
    payer, payee = dev_accounts(6)[4], dev_accounts(6)[5]

    with running(data_dir, port, chain_port) as dev:
        key = (data_dir / "dev-admin.key").read_text().strip()
        assert dev.value("admin key") == key
        rpc, token = dev.value("anvil"), dev.words("anvil")[-1]
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"authorization": f"Bearer {key}"},
            timeout=90,
        )
        created = api.post(
            "/v1/admin/connections",
            json={
                "name": "restart test",
                "network": "eip155:31337",
                "rpc_url": rpc,
                "facilitator_url": f"http://127.0.0.1:{port}/facilitator",
                "asset": token,
                "private_key": "0x" + payer.key.hex(),
            },
        )
        assert created.status_code == 201, created.text
        conn = created.json()["id"]
        before = int(action(api, conn, "balance", {})["balance"])
        paid = action(api, conn, "send", {"to": payee.address, "amount": "1234"})
        assert paid["payment"]["state"] == "settled", paid
        after_payment = int(action(api, conn, "balance", {})["balance"])
        assert after_payment == before - 1234
        api.close()
        assert dev.stop(signal.SIGTERM) == 0
        assert "stopping…" in dev.lines
    assert anvil_pids(chain_port) == [], "anvil left running after SIGTERM"

    with running(data_dir, port, chain_port) as dev:
        assert dev.value("admin key") == key, "the bootstrap key is reused, not replaced"
        assert dev.value("anvil") == rpc and dev.words("anvil")[-1] == token
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"authorization": f"Bearer {key}"},
            timeout=90,
        )
        # Same chain state: the payment made before the restart is still on chain.
        assert int(action(api, conn, "balance", {})["balance"]) == after_payment
        report = api.post(f"/v1/admin/connections/{conn}/test").json()
        rpc_check = next(c for c in report["checks"] if c["name"].startswith("rpc"))
        assert rpc_check["ok"], report
        keys = api.get("/v1/admin/keys").json()["data"]
        assert [k["name"] for k in keys].count("embedded bootstrap") == 1
        api.close()
        assert dev.stop(signal.SIGINT) == 0
    assert anvil_pids(chain_port) == [], "anvil left running after SIGINT"


def test_dev_busy_port_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        busy = blocker.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "api.cli", "dev", "--port", str(busy),
             "--chain-port", str(free_port()), "--data-dir", str(tmp_path)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode != 0
        assert "Traceback" not in result.stderr + result.stdout
        assert f"port {busy}" in result.stderr and "in use" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
