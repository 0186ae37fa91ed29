"""The paywall: ``/pay/{request_id}`` answers any x402 client (v1 and v2).

An unpaid hit on an offer this process already knows is answered on the event loop from memory
(see :mod:`connector.payments.offers`); everything else (first sight of an offer, a stale state,
a payment) runs in the thread pool, where database and facilitator calls may block.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

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
