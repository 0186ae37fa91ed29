"""The published OpenAPI document: every error documented as RFC 9457 ``application/problem+json``
and a bearer security scheme (the Authorize button in /docs).

Why post-process instead of decorating each route: the error shapes are the same for every
operation (they come from :mod:`api.problems` and :mod:`api.edge`, not from the routes), so one
place keeps them true for routes added later. A test runs schemathesis against this document.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Problem",
    "description": "RFC 9457 problem details. `type` ends with a stable code.",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "request_id": {"type": ["string", "null"]},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    "additionalProperties": True,
}
_ANY_JSON: dict[str, Any] = {"application/json": {"schema": {}}}

#: Non-error answers that are not visible from the route signatures. Added only when a route
#: does not document the status itself.
EXTRA_RESPONSES: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("post", "/v1/connections/{connection_id}/actions/{action}"): {
        "202": {"description": "Accepted: the job is queued or running.", "content": _ANY_JSON},
    },
    ("get", "/pay/{request_id}"): {
        "302": {"description": "Paid; redirect to the resource."},
        "402": {"description": "Payment required (x402 v1 body, v2 header).", "content": _ANY_JSON},
        "410": {"description": "The payment request is closed.", "content": _ANY_JSON},
    },
    ("get", "/healthz"): {
        "503": {"description": "A critical dependency is down.", "content": _ANY_JSON},
    },
    ("get", "/metrics"): {
        "200": {
            "description": "Prometheus text format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
    },
}
EXTRA_RESPONSES[("post", "/pay/{request_id}")] = EXTRA_RESPONSES[("get", "/pay/{request_id}")]
REPLACE = {("get", "/metrics")}


def _problem(description: str) -> dict[str, Any]:
    content = {"application/problem+json": {"schema": PROBLEM_REF}}
    return {"description": description, "content": content}


def install_openapi(app: FastAPI, is_public: Callable[[str], bool]) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas["Problem"] = PROBLEM_SCHEMA
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        components["securitySchemes"] = {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "An API key (`x402c_sk_…`) with the scope the operation needs.",
            }
        }
        for path, item in schema.get("paths", {}).items():
            for method, operation in item.items():
                responses: dict[str, Any] = operation.setdefault("responses", {})
                extra = EXTRA_RESPONSES.get((method, path), {})
                for status, response in extra.items():
                    if (method, path) in REPLACE or status not in responses:
                        responses[status] = response
                responses["422"] = _problem("Validation failed (fields named in `errors`).")
                if not is_public(path):
                    operation["security"] = [{"bearerAuth": []}]
                    responses.setdefault("401", _problem("Missing, invalid or revoked API key."))
                    responses.setdefault("403", _problem("The key lacks the needed scope."))
                    responses.setdefault("429", _too_many_failures())
                if method in ("post", "put", "patch"):
                    responses.setdefault("413", _problem("Request body too large."))
                responses["default"] = _problem("Any other error, as an RFC 9457 problem.")
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _too_many_failures() -> dict[str, Any]:
    """The failed-authentication limit (per client address and key prefix) can answer any
    operation that needs a key, so every such operation documents it."""
    response = _problem(
        "Too many failed authentications from this client address or key prefix; "
        "retry after `Retry-After` seconds."
    )
    response["headers"] = {
        "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}
    }
    return response
