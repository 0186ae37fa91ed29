"""A hard-killed parent (SIGKILL: no atexit, no signal handler) takes its anvil with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from connector.devchain.anvil import port_is_free

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import sys, time
from connector.devchain.anvil import Anvil
node = Anvil().start()
print(node.port, node._proc.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too (reaped by init eventually)
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_sigkilled_parent_leaves_no_orphan_anvil() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert parent.stdout is not None
        port_text, pid_text = parent.stdout.readline().split()
        port, anvil_pid = int(port_text), int(pid_text)
        assert _alive(anvil_pid) and not port_is_free("127.0.0.1", port)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30  # a bound on waiting, not a speed assertion
        while _alive(anvil_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(anvil_pid), "anvil outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
