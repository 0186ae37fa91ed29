"""bench/bench_webhooks.py in its tiny smoke mode: it must run to the end and report its figures
(never a speed: speed is what the bench itself measures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_webhooks_smoke_completes_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "bench_webhooks.json"
    result = subprocess.run(
        [sys.executable, "bench/bench_webhooks.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "deliveries/s" in result.stdout and "p50" in result.stdout
    assert "deliveries out of sequence order: 0" in result.stdout
    doc = json.loads(out.read_text())
    assert doc["bench"] == "bench_webhooks" and doc["measured_at"].endswith("Z")
    assert len(doc["rows"]) == 3
    for row in doc["rows"]:
        assert set(row) == {"what", "ours", "baseline", "ratio"}
        assert row["ratio"] is None or isinstance(row["ratio"], float | int)
