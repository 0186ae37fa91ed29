"""The action endpoint in OpenAPI: one typed operation per action, its body the action's input
model and its 200/202 answers the action's job shape — the same models the manifest publishes."""

from __future__ import annotations

from typing import Any

import pytest

from connector.actions.registry import ACTIONS, JOB_MODELS
from tests.fixtures.api import ApiHarness


@pytest.fixture
def schema(api: ApiHarness) -> dict[str, Any]:
    body: dict[str, Any] = api.client.get("/openapi.json").json()
    return body


def resolve(schema: dict[str, Any], ref: str) -> dict[str, Any]:
    found: dict[str, Any] = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return found


def refs(node: dict[str, Any]) -> list[str]:
    if "$ref" in node:
        return [node["$ref"]]
    return [r for option in node.get("anyOf", []) for r in refs(option)]


@pytest.mark.parametrize("spec", ACTIONS, ids=lambda a: a.key)
def test_every_action_is_a_typed_operation(
    spec: Any, schema: dict[str, Any], api: ApiHarness
) -> None:
    manifest = api.client.get("/v1/manifest").json()
    published = next(a for a in manifest["actions"] if a["key"] == spec.key)
    op = schema["paths"][f"/v1/connections/{{connection_id}}/actions/{spec.key}"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    (ref,) = refs(body)
    assert ref.endswith("/" + spec.input_model.__name__)
    # the same model as the manifest's input schema: same fields, same requirements
    component = resolve(schema, ref)
    assert set(component["properties"]) == set(published["input_schema"]["properties"])
    assert component.get("required", []) == published["input_schema"].get("required", [])
    for status in ("200", "202"):
        answer = op["responses"][status]["content"]["application/json"]["schema"]
        job = resolve(schema, answer["$ref"])
        assert job["properties"]["action"]["const"] == spec.key
        assert set(job["properties"]["status"]["enum"]) == {
            "queued", "running", "requires_approval", "pending", "succeeded", "failed"
        }  # fmt: skip
        (output,) = refs(job["properties"]["result"])
        assert output.endswith("/" + spec.output_model.__name__)
        (problem,) = refs(job["properties"]["error"])
        assert {"code", "retryable", "rule"} <= set(resolve(schema, problem)["properties"])
    assert ("428" in op["responses"]) is spec.moves_money
    names = {p["name"].lower() for p in op["parameters"]}
    assert {"idempotency-key", "x-workflow-run-id", "x-workflow-node-id"} <= names


def test_get_job_is_a_union_told_apart_by_action(schema: dict[str, Any]) -> None:
    answer = schema["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]["200"]
    union = answer["content"]["application/json"]["schema"]
    assert union["discriminator"]["propertyName"] == "action"
    assert set(union["discriminator"]["mapping"]) == {a.key for a in ACTIONS}


def test_unknown_actions_are_not_documented_and_answer_404(api: ApiHarness) -> None:
    schema = api.client.get("/openapi.json").json()
    assert "/v1/connections/{connection_id}/actions/{action}" not in schema["paths"]
    response = api.client.post(
        "/v1/connections/conn_x/actions/teleport", json={}, headers=api.auth("actions")
    )
    assert response.status_code == 404 and "teleport" in response.json()["detail"]


def test_a_job_row_fits_its_documented_shape() -> None:
    job = {
        "id": "job_1", "object": "job", "action": "send", "status": "failed",
        "connection_id": "conn_1", "payment_id": None, "result": None,
        "error": {"type": "https://x402c.dev/problems/policy_refused", "title": "t",
                  "status": 403, "detail": "d", "code": "policy_refused", "retryable": False,
                  "rule": "max_per_payment"},
        "created_at": "2026-01-01T00:00:00+00:00", "updated_at": "2026-01-01T00:00:00+00:00",
    }  # fmt: skip
    JOB_MODELS["send"].model_validate(job)
    with pytest.raises(ValueError):
        JOB_MODELS["send"].model_validate({**job, "status": "done"})
