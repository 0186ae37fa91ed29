"""The workflow builder's surface: manifest, action calls with Idempotency-Key, jobs, REST hooks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import require, runtime
from connector import admin_keys, jobs
from connector.actions.manifest import build_manifest
from connector.actions.registry import BY_KEY
from connector.connections import service as connections
from connector.errors import NotFound
from connector.logs import get_logger
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.connections import AdminKey
from connector.storage.models.payments import Job
from connector.webhooks import subscriptions

log = get_logger("api.actions")
router = APIRouter(tags=["actions"])
ACTIONS = Depends(require("actions"))


def _may_use(key: AdminKey, connection_id: str) -> None:
    """An actions key acts only on the connections it lists (admin keys: all). Checked before
    the connection is looked up, so the answer says nothing about other connections."""
    if not admin_keys.may_use(key, connection_id):
        raise HTTPException(403, f"this key may not use connection {connection_id[:40]}")


def job_view(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "object": "job",
        "action": job.action,
        "status": job.status,
        "connection_id": job.connection_id,
        "payment_id": job.payment_id,
        "result": job.result,
        "error": job.error,
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
    }


@router.get("/v1/manifest")
def manifest(request: Request, rt: Runtime = Depends(runtime)) -> dict[str, Any]:
    return build_manifest(rt.settings.public_base_url.rstrip("/"))


@router.post("/v1/connections/{connection_id}/actions/{action}")
async def run_action(
    connection_id: str,
    action: str,
    request: Request,
    body: dict[str, Any] = Body(default_factory=dict),
    wait: float = Query(0, ge=0, le=60, description="Seconds to wait for the result."),
    idempotency_key: str | None = Header(default=None, max_length=255),
    key: AdminKey = ACTIONS,
    rt: Runtime = Depends(runtime),
) -> JSONResponse:
    _may_use(key, connection_id)
    spec = BY_KEY.get(action)
    if spec is None:
        raise NotFound(f"unknown action {action!r}; see GET /v1/manifest")
    try:
        spec.input_model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from exc
    # Database and broker calls are blocking: they run in the thread pool, never on the event
    # loop (one slow broker publish there used to stall every request, /healthz included).
    started = await run_in_threadpool(_start, rt, connection_id, action, body, idempotency_key)
    job = started.job
    try:
        if started.created:
            await run_in_threadpool(_dispatch, rt, job.id)
        deadline = time.monotonic() + wait
        while wait and job.status not in ("succeeded", "failed") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            job = await run_in_threadpool(_load, rt, job.id)
        done = job.status in ("succeeded", "failed")
        headers = {"location": f"/v1/jobs/{job.id}"}
        if not started.created:
            headers["idempotent-replayed"] = "true"
        return JSONResponse(job_view(job), status_code=200 if done else 202, headers=headers)
    finally:
        if started.idempotency_record_id is not None:
            await run_in_threadpool(_finish, rt, started.idempotency_record_id)


def _start(
    rt: Runtime, connection_id: str, action: str, body: dict[str, Any], key: str | None
) -> jobs.JobStart:
    with UnitOfWork(rt.engine) as uow:
        connections.get(uow.session, connection_id)
        started = jobs.start_job(
            uow.session,
            connection_id=connection_id,
            action=action,
            body=body,
            idempotency_key=key,
        )
        uow.commit()
    return started


def _dispatch(rt: Runtime, job_id: str) -> None:
    """Enqueue the job. The job row is already committed as ``queued``: if the broker is down,
    the stale-job sweep sends it again later, so the caller still gets its 202 and job id."""
    try:
        rt.dispatch("x402c.run_job", (job_id,))
    except Exception as exc:
        log.warning(
            "job not enqueued; the stale-job sweep will retry",
            extra={"job_id": job_id, "error": type(exc).__name__},
        )


def _load(rt: Runtime, job_id: str) -> Job:
    with UnitOfWork(rt.engine) as uow:
        return jobs.get_job(uow.session, job_id)


def _finish(rt: Runtime, record_id: str) -> None:
    with UnitOfWork(rt.engine) as uow:
        jobs.finish_request(uow.session, record_id)
        uow.commit()


@router.get("/v1/jobs/{job_id}")
def get_job(job_id: str, key: AdminKey = ACTIONS, rt: Runtime = Depends(runtime)) -> dict[str, Any]:
    with UnitOfWork(rt.engine) as uow:
        job = jobs.get_job(uow.session, job_id)
    if not admin_keys.may_use(key, job.connection_id):
        # The same answer as a job that does not exist: a scoped key learns nothing of others.
        raise NotFound(f"job {job_id} not found")
    return job_view(job)


class HookSubscribe(BaseModel):
    connection_id: str = Field(max_length=40)
    url: str = Field(max_length=2048)
    event_types: list[str] = Field(default_factory=list, max_length=64)
    description: str | None = Field(default=None, max_length=256)


@router.post("/v1/hooks", status_code=201)
def subscribe(
    body: HookSubscribe, key: AdminKey = ACTIONS, rt: Runtime = Depends(runtime)
) -> dict[str, Any]:
    _may_use(key, body.connection_id)
    with UnitOfWork(rt.engine) as uow:
        connections.get(uow.session, body.connection_id)
        sub, secret = subscriptions.create(
            uow.session,
            rt.vault,
            connection_id=body.connection_id,
            url=body.url,
            event_types=body.event_types,
            description=body.description,
            policy=rt.outbound(),
            created_by_key=key.id,
        )
        uow.commit()
        return {**subscriptions.view(sub), "secret_once": secret}


@router.delete("/v1/hooks/{subscription_id}")
def unsubscribe(
    subscription_id: str, key: AdminKey = ACTIONS, rt: Runtime = Depends(runtime)
) -> dict[str, Any]:
    with UnitOfWork(rt.engine) as uow:
        found = subscriptions.get(uow.session, subscription_id)
        if "admin" not in key.scopes and found.created_by_key != key.id:
            # A REST-hook key removes only what it subscribed (never an operator's subscription
            # or another workflow's); others' ids look like ids that do not exist.
            raise NotFound(f"subscription {subscription_id} not found")
        sub = subscriptions.remove(uow.session, subscription_id)
        uow.commit()
        return subscriptions.view(sub)
