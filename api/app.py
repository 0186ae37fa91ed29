"""The FastAPI application factory. Everything the routes need hangs off ``app.state.runtime``."""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select
from sqlmodel import col

from api.deps import PUBLIC_PATHS, PUBLIC_PREFIXES
from api.docs_ui import install_docs
from api.edge import EdgeGuard, public_path_matcher
from api.health import HealthProbes, beat_probe, broker_probe, database_probe
from api.openapi import install_openapi
from api.problems import install_problem_handlers
from api.routes import actions, admin, paywall, webhooks_admin
from connector import __version__
from connector.logs import get_logger
from connector.metrics import PAYMENTS_BY_STATE, QUEUE_DEPTH
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment

log = get_logger("api")


def create_app(
    settings: Settings | None = None,
    *,
    runtime: Runtime | None = None,
    facilitator_app: FastAPI | None = None,
) -> FastAPI:
    rt = runtime or Runtime.from_settings(settings)
    app = FastAPI(
        title="x402-connector",
        version=__version__,
        description="Pay and get paid over x402 from workflow-builder action nodes.",
        docs_url=None,  # served by install_docs from local assets (works offline)
        redoc_url=None,
    )
    app.state.runtime = rt
    install_problem_handlers(app)
    install_docs(app)
    # Added before the request-id middleware, so that one wraps it: refusals carry an id too.
    is_public = public_path_matcher(PUBLIC_PATHS, PUBLIC_PREFIXES)
    app.add_middleware(
        EdgeGuard,
        max_body_bytes=rt.settings.api_max_body_bytes,
        max_json_depth=rt.settings.api_max_json_depth,
        is_public=is_public,
        delegate_prefixes=("/facilitator",) if facilitator_app is not None else (),
    )
    install_openapi(app, is_public)

    @app.middleware("http")
    async def request_ids(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        incoming = request.headers.get("x-request-id", "")
        rid = incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else None
        request.state.request_id = rid or "req_" + secrets.token_hex(8)
        start = time.perf_counter()
        response = await call_next(request)
        response.headers["x-request-id"] = request.state.request_id
        log.info(
            "request",
            extra={
                "request_id": request.state.request_id,
                "method": request.method,
                "path": request.url.path,
                "status": response.status_code,
                "ms": int((time.perf_counter() - start) * 1000),
            },
        )
        return response

    # Outermost: unpaid paywall hits are answered from memory before routing (issue 13).
    app.add_middleware(paywall.PaywallFastPath, runtime=rt)
    app.include_router(admin.router)
    app.include_router(webhooks_admin.router)
    app.include_router(actions.router)
    app.include_router(paywall.router)
    if facilitator_app is not None:
        app.mount("/facilitator", facilitator_app)

    health = HealthProbes(
        timeout_s=rt.settings.health_probe_timeout_s, cache_s=rt.settings.health_cache_s
    )
    health.add("database", database_probe(rt.engine), critical=True)
    health.add(
        "broker",
        broker_probe(rt.settings.broker_url, rt.settings.health_probe_timeout_s),
        critical=False,  # the API still takes work: queued jobs are re-sent by the sweep
    )
    # Never cached: a tick is news as soon as it is written.
    health.add("beat", beat_probe(rt.engine), critical=False, cache_s=0)
    app.state.health = health

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        """Liveness and dependencies: 200 ``ok``/``degraded``, 503 ``down`` (database)."""
        status, body = await health.report()
        beat = body["checks"].get("beat", {})
        # ``beat`` at the top level as well: {last_tick_at, age_s, ok} (operators' scripts).
        body["beat"] = {k: beat.get(k) for k in ("last_tick_at", "age_s")} | {
            "ok": beat.get("status") == "ok"
        }
        return JSONResponse({**body, "version": __version__}, status_code=status)

    @app.get("/metrics", tags=["ops"])
    def metrics() -> Response:
        with UnitOfWork(rt.engine) as uow:
            rows = uow.session.execute(
                select(col(Payment.state), func.count()).group_by(col(Payment.state))
            ).all()
        for state, count in rows:
            PAYMENTS_BY_STATE.labels(state=state).set(count)
        broker = rt.settings.broker_url
        if broker.startswith("redis"):
            try:
                import redis

                depth = redis.Redis.from_url(
                    broker, socket_timeout=1, socket_connect_timeout=1
                ).llen("celery")
                QUEUE_DEPTH.labels(queue="celery").set(depth)
            except Exception:  # metrics must not fail because the broker is down
                log.warning("queue depth unavailable")
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
