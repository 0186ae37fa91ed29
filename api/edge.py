"""The outermost guard of every request, before routing, authentication or any parser.

Why here and not in the routes: FastAPI reads and parses a JSON body *before* it runs the
route's dependencies (authentication included), so a route cannot protect itself from its own
body. This ASGI middleware runs first and, cheaply and in this order:

1. refuses NUL characters in the path or query string (422): PostgreSQL cannot store them, and no
   identifier or filter of this API contains one;
2. for a route that needs an API key, answers 401 *without reading the body* when no bearer key is
   presented at all (the route's own dependency then checks the key itself);
3. refuses a body larger than ``max_body_bytes`` (413), from ``Content-Length`` when given and
   while streaming otherwise, so an oversized body is never held in memory;
4. scans a JSON body's raw bytes (:mod:`connector.jsonguard`) for nesting deeper than
   ``max_json_depth`` and for NUL characters (422) before any JSON parser sees it.

Every refusal is an RFC 9457 problem+json, like the rest of the API.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from connector.jsonguard import json_problem

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TYPE_BASE = "https://x402c.dev/problems/"


def public_path_matcher(paths: Iterable[str], prefixes: Iterable[str]) -> Callable[[str], bool]:
    """A predicate for "this path needs no API key", from route templates like ``/pay/{id}``."""
    patterns = [
        re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(p)) + "$") for p in paths
    ]
    starts = tuple(p.rstrip("/") + "/" for p in prefixes) + tuple(prefixes)

    def is_public(path: str) -> bool:
        return path.startswith(starts) or any(p.match(path) for p in patterns)

    return is_public


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def _is_json(content_type: bytes | None) -> bool:
    # FastAPI parses a body as JSON when the content type is missing or any JSON type.
    return content_type is None or b"json" in content_type.lower()


def _bearer_present(scope: Scope) -> bool:
    value = _header(scope, b"authorization") or b""
    return value.startswith(b"Bearer ") and 0 < len(value[7:].strip()) <= 512


class EdgeGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_json_depth: int,
        is_public: Callable[[str], bool] = lambda _: True,
        always_json: bool = False,
        invalid_status: int = 422,
        invalid_code: str = "validation_failed",
        delegate_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth
        self.is_public = is_public
        self.always_json = always_json
        # The facilitator protocol answers a malformed request with 400, the admin API with 422.
        self.invalid_status = invalid_status
        self.invalid_code = invalid_code
        # Mounted apps with a guard of their own and their own error shapes (the facilitator).
        self.delegate_prefixes = tuple(p.rstrip("/") + "/" for p in delegate_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if self.delegate_prefixes and path.startswith(self.delegate_prefixes):
            await self.app(scope, receive, send)
            return
        raw_path: bytes = scope.get("raw_path") or b""
        query: bytes = scope.get("query_string", b"")
        nul_header = any(b"\x00" in value for _, value in scope.get("headers", ()))
        if (
            "\x00" in path
            or b"%00" in raw_path
            or b"%00" in query
            or b"\x00" in query
            or nul_header
        ):
            where = "query" if b"%00" in query or b"\x00" in query else "path"
            where = "header" if nul_header else where
            await self._problem(
                scope, send, self.invalid_status, self.invalid_code, "Validation failed",
                "NUL characters are not accepted in the path, query string or headers",
                field=where,
            )  # fmt: skip
            return

        length_header = _header(scope, b"content-length")
        chunked = _header(scope, b"transfer-encoding") is not None
        try:
            declared = int(length_header) if length_header is not None else None
        except ValueError:
            declared = None
        if not chunked and not declared:
            await self.app(scope, receive, send)  # no body to guard
            return
        if not self.is_public(path) and not _bearer_present(scope):
            await self._problem(
                scope, send, 401, "unauthorized", "Unauthorized", "missing bearer API key",
                headers=[(b"www-authenticate", b'Bearer realm="x402c"')],
            )  # fmt: skip
            return
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(scope, send)
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)

        if body and (self.always_json or _is_json(_header(scope, b"content-type"))):
            problem = json_problem(body, self.max_json_depth)
            if problem is not None:
                await self._problem(
                    scope, send, self.invalid_status, self.invalid_code, "Validation failed",
                    problem, field="body",
                )  # fmt: skip
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as usual

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        await self._problem(
            scope, send, 413, "payload_too_large", "Payload too large",
            f"request bodies are limited to {self.max_body_bytes} bytes",
        )  # fmt: skip

    async def _problem(
        self,
        scope: Scope,
        send: Send,
        status: int,
        code: str,
        title: str,
        detail: str,
        *,
        field: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        state = scope.get("state") or {}
        body: dict[str, Any] = {
            "type": TYPE_BASE + code,
            "title": title,
            "status": status,
            "detail": detail,
            "instance": scope.get("path", "").replace("\x00", "\ufffd"),
            "request_id": state.get("request_id") if isinstance(state, dict) else None,
        }
        if field:
            body["errors"] = [{"field": field, "message": detail}]
        raw = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(raw)).encode()),
                    *(headers or []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": raw, "more_body": False})
