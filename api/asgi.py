"""ASGI entry point for ``x402c serve`` / any ASGI server: ``uvicorn api.asgi:app``."""

from __future__ import annotations

from api.app import create_app
from connector.settings import get_settings
from workers.celery_app import celery_app
from workers.runtime import runtime
from workers.wiring import wire

rt = runtime()
wire(rt, celery_app)
app = create_app(get_settings(), runtime=rt)
