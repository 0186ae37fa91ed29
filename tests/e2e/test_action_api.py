"""The workflow-builder surface: manifest schemas, every listed action runs, Idempotency-Key."""

from __future__ import annotations

import uuid
from typing import Any

import jsonschema
import pytest

from api.stack import Stack
from connector.actions.registry import ACTIONS, JOB_MODELS
from tests.fixtures.stack import Agent, make_agent

pytestmark = [pytest.mark.chain, pytest.mark.xdist_group("stack")]


@pytest.fixture(scope="module")
def agent(stack: Stack) -> Agent:
    return make_agent(stack, stack.accounts[11])


def test_manifest_schemas_are_valid_json_schema(agent: Agent) -> None:
    manifest = agent.http.get("/v1/manifest", headers={"authorization": ""}).json()
    assert {a["key"] for a in manifest["actions"]} == {a.key for a in ACTIONS}
    for action in manifest["actions"]:
        jsonschema.Draft202012Validator.check_schema(action["input_schema"])
        jsonschema.Draft202012Validator.check_schema(action["output_schema"])
        jsonschema.validate(action["sample_output"], action["output_schema"])
        jsonschema.Draft202012Validator.check_schema(action["job_schema"])
        sample_job = {
            "id": "job_1", "object": "job", "action": action["key"], "status": "succeeded",
            "connection_id": "conn_1", "payment_id": None, "result": action["sample_output"],
            "error": None, "created_at": "t", "updated_at": "t",
        }  # fmt: skip
        jsonschema.validate(sample_job, action["job_schema"])
        # money-moving actions say they need a key, and how the node's natural key is formed
        assert action["idempotency"]["required"] is action["moves_money"]
        assert action["idempotency"]["natural_key_headers"][:2] == [
            "X-Workflow-Run-Id",
            "X-Workflow-Node-Id",
        ]
    assert {"requires_approval", "pending"} <= set(manifest["job_contract"]["statuses"])
    jsonschema.Draft202012Validator.check_schema(manifest["credentials"]["schema"])
    secret = manifest["credentials"]["schema"]["properties"]["private_key"]
    assert secret["writeOnly"] is True
    assert "payment.settled" in {t["key"] for t in manifest["triggers"]}


def test_every_manifest_action_really_runs(agent: Agent, stack: Stack) -> None:
    seller = make_agent(stack, stack.accounts[17])
    req = seller.run("receive", {"amount": "100", "capture": "manual", "scheme": "exact"})[
        "payment_request"
    ]
    paid_job = agent.job("send", {"url": req["url"]})
    assert paid_job["status"] == "pending", paid_job  # the payee holds it: outcome not known yet
    paid = paid_job["result"]
    held = seller.http.get(
        "/v1/admin/payments", params={"connection_id": seller.connection_id, "state": "authorized"}
    ).json()["data"][0]
    inputs = {
        "send": {"to": seller.account.address, "amount": "1"},
        "receive": {"amount": "5"},
        "verify": {"tx_hash": "0x" + "00" * 32},
        "balance": {},
    }
    for key, body in inputs.items():
        response = agent.call(key, body)
        assert response.status_code == 200 and response.json()["status"] == "succeeded", key
        JOB_MODELS[key].model_validate(response.json())  # the documented (OpenAPI) job shape
    assert seller.run("release", {"payment_id": held["id"]})["payment"]["state"] == "settled"
    settled = seller.http.get(
        "/v1/admin/payments", params={"connection_id": seller.connection_id, "state": "settled"}
    ).json()["data"][0]
    assert seller.run("refund", {"payment_id": settled["id"]})["payment"]["state"] == "refunded"
    req2 = seller.run("receive", {"amount": "7", "capture": "manual", "scheme": "exact"})[
        "payment_request"
    ]
    assert agent.job("send", {"url": req2["url"]})["status"] == "pending"
    held2 = seller.http.get(
        "/v1/admin/payments",
        params={"connection_id": seller.connection_id, "state": "authorized"},
    ).json()["data"][0]
    assert seller.run("void", {"payment_id": held2["id"]})["payment"]["state"] == "voided"
    assert paid["payment"]["state"] == "settling"


def test_idempotency_key_semantics(agent: Agent, stack: Stack) -> None:
    key = str(uuid.uuid4())
    before = agent.balance()
    body = {"to": stack.accounts[18].address, "amount": "3"}
    first = agent.call("send", body, key=key)
    assert first.status_code == 200
    replay = agent.call("send", body, key=key)
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    assert replay.headers["idempotent-replayed"] == "true"
    assert agent.balance() == before - 3  # paid once
    different = agent.call("send", {**body, "amount": "4"}, key=key)
    assert different.status_code == 422
    assert different.json()["type"].endswith("/idempotency_key_reused")


@pytest.mark.parametrize("action", ["send", "refund", "release"])
def test_a_money_moving_call_without_any_key_is_refused_428(
    agent: Agent, stack: Stack, action: str
) -> None:
    bodies = {
        "send": {"to": stack.accounts[18].address, "amount": "2"},
        "refund": {"payment_id": "pay_" + "0" * 26},
        "release": {"payment_id": "pay_" + "0" * 26},
    }
    before = agent.balance()
    payments_before = agent.http.get("/v1/admin/payments", params={"limit": 200}).json()["data"]
    for _ in range(2):  # a retry without a key is refused the same way: nothing runs
        response = agent.http.post(
            f"/v1/connections/{agent.connection_id}/actions/{action}",
            params={"wait": 5},
            json=bodies[action],
        )
        assert response.status_code == 428, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        problem = response.json()
        assert problem["type"].endswith("/idempotency_key_required")
        assert "X-Workflow-Run-Id" in problem["detail"] and "Idempotency-Key" in problem["detail"]
    assert agent.balance() == before
    payments_after = agent.http.get("/v1/admin/payments", params={"limit": 200}).json()["data"]
    assert len(payments_after) == len(payments_before)


def test_the_action_nodes_natural_key_makes_a_retry_pay_once(agent: Agent, stack: Stack) -> None:
    payee = stack.accounts[18].address
    before = agent.balance()
    run = str(uuid.uuid4())

    def call(node: str, item: str | None = None) -> dict[str, Any]:
        headers = {"x-workflow-run-id": run, "x-workflow-node-id": node}
        if item is not None:
            headers["x-workflow-item"] = item
        response = agent.http.post(
            f"/v1/connections/{agent.connection_id}/actions/send",
            params={"wait": 30},
            json={"to": payee, "amount": "2"},
            headers=headers,
        )
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        assert job["status"] == "succeeded", job
        return job

    first = call("pay-node")
    again = call("pay-node")  # the workflow engine retried the node
    assert again["id"] == first["id"]
    assert agent.balance() == before - 2
    other_node = call("another-node")
    next_item = call("pay-node", item="1")
    assert len({first["id"], other_node["id"], next_item["id"]}) == 3
    assert agent.balance() == before - 6


def test_async_call_returns_202_and_job_can_be_polled(agent: Agent) -> None:
    response = agent.call("balance", {}, wait=0)
    assert response.status_code == 202
    job_id = response.json()["id"]
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        job = agent.http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "succeeded":
            break
        time.sleep(0.05)
    assert job["status"] == "succeeded" and int(job["result"]["balance"]) >= 0


def test_invalid_action_input_is_a_422_problem_naming_the_field(agent: Agent) -> None:
    response = agent.call("send", {"to": "0x123", "amount": "1"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "to"
    response = agent.call("send", {"to": "0x" + "1" * 40, "amount": 1.5})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "amount"


def test_metrics_expose_payments_actions_and_webhooks(agent: Agent) -> None:
    agent.run("send", {"to": agent.account.address, "amount": "1"})
    text = agent.http.get("/metrics").text
    assert 'x402c_payments{state="settled"}' in text
    assert 'x402c_payment_transitions_total{direction="outgoing",state="settled"}' in text
    assert 'x402c_action_seconds_count{action="send",status="succeeded"}' in text
