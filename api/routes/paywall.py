"""The paywall: ``/pay/{request_id}`` answers any x402 client (v1 and v2)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from api.deps import runtime
from connector.errors import NotFound
from connector.payments.context_loader import load_connection
from connector.payments.receive import handle_paywall
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import PaymentRequest

router = APIRouter(tags=["paywall"])


@router.get("/pay/{request_id}", operation_id="paywall_get")
def paywall_get(request_id: str, request: Request, rt: Runtime = Depends(runtime)) -> Response:
    return paywall(request_id, request, rt)


@router.post("/pay/{request_id}", operation_id="paywall_post")
def paywall_post(request_id: str, request: Request, rt: Runtime = Depends(runtime)) -> Response:
    return paywall(request_id, request, rt)


def paywall(request_id: str, request: Request, rt: Runtime) -> Response:
    with UnitOfWork(rt.engine) as uow:
        offer = uow.session.get(PaymentRequest, request_id)
        if offer is None:
            raise NotFound(f"payment request {request_id} not found")
        connection_id = offer.connection_id
    ctx = load_connection(rt, connection_id)
    answer = handle_paywall(rt, ctx, request_id, dict(request.headers))
    headers = {**answer.headers, "access-control-expose-headers": ", ".join(answer.headers)}
    if answer.redirect_url:
        return RedirectResponse(answer.redirect_url, status_code=302, headers=headers)
    return JSONResponse(answer.body, status_code=answer.status, headers=headers)
