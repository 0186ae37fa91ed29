"""``x402c``: the command line for newcomers and operators.

Exit codes scripts can trust: 0 success, 1 the operation failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    name="x402c",
    help="x402-connector: let AI agents pay and get paid over x402.",
    no_args_is_help=True,
    add_completion=False,
)
admin_key_app = typer.Typer(help="Admin API keys.", no_args_is_help=True)
connections_app = typer.Typer(help="Connections (customer credentials).", no_args_is_help=True)
keys_app = typer.Typer(help="Vault master keys.", no_args_is_help=True)
app.add_typer(admin_key_app, name="admin-key")
app.add_typer(connections_app, name="connections")
app.add_typer(keys_app, name="keys")
console = Console()
err = Console(stderr=True)


def _settings() -> Any:
    from connector.logs import configure_logging
    from connector.settings import Settings

    try:
        settings = Settings()
    except Exception as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(2) from exc
    configure_logging(settings.log_format, settings.log_level)
    return settings


def _runtime() -> Any:
    from connector.runtime import Runtime

    return Runtime.from_settings(_settings())


@app.command()
def demo(
    data_dir: Annotated[Path | None, typer.Option(help="Where the demo keeps its files.")] = None,
) -> None:
    """Run the end-to-end demo: two agents pay each other on a local chain (no Docker)."""
    from api.demo import run_demo

    raise typer.Exit(run_demo(data_dir, console))


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="API port on 127.0.0.1.")] = 8402,
    data_dir: Annotated[Path, typer.Option(help="State directory.")] = Path(".x402c/dev"),
) -> None:
    """Run the embedded stack (chain, facilitator, API, worker) until Ctrl-C."""
    from api.stack import start_stack

    data_dir.mkdir(parents=True, exist_ok=True)
    with console.status("starting dev chain, facilitator, API and worker…"):
        stack = start_stack(data_dir, port=port)
    console.print(f"API        {stack.api_url}   (docs: {stack.api_url}/docs)")
    console.print(f"facilitator {stack.facilitator_url}")
    console.print(f"anvil      {stack.chain.rpc_url}  token {stack.chain.token}")
    console.print(f"admin key  {stack.admin_key}   (shown once)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        stack.close()


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8402,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
) -> None:
    """Run the API (production: Redis broker, PostgreSQL, separate workers)."""
    import uvicorn

    _settings()
    uvicorn.run("api.asgi:app", host=host, port=port, workers=workers, log_level="warning")


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Threads (or processes) of this worker.")] = 8,
    pool: Annotated[
        str, typer.Option(help="threads, prefork or solo (see docs/operations.md).")
    ] = "threads",
    loglevel: Annotated[str, typer.Option(help="Celery's own log level.")] = "INFO",
) -> None:
    """Run a Celery worker (stateless; run as many as you need)."""
    from connector.storage.db import warm_pool
    from workers.celery_app import celery_app
    from workers.runtime import runtime
    from workers.wiring import HOT_TABLES, quiet_task_logs, wire

    if pool not in ("threads", "prefork", "solo"):
        raise typer.BadParameter("pool must be threads, prefork or solo", param_hint="--pool")
    _settings()
    rt = runtime()
    wire(rt, celery_app)
    if not rt.settings.worker_task_logs:
        quiet_task_logs()
    if pool != "prefork":  # prefork children must open their own connections after the fork
        warm_pool(rt.engine, concurrency, list(HOT_TABLES))
    celery_app.worker_main(
        ["worker", f"--pool={pool}", f"--concurrency={concurrency}", f"--loglevel={loglevel}"]
    )


@app.command()
def beat() -> None:
    """Run the Celery beat scheduler (exactly one per deployment)."""
    import workers.tasks
    import workers.webhook_tasks  # noqa: F401
    from workers.celery_app import celery_app

    _settings()
    celery_app.start(["beat", "--loglevel=INFO"])


@app.command("beat-health")
def beat_health(
    max_age: Annotated[int, typer.Option(help="Oldest acceptable beat tick, seconds.")] = 120,
) -> None:
    """Exit 0 when a beat task ran within --max-age seconds (a health check for beat)."""
    from connector.beat import last_tick
    from connector.runtime import Runtime

    rt = Runtime.from_settings(_settings())
    tick = last_tick(rt.engine)
    age = None if tick is None else (datetime.now(UTC) - tick).total_seconds()
    typer.echo(f"last beat tick: {tick.isoformat() if tick else 'never'}")
    if age is None or age > max_age:
        raise typer.Exit(1)


@app.command()
def migrate() -> None:
    """Apply database migrations (safe to run repeatedly)."""
    from connector.storage.migrate import upgrade

    rt = _runtime()
    upgrade(rt.engine)
    console.print("[green]database is at the newest schema[/]")


@admin_key_app.command("create")
def admin_key_create(
    name: Annotated[str, typer.Option(help="Who or what uses the key.")],
    scope: Annotated[list[str], typer.Option(help="admin, read or actions (repeatable).")],
    principal: Annotated[
        str,
        typer.Option(
            help="The person accountable for the key (four-eyes approvals count principals)."
        ),
    ] = "cli",
    connection: Annotated[
        list[str] | None,
        typer.Option(help="A connection an actions key may use (repeatable; '*' for all)."),
    ] = None,
) -> None:
    """Create an admin API key; it is printed once and never again."""
    from connector import admin_keys
    from connector.errors import ValidationFailed
    from connector.storage.db import transaction

    if "actions" in scope and "admin" not in scope and not connection:
        err.print("[red]an actions key needs --connection ID (repeatable) or --connection '*'[/]")
        raise typer.Exit(2)
    rt = _runtime()
    try:
        with transaction(rt.engine) as session:
            row, key = admin_keys.create_key(
                session,
                name=name,
                scopes=scope,
                actor="cli",
                principal=principal,
                connections=connection or None,
            )
    except ValidationFailed as exc:
        err.print(f"[red]{exc.detail}[/]")
        raise typer.Exit(2) from exc
    console.print(f"{row.id}  scopes={','.join(row.scopes)}  principal={row.principal}")
    console.print(key)


@connections_app.command("create")
def connections_create(
    config: Annotated[Path, typer.Argument(help="JSON file with the connection fields.")],
) -> None:
    """Create a connection from a JSON file (see docs/admin-api.md for the fields)."""
    from pydantic import ValidationError

    from connector.connections import service
    from connector.connections.schemas import ConnectionCreate
    from connector.storage.db import transaction

    rt = _runtime()
    try:
        data = ConnectionCreate.model_validate(json.loads(config.read_text()))
    except (ValidationError, ValueError) as exc:
        err.print(f"[red]invalid connection:[/] {exc}")
        raise typer.Exit(2) from exc
    from connector.errors import ValidationFailed

    try:
        with transaction(rt.engine) as session:
            created = service.create(
                session, rt.vault, data, actor="cli", check_url=rt.outbound().check_url
            )
    except ValidationFailed as exc:
        err.print(f"[red]invalid connection:[/] {exc.detail}")
        raise typer.Exit(2) from exc
    console.print_json(created.model_dump_json())


@connections_app.command("list")
def connections_list() -> None:
    """List connections (secrets are never shown)."""
    from connector.connections import service
    from connector.storage.db import transaction

    rt = _runtime()
    with transaction(rt.engine) as session:
        rows, _ = service.list_page(session, limit=200)
        for conn in rows:
            view = service.view(conn)
            address = view.wallet_address or view.pay_to  # receive-only: no wallet
            console.print(f"{view.id}  {view.name}  {view.network}  {address}")


@connections_app.command("test")
def connections_test(connection_id: str) -> None:
    """Check a connection's facilitator, RPC, wallet and webhook; exit 1 if any check fails."""
    from connector.connections.testing import run_connection_test

    report = run_connection_test(_runtime(), connection_id)
    for check in report.checks:
        mark = "[green]ok[/]" if check.ok else "[red]FAIL[/]"
        console.print(f"{mark:>16} {check.name:<15} {check.latency_ms:>5} ms  {check.detail}")
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def pay(
    url: str,
    connection_id: Annotated[str, typer.Option("--connection", help="Paying connection.")],
    max_amount: Annotated[str | None, typer.Option(help="Refuse prices above this.")] = None,
) -> None:
    """Pay an x402-protected URL with a connection's wallet and print the response."""
    from connector.actions.schemas import SendInput
    from connector.actions.service import run_job
    from connector.jobs import get_job, start_job
    from connector.storage.db import transaction

    rt = _runtime()
    body = SendInput(url=url, max_amount=max_amount).model_dump(exclude_none=True)
    with transaction(rt.engine) as session:
        job = start_job(
            session, connection_id=connection_id, action="send", body=body, idempotency_key=None
        ).job
    with console.status(f"paying {url}…"):
        run_job(rt, job.id)
    with transaction(rt.engine) as session:
        done = get_job(session, job.id)
    console.print_json(json.dumps(done.result or done.error))
    raise typer.Exit(0 if done.status == "succeeded" else 1)


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Re-wrap every stored secret under the active (first) master key; prints counts."""
    from connector.vault.rotation import keys_in_use, rewrap_all

    rt = _runtime()
    with console.status("re-wrapping secrets…"):
        report = rewrap_all(rt.engine, rt.vault)
    console.print(f"re-wrapped {report.rewrapped}, already current {report.already_current}")
    console.print(f"keys in use now: {dict(keys_in_use(rt.engine))}")
    if report.failed:
        for failure in report.failed:
            err.print(f"[red]failed:[/] {failure}")
        raise typer.Exit(1)


@app.command()
def devchain(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8545,
    state_file: Annotated[Path, typer.Option(help="Where to write the deployment.")] = Path(
        ".x402c/devchain.json"
    ),
) -> None:
    """Start anvil, deploy the DevUSD token and fund the dev accounts; run until Ctrl-C."""
    from connector.devchain.deploy import start_devchain

    node, info = start_devchain(host=host, port=port, state_file=state_file)
    console.print_json(info.to_json())
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()


@app.command()
def facilitator(
    config: Annotated[
        Path | None,
        typer.Option(
            envvar="X402C_FACILITATOR_CONFIG",
            help="TOML/JSON config (networks, tokens, signer, API keys); see docs/facilitator.md.",
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Default: config `host`.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: config `port` (8403).")] = None,
    devchain_state: Annotated[
        Path, typer.Option(help="Without a config: the file written by `x402c devchain`.")
    ] = Path(".x402c/devchain.json"),
    gas_key_index: Annotated[int, typer.Option(help="Dev chain only: account paying gas.")] = 19,
) -> None:
    """Run a facilitator: from a config file / X402C_FACILITATOR_* environment (any number of
    networks), or, with neither, for the local dev chain."""
    import os

    import uvicorn

    from api.facilitator_app import create_facilitator_app

    if config is None and not os.environ.get("X402C_FACILITATOR_NETWORKS"):
        from connector.chain import ChainClient
        from connector.devchain.deploy import DevChainInfo, dev_accounts
        from connector.facilitator.local import LocalFacilitator

        if not devchain_state.exists():
            err.print(f"[red]{devchain_state} not found:[/] start `x402c devchain` first")
            raise typer.Exit(2)
        info = DevChainInfo.from_file(devchain_state)
        local = LocalFacilitator(
            ChainClient(info.rpc_url),
            dev_accounts(gas_key_index + 1)[gas_key_index],
            network=info.network,
            assets={info.token},
        )
        app_ = create_facilitator_app(local)
        uvicorn.run(app_, host=host or "127.0.0.1", port=port or 8403, log_level="warning")
        return

    multi, cfg = _configured_facilitator(config)
    keys = [k.get_secret_value() for k in cfg.api_keys]
    multi.check_gas()
    multi.start_gas_monitor(cfg.gas_check_interval_s)
    console.print(
        f"facilitator signer {multi.signer.address} on "
        + ", ".join(sorted(multi.by_network))
        + (" (API key required)" if keys else " (no API key)")
    )
    try:
        uvicorn.run(
            create_facilitator_app(multi, api_keys=keys, metrics=True),
            host=host or cfg.host,
            port=port or cfg.port,
            log_level="warning",
        )
    finally:
        multi.close()


def _configured_facilitator(config: Path | None) -> Any:
    from pydantic import ValidationError

    from connector.errors import ConnectorError
    from connector.facilitator.config import load_config
    from connector.facilitator.multi import MultiFacilitator

    try:
        cfg = load_config(config)
        vault = None
        if cfg.signer.vault_token is not None or cfg.signer.vault_token_file is not None:
            vault = _runtime().vault
        signer = cfg.signer_account(vault)
    except (ValidationError, ConnectorError, OSError, ValueError) as exc:
        err.print(f"[red]facilitator configuration error:[/] {exc}")
        raise typer.Exit(2) from exc
    return MultiFacilitator.from_config(cfg, signer), cfg


@app.command("facilitator-seal-key")
def facilitator_seal_key(
    key_file: Annotated[Path, typer.Option(help="File holding the signer's hex private key.")],
) -> None:
    """Encrypt a facilitator signer key under the vault's master keys; prints the token to put in
    the facilitator config as `signer.vault_token` (then delete the plain key file)."""
    from eth_account import Account

    from connector.facilitator.config import VAULT_FIELD, VAULT_OWNER

    key = key_file.read_text().strip()
    try:
        address = Account.from_key(key).address
    except (ValueError, TypeError) as exc:
        err.print(f"[red]{key_file} does not hold a valid private key[/]")
        raise typer.Exit(2) from exc
    token = _runtime().vault.encrypt(key, owner=VAULT_OWNER, field=VAULT_FIELD)
    err.print(f"signer address {address}")
    console.print(token)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
