"""RFC 9457 problem+json for every error the API can return, with stable ``type`` codes."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from connector.errors import ConnectorError
from connector.logs import get_logger
from connector.storage.db import is_connection_error

log = get_logger("api.problems")
TYPE_BASE = "https://x402c.dev/problems/"


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    request: Request,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "request_id": getattr(request.state, "request_id", None),
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    headers = dict(headers or {})
    if status == 401:
        headers["www-authenticate"] = 'Bearer realm="x402c"'
    return JSONResponse(
        body, status_code=status, media_type="application/problem+json", headers=headers
    )


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _error_item(e: Any) -> dict[str, str]:
    if e.get("type") == "json_invalid":
        # FastAPI reports the byte offset as the location ("8: JSON decode error"): no field.
        return {"field": "body", "message": "the request body is not valid JSON"}
    return {"field": _field_path(e.get("loc", ())), "message": str(e.get("msg"))}


def _allowed_methods(request: Request) -> str:
    """Starlette names only the first route matching the path, but one path may have several
    routes (GET and POST ``/v1/admin/keys``): collect the methods of all, from the OpenAPI."""
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(
        request.app.state, "allowed_methods", None
    )
    if table is None:
        table = []
        for path, item in request.app.openapi().get("paths", {}).items():
            pattern = re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)) + "$")
            table.append((pattern, {m.upper() for m in item}))
        request.app.state.allowed_methods = table
    methods: set[str] = set()
    for pattern, verbs in table:
        if pattern.match(request.url.path):
            methods |= verbs
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def connector_error_response(request: Request, exc: ConnectorError) -> JSONResponse:
    """The problem for a domain error (its status, code, title and context fields)."""
    extra: dict[str, Any] = {}
    for key in ("field", "rule", "payment_id", "connection_id", "allowed", "current"):
        if exc.context.get(key) is not None:
            extra[key] = exc.context[key]
    if exc.context.get("field"):
        extra["errors"] = [{"field": exc.context["field"], "message": exc.detail}]
    if exc.status >= 500:
        log.warning("request failed", extra={"code": exc.code, "path": request.url.path})
    return problem_response(exc.status, exc.code, exc.title, exc.detail, request, **extra)


def unexpected_response(request: Request, exc: Exception) -> JSONResponse:
    """The problem for any other exception: 503 for a lost database connection, else 500."""
    if is_connection_error(exc):
        # The database connection dropped before anything committed (a commit that failed
        # did not happen): nothing was done, the client may simply retry.
        log.warning("database unavailable", extra={"path": request.url.path})
        response = problem_response(
            503,
            "database_unavailable",
            "Database unavailable",
            "the database connection was lost; nothing was changed, retry the request",
            request,
        )
        response.headers["retry-after"] = "1"
        return response
    log.error("unhandled error", extra={"path": request.url.path, "error": type(exc).__name__})
    return problem_response(
        500, "internal_error", "Internal error", "an unexpected error occurred", request
    )


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ConnectorError)
    async def connector_error(request: Request, exc: ConnectorError) -> JSONResponse:
        return connector_error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_error_item(e) for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)[:1000]
        return problem_response(
            422, "validation_failed", "Validation failed", detail, request, errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
            429: "too_many_requests",
        }
        code = codes.get(exc.status_code, f"http_{exc.status_code}")
        # e.g. Allow on 405, WWW-Authenticate on 401
        headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
        if exc.status_code == 405:
            headers["allow"] = _allowed_methods(request) or headers.get("allow", "")
        response = problem_response(
            exc.status_code,
            code,
            code.replace("_", " ").capitalize(),
            str(exc.detail),
            request,
            headers=headers,
        )
        for name, value in (exc.headers or {}).items():  # e.g. Retry-After on a 429
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_response(request, exc)
