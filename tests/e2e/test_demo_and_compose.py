"""The README's first command (the compose file is checked in tests/unit/test_compose.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.chain
@pytest.mark.slow
def test_demo_command_exits_zero_and_moves_money(tmp_path: Path) -> None:
    # As `make demo` runs it: no --data-dir (a temporary one), output not a terminal, no COLUMNS.
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**env, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "demo complete" in out
    assert "buyer paid exactly 0.180000 dUSD" in out
    assert "the rest (0.05 dUSD) went back to the buyer" in out
    assert "rejected by rule budget.day" in out
    # Not wrapped at 80 columns: a transaction hash stays on its line.
    assert re.search(r"settled, tx 0x[0-9a-f]{64}\n", out), out
    # Quiet: no Celery/kombu warnings or HTTP request logs between the steps.
    assert "No hostname was supplied" not in out + result.stderr
    assert "HTTP Request" not in out + result.stderr
    assert result.stderr.strip() == "", result.stderr[-3000:]
    # The temporary data directory (it holds master.keys) is gone.
    assert list(tmp_path.glob("x402c-demo-*")) == []
