"""bench/bench_settle.py keeps working: a tiny run (fresh anvils, the facilitator from a config
file in its own process) settles everything and writes the results file in the agreed shape.
Its numbers are not asserted: speed is judged by the full benchmark, never by a test."""

from __future__ import annotations

import importlib.util
import json
from datetime import datetime
from pathlib import Path

import pytest

pytestmark = [pytest.mark.chain, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_bench_settle_smoke_run_writes_its_results(tmp_path: Path) -> None:
    path = ROOT / "bench" / "bench_settle.py"
    spec = importlib.util.spec_from_file_location("bench_settle", path)
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench_settle.json"
    bench.main(["--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["bench"] == "bench_settle"
    assert datetime.fromisoformat(data["measured_at"]).utcoffset() is not None
    assert data["rows"] and all(
        set(row) == {"what", "ours", "baseline", "ratio"} for row in data["rows"]
    )
    ratio = data["rows"][0]["ratio"]
    assert isinstance(ratio, float) and ratio > 0
    assert data["rows"][1]["ours"] == "0"  # no nonce errors
