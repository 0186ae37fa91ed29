"""The workflow builder's surface: manifest, action calls with Idempotency-Key, jobs, REST hooks."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import require, runtime
from connector import admin_keys, jobs
from connector.actions import outcome
from connector.actions.manifest import build_manifest
from connector.actions.registry import ACTIONS as ACTION_SPECS
from connector.actions.registry import JOB_MODELS, ActionSpec, AnyJob
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


_STATUS_TEXT = (
    "`200` when the job is final (`succeeded` or `failed`: the action's real outcome, see "
    "`error.code`, `error.rule`, `error.retryable`); `202` when it is not final yet "
    "(`queued`, `running`, `pending` — the payment's outcome is not known yet — or "
    "`requires_approval`): poll `GET /v1/jobs/{id}` (the `location` header) or wait for the "
    "payment's webhook."
)
_KEY_TEXT = (
    "Actions that move money (`send`, `refund`, `release`, `reclaim`) need an idempotency key: the "
    "`Idempotency-Key` header, or the action node's natural key, the `X-Workflow-Run-Id` and "
    "`X-Workflow-Node-Id` headers (plus `X-Workflow-Item` when the node runs once per list "
    "item). Without one the call is refused with `428 idempotency_key_required`. The same key "
    "with the same body returns the same job (`idempotent-replayed: true`) and never runs the "
    "action twice; with another body: `422 idempotency_key_reused`; while the first request "
    "is still being answered: `409 idempotency_in_flight`."
)


async def _run_action(
    spec: ActionSpec,
    connection_id: str,
    body: dict[str, Any],
    wait: float,
    key: str | None,
    rt: Runtime,
    *,
    requested_by: str | None = None,
) -> JSONResponse:
    action = spec.key
    try:
        spec.input_model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from exc
    jobs.require_key(action, key)
    # Database and broker calls are blocking: they run in the thread pool, never on the event
    # loop (one slow broker publish there used to stall every request, /healthz included).
    started = await run_in_threadpool(_start, rt, connection_id, action, body, key, requested_by)
    job = started.job
    try:
        if started.created:
            await run_in_threadpool(_dispatch, rt, job.id)
        deadline = time.monotonic() + wait
        # Waiting for an admin's approval can take hours: answer 202 at once for that one.
        settled_for_now = (*outcome.TERMINAL, outcome.REQUIRES_APPROVAL)
        while wait and job.status not in settled_for_now and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            job = await run_in_threadpool(_load, rt, job.id)
        done = job.status in outcome.TERMINAL
        headers = {"location": f"/v1/jobs/{job.id}"}
        if not started.created:
            headers["idempotent-replayed"] = "true"
        return JSONResponse(job_view(job), status_code=200 if done else 202, headers=headers)
    finally:
        if started.idempotency_record_id is not None:
            await run_in_threadpool(_finish, rt, started.idempotency_record_id)


def _start(
    rt: Runtime,
    connection_id: str,
    action: str,
    body: dict[str, Any],
    key: str | None,
    requested_by: str | None = None,
) -> jobs.JobStart:
    with UnitOfWork(rt.engine) as uow:
        connections.get(uow.session, connection_id)
        started = jobs.start_job(
            uow.session,
            connection_id=connection_id,
            action=action,
            body=body,
            idempotency_key=key,
            requested_by=requested_by,
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


def _action_endpoint(spec: ActionSpec) -> Callable[..., Awaitable[JSONResponse]]:
    """The endpoint of one action, its body typed with the action's input model (the same model
    the manifest's ``input_schema`` comes from)."""

    async def endpoint(
        connection_id: str,
        body: Any = Body(default=None),
        wait: float = Query(0, ge=0, le=60, description="Seconds to wait for a final result."),
        idempotency_key: str | None = Header(default=None, max_length=255),
        x_workflow_run_id: str | None = Header(default=None, max_length=120),
        x_workflow_node_id: str | None = Header(default=None, max_length=120),
        x_workflow_item: str | None = Header(default=None, max_length=12),
        admin: AdminKey = ACTIONS,
        rt: Runtime = Depends(runtime),
    ) -> JSONResponse:
        _may_use(admin, connection_id)
        raw = body.model_dump(mode="json", exclude_unset=True) if body is not None else {}
        key = idempotency_key or jobs.natural_key(
            x_workflow_run_id, x_workflow_node_id, x_workflow_item
        )
        return await _run_action(spec, connection_id, raw, wait, key, rt, requested_by=admin.id)

    signature = inspect.signature(endpoint)
    typed = [
        p.replace(annotation=spec.input_model | None) if p.name == "body" else p
        for p in signature.parameters.values()
    ]
    endpoint.__signature__ = signature.replace(parameters=typed)  # type: ignore[attr-defined]
    endpoint.__name__ = f"action_{spec.key}"
    return endpoint


_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def _responses(spec: ActionSpec, job: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    answers: dict[int | str, dict[str, Any]] = {
        200: {"model": job, "description": "The job, final."},
        202: {"model": job, "description": "The job, not final yet."},
        409: {
            "description": "`idempotency_in_flight`: the first request with this key is still "
            "being answered (problem+json).",
            "content": _PROBLEM,
        },
        422: {
            "description": "`validation_failed` (the body does not fit the input schema) or "
            "`idempotency_key_reused` (problem+json).",
            "content": _PROBLEM,
        },
    }
    if spec.moves_money:
        answers[428] = {
            "description": "`idempotency_key_required`: this action moves money and the call "
            "carried no idempotency key (problem+json).",
            "content": _PROBLEM,
        }
    return answers


for _spec in ACTION_SPECS:
    router.add_api_route(
        f"/v1/connections/{{connection_id}}/actions/{_spec.key}",
        _action_endpoint(_spec),
        methods=["POST"],
        summary=_spec.title,
        description=f"{_spec.description}\n\n{_STATUS_TEXT}\n\n"
        + (_KEY_TEXT if _spec.moves_money else "An `Idempotency-Key` is optional here."),
        operation_id=f"action_{_spec.key}",
        response_model=None,
        status_code=200,
        responses=_responses(_spec, JOB_MODELS[_spec.key]),
    )


@router.post("/v1/connections/{connection_id}/actions/{action}", include_in_schema=False)
def unknown_action(connection_id: str, action: str, _: AdminKey = ACTIONS) -> None:
    raise NotFound(f"unknown action {action!r}; see GET /v1/manifest")


@router.get(
    "/v1/jobs/{job_id}",
    response_model=None,
    responses={200: {"model": AnyJob, "description": "The job; `action` tells its shape."}},
)
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
