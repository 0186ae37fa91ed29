"""Request-scoped dependencies: the runtime, a database session, and scoped authentication."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fastapi import Depends, HTTPException, Request
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session

from api.ratelimit import FailureLimiter
from connector import admin_keys
from connector.errors import Conflict, ConnectorError
from connector.runtime import Runtime
from connector.storage.db import CONNECTION_ERRORS, UnitOfWork
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


class CommitFailed(ConnectorError):
    """The request's transaction could not be committed: the change was not (or may not have
    been) saved. Never answered as a success."""

    code = "commit_failed"
    status = 503
    title = "The change could not be saved"


def _unit_of_work(rt: Runtime = Depends(runtime)) -> Iterator[Session]:
    with UnitOfWork(rt.engine) as uow:
        yield uow.session
        try:
            uow.commit()
        except IntegrityError as exc:
            uow.rollback()
            raise Conflict(
                "the change contradicts stored data and was not saved; nothing changed"
            ) from exc
        except SQLAlchemyError as exc:
            uow.rollback()
            raise CommitFailed(
                "the database did not confirm the change; read the resource back before retrying"
            ) from exc


def session(s: Session = Depends(_unit_of_work, scope="function")) -> Session:
    """The request's session. Committed when the route returns and BEFORE the response is sent
    (``scope="function"``): a commit that fails is a problem response, never a 200 with values
    that were not saved. (A plain yield dependency would commit after the response is out.)"""
    return s


#: The request's unit of work, committed when the route function returns and *before* the
#: response is sent (``scope="function"``). With FastAPI's default request scope the commit ran
#: after the response had gone out: a 201 could reach the client before its row was visible to
#: the client's next request, and a commit that failed was never reported.
DB_SESSION = Depends(session, scope="function")


def _too_many(wait: int) -> HTTPException:
    return HTTPException(
        429,
        "too many failed authentications; retry after the Retry-After delay",
        headers={"retry-after": str(wait)},
    )


class _AuthLimit:
    """Failed-authentication limits for one request (see api/ratelimit.py).

    A client address over the limit is refused before any lookup. A key prefix over the limit
    (failures from any address) turns further *failures* with that prefix into 429s, but the
    key's real holder, presenting the right secret, is still let in: knowing a prefix (it is
    shown in lists and logs) must not be enough to lock a key out.
    """

    def __init__(self, request: Request, rt: Runtime, token: str) -> None:
        limiter: FailureLimiter | None = getattr(request.app.state, "auth_limiter", None)
        if limiter is None:
            limiter = request.app.state.auth_limiter = FailureLimiter(
                rt.settings.auth_failure_limit, rt.settings.auth_failure_window_s
            )
        self.limiter = limiter
        self.address = f"addr:{request.client.host if request.client else 'unknown'}"
        self.names = [self.address]
        if token.startswith(admin_keys.KEY_PREFIX):
            self.names.append("prefix:" + token[: len(admin_keys.KEY_PREFIX) + 8])
        wait = limiter.retry_after([self.address])
        if wait is not None:
            raise _too_many(wait)

    def failed(self) -> HTTPException:
        """Count a failure; the error to raise (429 once the prefix is over its limit)."""
        wait = self.limiter.retry_after(self.names[1:])
        self.limiter.failed(self.names)
        if wait is not None:
            return _too_many(wait)
        return HTTPException(401, "invalid or revoked API key")


def require(scope: str) -> Callable[..., AdminKey]:
    def dependency(request: Request, rt: Runtime = Depends(runtime)) -> AdminKey:
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not token:
            raise HTTPException(401, "missing bearer API key")
        limit = _AuthLimit(request, rt, token)
        for attempt in range(2):
            try:
                key = _authenticate(rt, token, scope, limit)
                break
            except CONNECTION_ERRORS:
                # A pooled connection the database dropped: read-and-touch again on a new one.
                if attempt == 1:
                    raise
        request.state.actor = key.id
        return key

    return dependency


def _authenticate(rt: Runtime, token: str, scope: str, limit: _AuthLimit) -> AdminKey:
    with UnitOfWork(rt.engine) as uow:
        key = admin_keys.authenticate(uow.session, token)
        if key is None:
            raise limit.failed()
        if not admin_keys.has_scope(key, scope):
            raise HTTPException(403, f"this key lacks the {scope!r} scope")
        if admin_keys.note_use(uow.session, key):  # at most once a minute: reads stay reads
            uow.commit()
        return key


def request_id(request: Request) -> str | None:
    rid: str | None = getattr(request.state, "request_id", None)
    return rid
