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
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "demo", "--data-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "demo complete" in out
    assert "buyer paid exactly 0.230000 dUSD" in out
    assert "rejected by rule budget.day" in out
    assert re.search(r"settled, tx\s+0x[0-9a-f]{64}", out)
