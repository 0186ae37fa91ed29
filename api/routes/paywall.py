"""The paywall: ``/pay/{request_id}`` answers any x402 client (v1 and v2).

An unpaid hit on an offer this process already knows is answered from memory (see
:mod:`connector.payments.offers`) by :class:`PaywallFastPath`, before routing. Everything else
(first sight of an offer, a stale state, a payment) takes the route below and runs in the thread
pool, where database and facilitator calls may block.
"""

from __future__ import annotations

import json
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from connector.payments.receive import PaywallAnswer, handle_paywall, unpaid_from_memory
from connector.runtime import Runtime

router = APIRouter(tags=["paywall"])

_PAYMENT_HEADERS = ("payment-signature", "x-payment")


@router.get("/pay/{request_id}", operation_id="paywall_get")
async def paywall_get(request_id: str, request: Request) -> Response:
    return await paywall(request_id, request)


@router.post("/pay/{request_id}", operation_id="paywall_post")
async def paywall_post(request_id: str, request: Request) -> Response:
    return await paywall(request_id, request)


async def paywall(request_id: str, request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    headers = request.headers
    answer: PaywallAnswer | None = None
    if not any(name in headers for name in _PAYMENT_HEADERS):
        answer = unpaid_from_memory(rt, request_id)
    if answer is None:
        answer = await run_in_threadpool(handle_paywall, rt, None, request_id, dict(headers))
    return to_response(answer)


def to_response(answer: PaywallAnswer) -> Response:
    headers = {**answer.headers, "access-control-expose-headers": ", ".join(answer.headers)}
    if answer.redirect_url:
        return RedirectResponse(answer.redirect_url, status_code=302, headers=headers)
    if answer.content is not None:
        return Response(
            answer.content,
            status_code=answer.status,
            headers=headers,
            media_type="application/json",
        )
    return JSONResponse(answer.body, status_code=answer.status, headers=headers)


_PAYMENT_HEADER_BYTES = tuple(name.encode() for name in _PAYMENT_HEADERS)


class PaywallFastPath:
    """Pure ASGI middleware answering unpaid paywall hits from memory, before routing.

    The route above serves the same answers; this only skips the framework's per-request work
    (route matching over every admin route, dependency solving, the request-id middleware's
    task hop), which cost several times the answer itself. Whatever it cannot answer from
    memory (a payment header, an offer or a state this process does not hold fresh, any other
    path) goes down the normal stack unchanged, and so does anything the edge guard
    (:mod:`api.edge`) might refuse: a query string, a body, a NUL in a header. The response
    carries the same headers as the slow path, including ``x-request-id``.
    """

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.rt = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in ("GET", "POST")
            or not scope["path"].startswith("/pay/")
            or scope.get("query_string")  # anything unusual takes the guarded path (EdgeGuard)
        ):
            await self.app(scope, receive, send)
            return
        request_id = scope["path"][5:]
        incoming_id = b""
        for name, value in scope["headers"]:
            if (
                name in _PAYMENT_HEADER_BYTES
                or b"\x00" in value
                or name == b"transfer-encoding"
                or (name == b"content-length" and value.strip() not in (b"", b"0"))
            ):
                await self.app(scope, receive, send)  # a payment, a body, or hostile input
                return
            if name == b"x-request-id":
                incoming_id = value
        answer = unpaid_from_memory(self.rt, request_id) if "/" not in request_id else None
        if answer is None:
            await self.app(scope, receive, send)
            return
        content = answer.content
        if content is None:
            content = json.dumps(answer.body, separators=(",", ":")).encode()
        rid = incoming_id.decode("latin-1")
        if not (0 < len(rid) <= 64 and rid.isprintable()):
            rid = "req_" + secrets.token_hex(8)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            *((k.lower().encode(), v.encode("latin-1")) for k, v in answer.headers.items()),
            (b"access-control-expose-headers", ", ".join(answer.headers).encode("latin-1")),
            (b"x-request-id", rid.encode("latin-1")),
        ]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": content})
