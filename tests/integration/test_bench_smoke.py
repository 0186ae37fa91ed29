"""Every bench runs in a tiny ``--smoke`` size here, so none can silently break (issue 13: one
shipped crashing). These assert that a bench completes, prints its figures and records them in
the shared format, never a speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(name: str, tmp_path: Path, **env: str) -> tuple[str, dict[str, object]]:
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"bench_{name}.py"), "--smoke"],
        cwd=ROOT,
        env={**os.environ, "BENCH_RESULTS_DIR": str(results), "X402C_LOG_LEVEL": "WARNING", **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    recorded = json.loads((results / f"{name}.json").read_text())
    assert recorded["bench"] == name and recorded["rows"]
    for row in recorded["rows"]:
        assert {"what", "ours", "baseline", "ratio"} <= set(row)
    return done.stdout, recorded


def test_bench_verify_smoke(tmp_path: Path) -> None:
    out, recorded = run_bench("verify", tmp_path)
    assert "ours / raw" in out and "/s" in out
    assert any("raw coincurve" in str(r["baseline"]) for r in recorded["rows"])  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.chain
@pytest.mark.postgres
@pytest.mark.xdist_group("bench")
def test_bench_paywall_smoke(tmp_path: Path) -> None:
    out, recorded = run_bench("paywall", tmp_path)
    assert "unpaid -> 402" in out and "paid (" in out
    rows: list[dict[str, object]] = recorded["rows"]  # type: ignore[assignment]
    whats = [str(r["what"]) for r in rows]
    for connections in ("2 connections", "4 connections"):  # a row per concurrency, both kinds
        assert sum(connections in w for w in whats) == 2, whats


@pytest.mark.slow
@pytest.mark.chain
@pytest.mark.postgres
@pytest.mark.redis
def test_bench_send_smoke(tmp_path: Path, worker_id: str) -> None:
    import redis

    # This xdist worker's own Redis database (the one the Celery worker tests use, one after
    # another on the same worker); the bench refuses a database holding keys.
    base = int(os.environ.get("X402C_TEST_REDIS_DB_BASE", "1"))
    db_number = base + (int(worker_id[2:]) if worker_id.startswith("gw") else 0)
    url = f"redis://127.0.0.1:6379/{db_number}"
    redis.Redis.from_url(url).flushdb()
    out, _ = run_bench("send", tmp_path, BENCH_REDIS_URL=url)
    assert "bare SDK loop" in out and "our send, 2 worker(s)" in out
    assert redis.Redis.from_url(url).dbsize() == 0  # it cleaned up its own keys
