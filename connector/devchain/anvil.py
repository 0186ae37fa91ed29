"""Start and stop anvil (Foundry's dev node) as a child process on loopback.

anvil is chosen over in-process EVMs because its block timestamps follow the wall clock even at
hundreds of blocks per second; chains that add >= 1 s per block make EIP-3009 authorizations
expire during long test runs. The binary comes from the pinned npm package
``@foundry-rs/anvil-linux-amd64`` (``make setup`` puts it in ``.devtools/bin``).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from connector.errors import ConnectorError

DEV_CHAIN_ID = 31337
DEV_MNEMONIC = "test test test test test test test test test test test junk"  # anvil's default
REPO_ROOT = Path(__file__).resolve().parents[2]


class DevChainError(ConnectorError):
    code = "devchain_error"
    title = "Dev chain error"


def find_anvil(configured: Path | None = None) -> Path:
    candidates = [
        configured,
        Path(os.environ["X402C_ANVIL_PATH"]) if os.environ.get("X402C_ANVIL_PATH") else None,
        REPO_ROOT / ".devtools" / "bin" / "anvil",
        Path(found) if (found := shutil.which("anvil")) else None,
    ]
    for path in candidates:
        if path is not None and path.is_file() and os.access(path, os.X_OK):
            return path
    raise DevChainError(
        "anvil not found: run `make setup` (installs the pinned anvil into .devtools/bin) "
        "or set X402C_ANVIL_PATH"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """True if nothing listens on ``host:port`` (checked by binding, so no traffic is sent).

    SO_REUSEADDR as servers set it: connections of a stopped server lingering in TIME_WAIT do
    not make its port look busy, a live listener does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class Anvil:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        chain_id: int = DEV_CHAIN_ID,
        accounts: int = 20,
        binary: Path | None = None,
        state_path: Path | None = None,
        state_interval_s: int | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host if host != "0.0.0.0" else "127.0.0.1")
        self.chain_id = chain_id
        self.accounts = accounts
        self.binary = binary
        self.state_path = state_path
        self.state_interval_s = state_interval_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def rpc_url(self) -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"http://{host}:{self.port}"

    def _rpc(self, method: str, params: list[Any]) -> Any:
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        response = httpx.post(self.rpc_url, json=body, timeout=5.0)
        data = response.json()
        if data.get("error"):
            raise DevChainError(f"anvil {method} failed: {data['error']}")
        return data["result"]

    def start(self, timeout_s: float = 15.0) -> Anvil:
        binary = find_anvil(self.binary)
        args = [
            str(binary),
            "--host", self.host,
            "--port", str(self.port),
            "--chain-id", str(self.chain_id),
            "--accounts", str(self.accounts),
            "--mnemonic", DEV_MNEMONIC,
            "--balance", "100000",
            "--silent",
        ]  # fmt: skip
        if self.state_path is not None:
            # Loads the file if it exists and dumps the chain into it on exit (SIGTERM included);
            # the interval also bounds what a hard kill loses.
            args += ["--state", str(self.state_path)]
            if self.state_interval_s:
                args += ["--state-interval", str(self.state_interval_s)]
        if not port_is_free(self.host, self.port):
            raise DevChainError(
                f"port {self.port} on {self.host} is in use: stop whatever listens there "
                "or choose another port"
            )
        self._proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent() if _from_main_thread() else None,
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = (self._proc.stderr.read() if self._proc.stderr else b"").decode()[:500]
                raise DevChainError(f"anvil exited at start (code {self._proc.returncode}): {err}")
            try:
                if int(self._rpc("eth_chainId", []), 16) == self.chain_id:
                    return self
            except (httpx.HTTPError, ValueError):
                time.sleep(0.02)
        self.stop()
        raise DevChainError(f"anvil did not answer on {self.rpc_url} within {timeout_s:g}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # anvil dumps its --state file on SIGTERM, then exits
        try:
            proc.wait(timeout=15 if self.state_path is not None else 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def snapshot(self) -> str:
        return str(self._rpc("evm_snapshot", []))

    def revert(self, snapshot_id: str) -> bool:
        return bool(self._rpc("evm_revert", [snapshot_id]))

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _from_main_thread() -> bool:
    # Linux sends the parent-death signal when the spawning *thread* exits: only a child started
    # by the main thread may be tied to it (the main thread ends only with the process).
    return threading.current_thread() is threading.main_thread()


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGTERM anvil when we die, even by SIGKILL: a hard-killed
    ``x402c dev`` must not leave an orphan anvil holding the port (and SIGTERM still lets anvil
    dump its ``--state`` file). None where ``prctl`` is not available."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)

    return hook
