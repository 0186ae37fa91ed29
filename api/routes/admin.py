"""Admin API (/v1/admin): connections, admin keys, audit log, payments and approvals."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlmodel import Session, col

from api.deps import DB_SESSION, request_id, require, runtime
from api.pagination import PageParams, envelope, page
from api.params import IsoDatetime
from connector import admin_keys
from connector.connections import service as connections
from connector.connections.schemas import (
    ConnectionCreate,
    ConnectionCreated,
    ConnectionUpdate,
    ConnectionView,
)
from connector.connections.testing import ConnectionTestReport, run_connection_test
from connector.errors import NotFound, ValidationFailed
from connector.payments.approvals_service import decide
from connector.payments.states import PaymentState
from connector.payments.views import payment_snapshot
from connector.runtime import Runtime
from connector.storage.models.connections import AdminKey, AuditEntry
from connector.storage.models.payments import Payment

router = APIRouter(prefix="/v1/admin", tags=["admin"])
READ = Depends(require("read"))
ADMIN = Depends(require("admin"))


# ------------------------------------------------------------------------------ connections


@router.post("/connections", status_code=201, response_model=ConnectionCreated)
def create_connection(
    body: ConnectionCreate,
    request: Request,
    key: AdminKey = ADMIN,
    s: Session = DB_SESSION,
    rt: Runtime = Depends(runtime),
) -> ConnectionCreated:
    if body.facilitator_url is None:
        default = rt.settings.default_facilitator_url
        if default is None:
            raise ValidationFailed(
                "facilitator_url is required (no X402C_DEFAULT_FACILITATOR_URL is configured)",
                field="facilitator_url",
            )
        body = body.model_copy(update={"facilitator_url": default})
    return connections.create(
        s,
        rt.vault,
        body,
        actor=key.id,
        request_id=request_id(request),
        check_url=rt.outbound().check_url,
    )


@router.get("/connections")
def list_connections(
    params: PageParams = Depends(),
    network: str | None = Query(None, max_length=64),
    name: str | None = Query(None, max_length=120),
    _: AdminKey = READ,
    s: Session = DB_SESSION,
) -> dict[str, Any]:
    rows, more = connections.list_page(
        s, limit=params.limit, starting_after=params.starting_after, network=network, name=name
    )
    return envelope([connections.view(c).model_dump() for c in rows], more)


@router.get("/connections/{connection_id}", response_model=ConnectionView)
def get_connection(
    connection_id: str, _: AdminKey = READ, s: Session = DB_SESSION
) -> ConnectionView:
    return connections.view(connections.get(s, connection_id))


@router.patch("/connections/{connection_id}", response_model=ConnectionView)
def update_connection(
    connection_id: str,
    body: ConnectionUpdate,
    request: Request,
    key: AdminKey = ADMIN,
    s: Session = DB_SESSION,
    rt: Runtime = Depends(runtime),
) -> ConnectionView:
    return connections.update(
        s,
        rt.vault,
        connection_id,
        body,
        actor=key.id,
        request_id=request_id(request),
        check_url=rt.outbound().check_url,
    )


@router.delete("/connections/{connection_id}", status_code=204)
def delete_connection(
    connection_id: str, request: Request, key: AdminKey = ADMIN, s: Session = DB_SESSION
) -> None:
    connections.delete(s, connection_id, actor=key.id, request_id=request_id(request))


@router.post("/connections/{connection_id}/test", response_model=ConnectionTestReport)
def test_connection(
    connection_id: str, _: AdminKey = ADMIN, rt: Runtime = Depends(runtime)
) -> ConnectionTestReport:
    return run_connection_test(rt, connection_id)


class RotatedSecret(BaseModel):
    connection: ConnectionView
    webhook_secret_once: str = Field(description="The new signing secret, shown only here.")


@router.post("/connections/{connection_id}/rotate-webhook-secret", response_model=RotatedSecret)
def rotate_webhook_secret(
    connection_id: str,
    request: Request,
    key: AdminKey = ADMIN,
    s: Session = DB_SESSION,
    rt: Runtime = Depends(runtime),
) -> RotatedSecret:
    overlap = timedelta(hours=rt.settings.webhook_secret_overlap_hours)
    view, fresh = connections.rotate_webhook_secret(
        s, rt.vault, connection_id, overlap=overlap, actor=key.id, request_id=request_id(request)
    )
    return RotatedSecret(connection=view, webhook_secret_once=fresh)


@router.post("/connections/{connection_id}/rotate-wallet", response_model=ConnectionView)
def rotate_wallet(
    connection_id: str,
    request: Request,
    key: AdminKey = ADMIN,
    s: Session = DB_SESSION,
    rt: Runtime = Depends(runtime),
) -> ConnectionView:
    return connections.rotate_wallet(
        s, rt.vault, connection_id, actor=key.id, request_id=request_id(request)
    )


# ------------------------------------------------------------------------------ admin keys


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=120)
    scopes: list[str] = Field(min_length=1, max_length=3)
    connections: list[str] | None = Field(
        default=None,
        max_length=500,
        description='Required for an actions key: the connection ids it may use, or ["*"] '
        "for every connection. Admin keys always use every connection.",
    )


def _key_view(row: AdminKey) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "admin_key",
        "name": row.name,
        "prefix": row.prefix,
        "scopes": row.scopes,
        "principal": row.principal,
        "connections": row.connection_ids if row.connection_ids is not None else ["*"],
        "created_by": row.created_by,
        "created_at": row.created_at.isoformat(),
        "last_used_at": row.last_used_at.isoformat() if row.last_used_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }


@router.post("/keys", status_code=201)
def create_key(
    body: KeyCreate, request: Request, key: AdminKey = ADMIN, s: Session = DB_SESSION
) -> dict[str, Any]:
    if "actions" in body.scopes and "admin" not in body.scopes and body.connections is None:
        raise ValidationFailed(
            'an actions key must list the connections it may use (or ["*"] for all)',
            field="connections",
        )
    # The new key inherits this key's principal: one person cannot mint a second approver.
    row, plaintext = admin_keys.create_key(
        s,
        name=body.name,
        scopes=body.scopes,
        actor=key.id,
        request_id=request_id(request),
        created_by=key,
        connections=body.connections,
    )
    s.flush()
    return {**_key_view(row), "key_once": plaintext}


@router.get("/keys")
def list_keys(
    params: PageParams = Depends(), _: AdminKey = ADMIN, s: Session = DB_SESSION
) -> dict[str, Any]:
    rows, more = page(s, select(AdminKey), AdminKey.id, params)
    return envelope([_key_view(r) for r in rows], more)


@router.delete("/keys/{key_id}")
def revoke_key(
    key_id: str, request: Request, key: AdminKey = ADMIN, s: Session = DB_SESSION
) -> dict[str, Any]:
    return _key_view(admin_keys.revoke(s, key_id, actor=key.id, request_id=request_id(request)))


# ------------------------------------------------------------------------------ audit


@router.get("/audit")
def list_audit(
    params: PageParams = Depends(),
    actor: str | None = Query(None, max_length=40),
    action: str | None = Query(None, max_length=64),
    target_id: str | None = Query(None, max_length=40),
    since: IsoDatetime | None = None,
    _: AdminKey = READ,
    s: Session = DB_SESSION,
) -> dict[str, Any]:
    query = select(AuditEntry)
    if actor:
        query = query.where(col(AuditEntry.actor) == actor)
    if action:
        query = query.where(col(AuditEntry.action) == action)
    if target_id:
        query = query.where(col(AuditEntry.target_id) == target_id)
    if since:
        query = query.where(col(AuditEntry.at) >= since)
    rows, more = page(s, query, AuditEntry.id, params)
    return envelope([r.model_dump(mode="json") for r in rows], more)


# ------------------------------------------------------------------------------ payments


@router.get("/payments")
def list_payments(
    params: PageParams = Depends(),
    connection_id: str | None = Query(None, max_length=40),
    state: PaymentState | None = Query(None),
    direction: str | None = Query(None, pattern="^(incoming|outgoing)$"),
    _: AdminKey = READ,
    s: Session = DB_SESSION,
) -> dict[str, Any]:
    query = select(Payment)
    if connection_id:
        query = query.where(col(Payment.connection_id) == connection_id)
    if state:
        query = query.where(col(Payment.state) == state)
    if direction:
        query = query.where(col(Payment.direction) == direction)
    rows, more = page(s, query, Payment.id, params)
    return envelope([payment_snapshot(p) for p in rows], more)


@router.get("/payments/{payment_id}")
def get_payment(payment_id: str, _: AdminKey = READ, s: Session = DB_SESSION) -> dict[str, Any]:
    payment = s.get(Payment, payment_id)
    if payment is None:
        raise NotFound(f"payment {payment_id} not found")
    return payment_snapshot(payment)


class Decision(BaseModel):
    note: str | None = Field(default=None, max_length=1024)


@router.post("/payments/{payment_id}/approve")
def approve_payment(
    payment_id: str,
    request: Request,
    body: Decision | None = None,  # optional: a bare POST is a decision without a note
    key: AdminKey = ADMIN,
    rt: Runtime = Depends(runtime),
) -> dict[str, Any]:
    return decide(
        rt,
        payment_id,
        admin_key_id=key.id,
        decision="approve",
        note=body.note if body is not None else None,
        request_id=request_id(request),
    )


@router.post("/payments/{payment_id}/reject")
def reject_payment(
    payment_id: str,
    request: Request,
    body: Decision | None = None,  # optional: a bare POST is a decision without a note
    key: AdminKey = ADMIN,
    rt: Runtime = Depends(runtime),
) -> dict[str, Any]:
    return decide(
        rt,
        payment_id,
        admin_key_id=key.id,
        decision="reject",
        note=body.note if body is not None else None,
        request_id=request_id(request),
    )
