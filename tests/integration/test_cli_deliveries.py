"""``x402c deliveries``: list, redeliver and retry-pending against a real database."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from api.cli import app
from tests.integration.test_webhooks_admin_api import deliveries, rows, subscription


def run(db_url: str, tmp_path: Path, *args: str) -> tuple[int, str]:
    env = {"X402C_DATABASE_URL": db_url, "X402C_DATA_DIR": str(tmp_path), "COLUMNS": "200"}
    result = CliRunner().invoke(app, ["deliveries", *args], env=env)
    return result.exit_code, result.output


def test_list_redeliver_and_retry_pending(engine: Engine, db_url: str, tmp_path: Path) -> None:
    later = datetime.now(UTC) + timedelta(hours=2)
    sub_a, sub_b = subscription(engine, "conn_a"), subscription(engine, "conn_b")
    (dead,) = deliveries(engine, sub_a, "dead", 1, attempts=10, last_error="HTTP 503")
    waiting = deliveries(engine, sub_a, "pending", 2, attempts=1, next_attempt_at=later)
    (other,) = deliveries(engine, sub_b, "pending", 1, attempts=1, next_attempt_at=later)

    code, out = run(db_url, tmp_path, "list", "--status", "dead")
    assert code == 0 and dead in out and "503" in out and waiting[0] not in out
    code, out = run(db_url, tmp_path, "list", "--json", "--limit", "2")
    listed = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [d["id"] for d in listed] == [other, waiting[1]]  # newest first
    assert run(db_url, tmp_path, "list", "--status", "bogus")[0] == 2

    code, out = run(db_url, tmp_path, "retry-pending", "--connection", "conn_a")
    assert (code, out.strip()) == (0, "requeued 2")
    state = rows(engine)
    assert all(state[i].next_attempt_at <= datetime.now(UTC) for i in waiting)  # type: ignore[operator]
    assert state[other].next_attempt_at == later

    assert run(db_url, tmp_path, "redeliver")[0] == 2  # neither an id nor --since
    code, out = run(db_url, tmp_path, "redeliver", dead)
    assert (code, out.strip()) == (0, "requeued 1") and rows(engine)[dead].status == "pending"
    assert run(db_url, tmp_path, "redeliver", "whd_nope")[0] == 1
    since = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    code, out = run(db_url, tmp_path, "redeliver", "--since", since, "--status", "delivered")
    assert (code, out.strip()) == (0, "requeued 0")
    assert run(db_url, tmp_path, "redeliver", "--since", since, "--status", "sending")[0] == 2
