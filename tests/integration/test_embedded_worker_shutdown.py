"""Leaving the embedded worker waits for the tasks it is running.

Celery's test worker stops with a *terminate*: the thread pool is shut down without waiting, so a
task still running (the periodic reconcile, say) outlived the worker and used the runtime after
``x402c demo`` had closed it ("Cannot send a request, as the client has been closed" on stderr).
Runs in a subprocess: the embedded worker consumes the process-wide memory broker, and must never
take tasks meant for the e2e stack of this test process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from pathlib import Path
    from connector.runtime import Runtime
    from connector.settings import Settings
    from connector.vault import MasterKeyRing
    from workers.celery_app import celery_app
    from workers.embedded import embedded_worker
    from workers.wiring import send

    started = threading.Event()
    finished = threading.Event()

    @celery_app.task(name="tests.slow")
    def slow() -> None:
        started.set()
        # Far longer than an idle worker takes to stop (~0.1 s; see workers/memory_transport.py).
        time.sleep(3)
        finished.set()

    data = Path(sys.argv[1])
    rt = Runtime.from_settings(
        Settings(
            data_dir=data,
            broker_url="memory://localhost/",
            master_keys=MasterKeyRing.generate_spec("t1"),
        )
    )
    with embedded_worker(rt, concurrency=2):
        send(celery_app, "tests.slow")
        assert started.wait(20), "the task never started"
    print("finished" if finished.is_set() else "still running")
    rt.close()
    """
)


@pytest.mark.slow
def test_leaving_the_embedded_worker_waits_for_running_tasks(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "finished", result.stdout + result.stderr
    # Nothing raised in the task or in its acknowledgement after the consumer stopped.
    assert result.stderr.strip() == "", result.stderr[-3000:]
