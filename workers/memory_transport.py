"""Kombu's in-memory transport, with the worker's idle wait cut to 0.1 s.

The embedded worker (``x402c dev``/``demo``, tests) consumes through Celery's blocking loop, which
waits for a message up to 2 s at a time and checks for shutdown only between waits; stopping an
idle worker took two such waits (~4–5 s of a ~7 s demo). Waiting 0.1 s at a time costs an idle
loop turn ten times a second and lets the worker stop at once. Messages are still taken as soon as
they arrive: the wait returns on the first one.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import memory as kombu_memory

IDLE_WAIT_S = 0.1


class Transport(kombu_memory.Transport):  # type: ignore[misc]
    def drain_events(self, connection: Any, timeout: float | None = None) -> Any:
        return super().drain_events(
            connection, timeout=IDLE_WAIT_S if timeout is None else min(timeout, IDLE_WAIT_S)
        )
