"""Request-scoped dependencies: the runtime, a database session, and scoped authentication."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from fastapi import Depends, HTTPException, Request
from sqlmodel import Session

from api.ratelimit import FailureLimiter
from connector import admin_keys
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.connections import AdminKey

#: Paths that need no admin key, on purpose. Everything else is authenticated (a test enumerates
#: every route of the app to prove it).
PUBLIC_PATHS = frozenset(
    {
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
        "/healthz",
        "/metrics",
        "/v1/manifest",
        "/pay/{request_id}",
    }
)
PUBLIC_PREFIXES = ("/facilitator",)


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def session(rt: Runtime = Depends(runtime)) -> Iterator[Session]:
    with UnitOfWork(rt.engine) as uow:
        yield uow.session
        uow.commit()


def _auth_limit(request: Request, rt: Runtime, token: str) -> tuple[FailureLimiter, list[str]]:
    """Refuse (429) a client address or key prefix with too many recent failed authentications,
    before any lookup; returns the limiter and the names a failure would count under."""
    limiter: FailureLimiter | None = getattr(request.app.state, "auth_limiter", None)
    if limiter is None:
        limiter = request.app.state.auth_limiter = FailureLimiter(
            rt.settings.auth_failure_limit, rt.settings.auth_failure_window_s
        )
    who = [f"addr:{request.client.host if request.client else 'unknown'}"]
    if token.startswith(admin_keys.KEY_PREFIX):
        who.append("prefix:" + token[: len(admin_keys.KEY_PREFIX) + 8])
    wait = limiter.retry_after(who)
    if wait is not None:
        raise HTTPException(
            429,
            "too many failed authentications; retry after the Retry-After delay",
            headers={"retry-after": str(wait)},
        )
    return limiter, who


def require(scope: str) -> Callable[..., AdminKey]:
    def dependency(request: Request, rt: Runtime = Depends(runtime)) -> AdminKey:
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not token:
            raise HTTPException(401, "missing bearer API key")
        limiter, who = _auth_limit(request, rt, token)
        with UnitOfWork(rt.engine) as uow:
            key = admin_keys.authenticate(uow.session, token)
            if key is None:
                limiter.failed(who)
                raise HTTPException(401, "invalid or revoked API key")
            if not admin_keys.has_scope(key, scope):
                raise HTTPException(403, f"this key lacks the {scope!r} scope")
            key.last_used_at = datetime.now(UTC)
            uow.session.add(key)
            uow.commit()
        request.state.actor = key.id
        return key

    return dependency


def request_id(request: Request) -> str | None:
    rid: str | None = getattr(request.state, "request_id", None)
    return rid
