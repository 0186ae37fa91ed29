"""The local facilitator as a FastAPI app: mountable under the main API or run alone.

Spec shapes: an invalid payment is HTTP 200 with ``isValid: false`` / ``success: false``; only a
malformed request is HTTP 400 (problem+json naming the field). Every other error (unknown path,
wrong method, an unexpected failure) is problem+json too, never a plain-text 500.

Bodies are bounded (64 KiB) and their JSON nesting is checked before parsing, by the same edge
guard as the main API (:mod:`api.edge`) and again in :func:`_json_body`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.edge import EdgeGuard
from connector.errors import ConnectorError
from connector.jsonguard import json_problem
from connector.logs import get_logger
from connector.x402.errors import ProtocolError

log = get_logger("api.facilitator")


class Facilitating(Protocol):
    """A one-network :class:`LocalFacilitator` or a :class:`MultiFacilitator`."""

    def verify(self, body: Any) -> dict[str, Any]: ...
    def settle(self, body: Any) -> dict[str, Any]: ...
    def supported(self) -> dict[str, Any]: ...


MAX_BODY = 64 * 1024
MAX_DEPTH = 16


def _problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    field: str | None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://x402c.dev/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if field:
        body["errors"] = [{"field": field, "message": detail}]
    return JSONResponse(
        body, status_code=status, media_type="application/problem+json", headers=headers
    )


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ProtocolError("request body too large", field="body")
    problem = json_problem(raw, MAX_DEPTH)
    if problem is not None:
        raise ProtocolError(problem, field="body")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("request body is not JSON", field="body") from exc


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def create_facilitator_app(
    facilitator: Facilitating, *, api_keys: Iterable[str] = (), metrics: bool = False
) -> FastAPI:
    """``api_keys``: when given, /verify and /settle need ``Authorization: Bearer <key>``
    (compared as SHA-256 digests in constant time; /supported and /healthz stay open)."""
    app = FastAPI(title="x402-connector local facilitator", version="1")
    allowed = [_digest(k) for k in api_keys]

    def _authorized(request: Request) -> bool:
        if not allowed:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        presented = _digest(token.strip())
        return any(hmac.compare_digest(presented, key) for key in allowed)

    def _unauthorized() -> JSONResponse:
        response = _problem(
            401, "unauthorized", "Unauthorized", "a valid facilitator API key is required", None
        )
        response.headers["www-authenticate"] = "Bearer"
        return response

    def _open_path(path: str) -> bool:
        # With API keys, a /verify or /settle body without any bearer key is not even read.
        return not allowed or not path.rstrip("/").endswith(("/verify", "/settle"))

    app.add_middleware(
        EdgeGuard,
        max_body_bytes=MAX_BODY,
        max_json_depth=MAX_DEPTH,
        always_json=True,
        invalid_status=400,
        invalid_code="x402_malformed",
        is_public=_open_path,
    )

    @app.exception_handler(ProtocolError)
    async def malformed(_: Request, exc: ProtocolError) -> JSONResponse:
        return _problem(400, exc.code, exc.title, exc.detail, exc.field)

    @app.exception_handler(ConnectorError)
    async def failed(_: Request, exc: ConnectorError) -> JSONResponse:
        status = exc.status if exc.status >= 500 else 502
        return _problem(status, exc.code, exc.title, exc.detail, None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _problem(400, "x402_malformed", "Malformed request", "invalid request", "body")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, f"http_{exc.status_code}"
        )
        title = code.replace("_", " ").capitalize()
        return _problem(exc.status_code, code, title, str(exc.detail), None, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("facilitator error", extra={"error": type(exc).__name__})
        detail = "an unexpected error occurred"
        return _problem(500, "internal_error", "Internal error", detail, None)

    @app.get("/supported")
    def supported() -> dict[str, Any]:
        return facilitator.supported()

    @app.post("/verify", response_model=None)
    async def verify(request: Request) -> dict[str, Any] | JSONResponse:
        if not _authorized(request):
            return _unauthorized()
        body = await _json_body(request)
        return await run_in_threadpool(facilitator.verify, body)

    @app.post("/settle", response_model=None)
    async def settle(request: Request) -> dict[str, Any] | JSONResponse:
        if not _authorized(request):
            return _unauthorized()
        body = await _json_body(request)
        return await run_in_threadpool(facilitator.settle, body)

    if metrics:

        @app.get("/metrics")
        def prometheus() -> Response:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
