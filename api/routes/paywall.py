"""The paywall: ``/pay/{request_id}`` answers any x402 client (v1 and v2).

:class:`PaywallFastPath` takes the paywall's traffic before routing: an unpaid hit on an offer
this process already knows is answered from memory (see :mod:`connector.payments.offers`), and a
paid hit goes straight to :func:`handle_paywall` in the thread pool, where database and
facilitator calls may block. Everything else (first sight of an offer, a stale state, a body, a
query string, anything odd) takes the route below, which gives the same answers.
"""

from __future__ import annotations

import json
import re
import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from api.problems import connector_error_response, unexpected_response
from connector.errors import ConnectorError
from connector.logs import get_logger
from connector.payments.receive import PaywallAnswer, handle_paywall, unpaid_from_memory
from connector.runtime import Runtime

log = get_logger("api")
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
    """Pure ASGI middleware for the paywall's hits, before routing.

    The route above serves the same answers; this only skips the framework's per-request work
    (route matching over every admin route, dependency solving, the request-id middleware's
    task hop), which cost several times the unpaid answer itself and about a millisecond of CPU
    per paid one. Unpaid hits are answered from memory; paid hits (a payment header, no body)
    run :func:`handle_paywall` as the route does, with the app's error answers. Whatever else
    (an offer or a state this process does not hold fresh for an unpaid hit, an id that is not
    a payment request's, any other path) goes down the normal stack unchanged, and so does
    anything the edge guard (:mod:`api.edge`) might refuse: a query string, a body, a NUL in a
    header. The response carries the same headers as the slow path, including
    ``x-request-id``, and a paid hit is logged like any request.
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
        paid = False
        for name, value in scope["headers"]:
            if (
                b"\x00" in value
                or name == b"transfer-encoding"
                or (name == b"content-length" and value.strip() not in (b"", b"0"))
            ):
                await self.app(scope, receive, send)  # a body, or hostile input
                return
            if name in _PAYMENT_HEADER_BYTES:
                paid = True
            elif name == b"x-request-id":
                incoming_id = value
        if paid:
            if not _REQUEST_ID.fullmatch(request_id):  # not one of ours: the router answers
                await self.app(scope, receive, send)
                return
            await self._paid(scope, receive, send, request_id, _request_id(incoming_id))
            return
        answer = unpaid_from_memory(self.rt, request_id) if "/" not in request_id else None
        if answer is None:
            await self.app(scope, receive, send)
            return
        content = answer.content
        if content is None:
            content = json.dumps(answer.body, separators=(",", ":")).encode()
        rid = _request_id(incoming_id)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            *((k.lower().encode(), v.encode("latin-1")) for k, v in answer.headers.items()),
            (b"access-control-expose-headers", ", ".join(answer.headers).encode("latin-1")),
            (b"x-request-id", rid.encode("latin-1")),
        ]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _paid(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, rid: str
    ) -> None:
        """A paid hit: the route's work (:func:`handle_paywall` in the thread pool) and the app's
        error answers (problem+json, 503 for a lost database connection), without the routing
        and middleware layers around them."""
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:  # the first of repeated headers, as Starlette
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        start = time.perf_counter()
        response: Response
        try:
            answer = await run_in_threadpool(handle_paywall, self.rt, None, request_id, headers)
            response = to_response(answer)
        except Exception as exc:
            request = Request(scope)
            request.state.request_id = rid
            if isinstance(exc, ConnectorError):
                response = connector_error_response(request, exc)
            else:
                response = unexpected_response(request, exc)
        response.headers["x-request-id"] = rid
        log.info(
            "request",
            extra={
                "request_id": rid,
                "method": scope["method"],
                "path": scope["path"],
                "status": response.status_code,
                "ms": int((time.perf_counter() - start) * 1000),
            },
        )
        await response(scope, receive, send)


#: What a payment request id looks like (``prq_`` and its random part); anything else takes the
#: router's way (404, or the edge guard's refusal).
_REQUEST_ID = re.compile(r"prq_[0-9A-Za-z]{1,60}")


def _request_id(incoming: bytes) -> str:
    """The caller's ``X-Request-Id`` when it is short and printable, else a new one."""
    rid = incoming.decode("latin-1")
    if 0 < len(rid) <= 64 and rid.isprintable():
        return rid
    return "req_" + secrets.token_hex(8)
