"""One :class:`~connector.runtime.Runtime` per worker process, built lazily on first use.

Building it at import time would open database pools before Celery forks its children; lazily
means each child gets its own connections.
"""

from __future__ import annotations

import threading

from connector.runtime import Runtime

_lock = threading.Lock()
_runtime: Runtime | None = None


def runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                _runtime = Runtime.from_settings()
    return _runtime


def install(rt: Runtime) -> None:
    """Use an already-built runtime (the embedded mode and tests share the API's)."""
    global _runtime
    _runtime = rt
