"""The embedded stack in one process: dev chain, local facilitator, API, Celery worker.

``x402c dev`` keeps it running; ``x402c demo`` and the end-to-end tests drive it. Nothing here
needs Docker, Redis or PostgreSQL: SQLite file, in-memory broker, anvil child process.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from eth_account.signers.local import LocalAccount

from api.app import create_app
from api.dev_dir import BOOTSTRAP_KEY_FILE, CHAIN_STATE_FILE, DEV_STACK_OVERRIDES
from api.facilitator_app import create_facilitator_app
from connector import admin_keys
from connector.chain import ChainClient
from connector.devchain.anvil import Anvil, port_is_free
from connector.devchain.deploy import DevChainInfo, dev_accounts, start_devchain
from connector.errors import ConnectorError
from connector.facilitator.local import LocalFacilitator
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage import migrate
from connector.storage.db import transaction


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StackError(ConnectorError):
    """The embedded stack cannot start for a reason the user can fix (one line says which)."""

    code = "stack_error"
    title = "Embedded stack error"


def bootstrap_admin_key(rt: Runtime, data_dir: Path | None) -> str:
    """The dev stack's admin key: created once, kept in ``data_dir`` (mode 0600), reused.

    Without a ``data_dir`` (demo, tests) a fresh key is made each time. A saved key that no
    longer authenticates (database reset, key revoked) is replaced, so there is always exactly
    one working bootstrap key and restarts do not pile up new ones.
    """
    path = data_dir / BOOTSTRAP_KEY_FILE if data_dir is not None else None
    if path is not None and path.exists():
        saved = path.read_text().strip()
        with transaction(rt.engine) as session:
            if admin_keys.authenticate(session, saved) is not None:
                return saved
    with transaction(rt.engine) as session:
        _, key = admin_keys.create_key(
            session, name="embedded bootstrap", scopes=["admin"], actor="system"
        )
    if path is not None:
        path.touch(mode=0o600)
        path.write_text(key + "\n")
    return key


class ServerThread:
    """uvicorn in a daemon thread, bound to loopback."""

    def __init__(self, app: Any, port: int, host: str = "127.0.0.1") -> None:
        self.url = f"http://{host}:{port}"
        self._server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@dataclass
class Stack:
    settings: Settings
    runtime: Runtime
    chain: DevChainInfo
    anvil: Anvil
    api_url: str
    facilitator_url: str
    admin_key: str
    accounts: list[LocalAccount]
    _exit: ExitStack = field(default_factory=ExitStack, repr=False)

    def close(self) -> None:
        self._exit.close()


def start_stack(
    data_dir: Path,
    *,
    port: int | None = None,
    anvil_port: int | None = None,
    worker_concurrency: int = 4,
    extra_settings: dict[str, Any] | None = None,
    persist: bool = False,
) -> Stack:
    """Start the stack on ``data_dir``.

    ``persist`` (``x402c dev``): the chain keeps its state in ``data_dir`` across restarts and
    comes back on the same port, and the bootstrap admin key is created once and reused.
    Otherwise (demo, tests) everything is fresh.
    """
    from workers.embedded import embedded_worker

    if port is not None and not port_is_free("127.0.0.1", port):
        raise StackError(
            f"port {port} on 127.0.0.1 is in use (another `x402c dev`?): stop it or pass --port"
        )
    exit_stack = ExitStack()
    try:
        node, info = start_devchain(
            port=anvil_port,
            state_file=data_dir / "devchain.json",
            fund_count=19,
            chain_state=data_dir / CHAIN_STATE_FILE if persist else None,
        )
        exit_stack.callback(node.stop)
        port = port or free_port()
        api_url = f"http://127.0.0.1:{port}"
        settings = Settings(
            data_dir=data_dir,
            public_base_url=api_url,
            broker_url="memory://localhost/",
            **DEV_STACK_OVERRIDES,
            default_rpc_url=info.rpc_url,
            default_facilitator_url=f"{api_url}/facilitator",
            **(extra_settings or {}),
        )
        rt = Runtime.from_settings(settings)
        exit_stack.callback(rt.close)
        migrate.upgrade(rt.engine)
        accounts = dev_accounts(20)
        chain_client = ChainClient(info.rpc_url, combine=True)
        exit_stack.callback(chain_client.close)
        facilitator = LocalFacilitator(
            chain_client, accounts[19], network=info.network, assets={info.token}
        )
        app = create_app(runtime=rt, facilitator_app=create_facilitator_app(facilitator))
        exit_stack.enter_context(embedded_worker(rt, concurrency=worker_concurrency))
        server = ServerThread(app, port).start()
        exit_stack.callback(server.stop)
        key = bootstrap_admin_key(rt, data_dir if persist else None)
        return Stack(
            settings=settings,
            runtime=rt,
            chain=info,
            anvil=node,
            api_url=api_url,
            facilitator_url=f"{api_url}/facilitator",
            admin_key=key,
            accounts=accounts,
            _exit=exit_stack,
        )
    except BaseException:
        exit_stack.close()
        raise
