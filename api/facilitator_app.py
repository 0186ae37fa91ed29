"""The local facilitator as a FastAPI app: mountable under the main API or run alone.

Spec shapes: an invalid payment is HTTP 200 with ``isValid: false`` / ``success: false``; only a
malformed request is HTTP 400 (problem+json naming the field).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from connector.errors import ConnectorError
from connector.facilitator.local import LocalFacilitator
from connector.x402.errors import ProtocolError

MAX_BODY = 64 * 1024


def _problem(status: int, code: str, title: str, detail: str, field: str | None) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://x402c.dev/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if field:
        body["errors"] = [{"field": field, "message": detail}]
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ProtocolError("request body too large", field="body")
    import json

    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ProtocolError("request body is not JSON", field="body") from exc


def create_facilitator_app(facilitator: LocalFacilitator) -> FastAPI:
    app = FastAPI(title="x402-connector local facilitator", version="1")

    @app.exception_handler(ProtocolError)
    async def malformed(_: Request, exc: ProtocolError) -> JSONResponse:
        return _problem(400, exc.code, exc.title, exc.detail, exc.field)

    @app.exception_handler(ConnectorError)
    async def failed(_: Request, exc: ConnectorError) -> JSONResponse:
        status = exc.status if exc.status >= 500 else 502
        return _problem(status, exc.code, exc.title, exc.detail, None)

    @app.get("/supported")
    def supported() -> dict[str, Any]:
        return facilitator.supported()

    @app.post("/verify")
    async def verify(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        return await run_in_threadpool(facilitator.verify, body)

    @app.post("/settle")
    async def settle(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        return await run_in_threadpool(facilitator.settle, body)

    @app.get("/healthz")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
