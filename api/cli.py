"""``x402c``: the command line for newcomers and operators.

Exit codes scripts can trust: 0 success, 1 the operation failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from api.cli_deliveries import deliveries_app

app = typer.Typer(
    name="x402c",
    help="x402-connector: let AI agents pay and get paid over x402.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # main() turns user errors into one line; bugs keep a traceback
)
admin_key_app = typer.Typer(help="Admin API keys.", no_args_is_help=True)
connections_app = typer.Typer(help="Connections (customer credentials).", no_args_is_help=True)
keys_app = typer.Typer(help="Vault master keys.", no_args_is_help=True)
app.add_typer(admin_key_app, name="admin-key")
app.add_typer(connections_app, name="connections")
app.add_typer(keys_app, name="keys")
app.add_typer(deliveries_app, name="deliveries")
# Not a terminal (CI logs, pipes): no wrapping at 80 columns, so addresses and keys stay whole.
console = Console(soft_wrap=not sys.stdout.isatty())
err = Console(stderr=True, soft_wrap=not sys.stderr.isatty())


# Libraries whose INFO lines are noise between a command's own output (one per HTTP request).
_QUIET_LOGGERS = ("httpx", "httpcore", "alembic", "celery.backends", "kombu")


def _fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and an exit code: what a user error looks like (never a traceback)."""
    err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _settings() -> Any:
    from connector.logs import configure_logging
    from connector.settings import Settings

    try:
        settings = Settings()
    except Exception as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(2) from exc
    configure_logging(settings.log_format, settings.log_level)
    if settings.mode == "dev":
        from api.dev_dir import DEV_STACK_OVERRIDES, is_dev_stack_dir

        if is_dev_stack_dir(settings.data_dir):  # same outbound rules as the dev server
            given = settings.model_fields_set
            unset = {k: v for k, v in DEV_STACK_OVERRIDES.items() if k not in given}
            settings = settings.model_copy(update=unset)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return settings


def _ensure_schema(rt: Any) -> None:
    """Embedded (dev) databases are migrated on first use; production ones must be current.

    Production schema changes are a deliberate step (`x402c migrate`, the compose `migrate`
    service), so there a stale schema is a clear error instead of a silent upgrade.
    """
    from connector.storage import migrate

    if rt.settings.mode == "dev":
        migrate.upgrade(rt.engine)
    elif not migrate.is_current(rt.engine):
        _fail("the database schema is not current: run `x402c migrate` first", 2)


def _runtime() -> Any:
    from connector.runtime import Runtime

    rt = Runtime.from_settings(_settings())
    _ensure_schema(rt)
    return rt


@app.command()
def demo(
    data_dir: Annotated[Path | None, typer.Option(help="Where the demo keeps its files.")] = None,
) -> None:
    """Run the end-to-end demo: two agents pay each other on a local chain (no Docker)."""
    from api.demo import run_demo

    raise typer.Exit(run_demo(data_dir, console))


def _dev_connection_example(stack: Any) -> dict[str, Any]:
    """A connection body that works on this dev stack as is (docs/quickstart.md uses it).

    The wallet is anvil's dev account 1: a public test key, funded with DevUSD on the dev chain.
    """
    return {
        "name": "Dev agent",
        "network": stack.chain.network,
        "rpc_url": stack.chain.rpc_url,
        "facilitator_url": stack.facilitator_url,
        "asset": stack.chain.token,
        "api_key": "local-facilitator-key",
        "private_key": "0x" + stack.accounts[1].key.hex(),
        "policy": {"max_per_payment": "5000000", "budget_day": "20000000"},
    }


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT stop the same clean way (chain state saved, anvil stopped).

    SIGINT is set explicitly because a shell starts background jobs with it ignored, and
    Python then never turns it into KeyboardInterrupt.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="API port on 127.0.0.1.")] = 8402,
    chain_port: Annotated[
        int | None, typer.Option(help="anvil port (default: the last one, else 8545).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="State directory (default: X402C_DATA_DIR, .x402c).")
    ] = None,
) -> None:
    """Run the embedded stack (chain, facilitator, API, worker) until Ctrl-C or SIGTERM.

    The same data directory as every other command, so `x402c admin-key create` or
    `x402c connections list` in another shell see this server's database. The chain keeps its
    state there across restarts, on the same port.
    """
    from api.dev_dir import CHAIN_STATE_FILE
    from api.stack import start_stack
    from connector.devchain.anvil import port_is_free

    settings = _settings()
    data_dir = data_dir or settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    if chain_port is None and not (data_dir / CHAIN_STATE_FILE).exists():
        chain_port = settings.devchain_port
    if chain_port is not None and not port_is_free("127.0.0.1", chain_port):
        _fail(f"port {chain_port} on 127.0.0.1 is in use: stop it or pass --chain-port", 2)
    _stop_on_signals()
    try:
        with console.status("starting dev chain, facilitator, API and worker…"):
            stack = start_stack(data_dir, port=port, anvil_port=chain_port, persist=True)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    example = data_dir / "dev-connection.json"
    example.write_text(json.dumps(_dev_connection_example(stack), indent=2) + "\n")
    try:
        console.print(f"API         {stack.api_url}   (docs: {stack.api_url}/docs)")
        console.print(f"facilitator {stack.facilitator_url}")
        console.print(f"anvil       {stack.chain.rpc_url}  token {stack.chain.token}")
        console.print(f"network     {stack.chain.network}")
        console.print(f"data dir    {data_dir}")
        console.print(f"admin key   {stack.admin_key}   (also in {data_dir}/dev-admin.key)")
        console.print(f"connection  example body for this stack in {example}")
        console.print("ready", highlight=False)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        # A second signal must not cut the shutdown short (anvil would be orphaned mid-dump).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.close()


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8402,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
) -> None:
    """Run the API (production: Redis broker, PostgreSQL, separate workers).

    Without a broker (X402C_BROKER_URL unset, the in-memory default) the queue lives in this
    process, so a worker runs here too; otherwise run `x402c worker` processes next to it.
    """
    import uvicorn

    settings = _settings()
    if not settings.broker_url.startswith("memory"):
        uvicorn.run("api.asgi:app", host=host, port=port, workers=workers, log_level="warning")
        return
    if settings.mode == "production":
        _fail("production mode needs a broker: set X402C_BROKER_URL=redis://…", 2)
    if workers != 1:
        _fail("the in-memory queue lives in one process: use --workers 1 or set a broker", 2)
    from api.app import create_app
    from connector.runtime import Runtime
    from workers.embedded import embedded_worker

    rt = Runtime.from_settings(settings)
    _ensure_schema(rt)
    app_ = create_app(settings, runtime=rt)
    err.print("no broker configured: running an embedded worker in this process")
    with embedded_worker(rt):
        uvicorn.run(app_, host=host, port=port, log_level="warning")


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
    if _settings().broker_url.startswith("memory"):
        _fail(
            "a separate worker cannot see the in-memory queue: set X402C_BROKER_URL=redis://… "
            "(or use `x402c serve`, which runs a worker in-process without a broker)",
            2,
        )
    rt = runtime()
    # A worker whose code expects another schema than the database's would fail every job it
    # takes (an unknown column: each job left stuck until the stale-job sweep) — refuse instead
    # (production), or migrate first like `serve` (dev).
    _ensure_schema(rt)
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
    from connector.runtime import Runtime
    from connector.storage.migrate import upgrade

    rt = Runtime.from_settings(_settings())
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
        _fail("an actions key needs --connection ID (repeatable) or --connection '*'", 2)
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
        _fail(exc.detail, 2)
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
    except ValidationError as exc:
        _fail(f"invalid connection: {_validation_summary(exc)}", 2)
    except ValueError as exc:
        _fail(f"invalid connection: {config} is not JSON ({exc})", 2)
    with transaction(rt.engine) as session:
        created = service.create(
            session, rt.vault, data, actor="cli", check_url=rt.outbound().check_url
        )
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
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="Retry an earlier `pay` with its key: it never pays twice."),
    ] = None,
) -> None:
    """Pay an x402-protected URL with a connection's wallet and print the response."""
    from connector.actions.schemas import SendInput
    from connector.actions.service import run_job
    from connector.jobs import finish_request, get_job, start_job
    from connector.storage.db import transaction

    rt = _runtime()
    body = SendInput(url=url, max_amount=max_amount).model_dump(exclude_none=True)
    if idempotency_key is None:  # money moves: every payment carries a key, shown for a retry
        idempotency_key = "cli-" + secrets.token_hex(12)
        err.print(
            f"idempotency key: {idempotency_key} (retry with --idempotency-key to never pay twice)"
        )
    with transaction(rt.engine) as session:
        started = start_job(
            session,
            connection_id=connection_id,
            action="send",
            body=body,
            idempotency_key=idempotency_key,
        )
    job = started.job
    try:
        with console.status(f"paying {url}…"):
            run_job(rt, job.id)
    finally:
        with transaction(rt.engine) as session:
            finish_request(session, started.idempotency_record_id)
    with transaction(rt.engine) as session:
        done = get_job(session, job.id)
    console.print(f"job {done.id}: {done.status}")
    console.print_json(json.dumps({"result": done.result, "error": done.error}))
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
            ChainClient(info.rpc_url, combine=True),
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


def _validation_summary(exc: Any) -> str:
    """Pydantic's errors as one line: ``field: message; field: message``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg')}"
        for e in exc.errors()
    )


def _user_error(exc: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit code for an error the user can fix, else None."""
    from pydantic import ValidationError
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from connector.errors import ConnectorError, ValidationFailed

    if isinstance(exc, ValidationFailed):
        where = f" ({exc.field})" if exc.field else ""
        return f"{exc.detail}{where}", 2
    if isinstance(exc, ConnectorError):
        return exc.detail, 1
    if isinstance(exc, ValidationError):
        return f"invalid input: {_validation_summary(exc)}", 2
    if isinstance(exc, OperationalError | ProgrammingError):
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        return f"database: {first}", 1
    if isinstance(exc, OSError):
        return str(exc), 1
    return None


def main() -> None:
    """Console entry point: user errors become one line and an exit code, not a traceback."""
    try:
        app(prog_name="x402c")
    except SystemExit:
        raise
    except Exception as exc:
        known = _user_error(exc)
        if known is None:
            raise
        err.print(f"[red]error:[/] {known[0]}", highlight=False, soft_wrap=True)
        sys.exit(known[1])


if __name__ == "__main__":  # pragma: no cover
    main()
