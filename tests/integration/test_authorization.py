"""Who may do what: four-eyes approvals count people (principals), not keys; actions keys are
scoped to connections; a REST-hook key deletes only its own subscriptions; failed authentication
is rate-limited. Every test runs on SQLite and PostgreSQL (the ``engine`` fixture)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import col

from api.app import create_app
from connector import admin_keys
from connector.errors import Conflict, ValidationFailed
from connector.ids import new_id
from connector.policy.approvals import record_decision
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage.db import transaction
from connector.storage.models.connections import AdminKey, AuditEntry
from connector.storage.models.events import Subscription
from connector.storage.models.payments import Approval, Payment
from connector.vault import MasterKeyRing
from tests.fixtures.api import ApiHarness
from tests.fixtures.net import test_resolver
from tests.integration.test_api_admin import connection_body

PAYEE = "0x" + "ab" * 20


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def waiting_payment(engine: Engine, connection_id: str, *, required: int = 2) -> str:
    """A payment held for approval. No stored requirement: when approvals suffice, nothing is
    signed here (the e2e suite covers signing); the audit log shows the count reached."""
    payment_id = new_id("pay")
    with transaction(engine) as s:
        s.add(
            Payment(
                id=payment_id,
                connection_id=connection_id,
                direction="outgoing",
                state="requires_approval",
                amount=150,
                asset="0x" + "cd" * 20,
                network="eip155:84532",
                payee=PAYEE,
                approvals_required=required,
                created_at=datetime.now(UTC) - timedelta(minutes=5),
            )
        )
    return payment_id


def make_connection(api: ApiHarness, name: str = "Agent") -> str:
    response = api.client.post(
        "/v1/admin/connections", json=connection_body(name=name), headers=api.auth()
    )
    assert response.status_code == 201, response.text
    conn_id: str = response.json()["id"]
    return conn_id


def person_key(engine: Engine, principal: str) -> str:
    """A key for a person, as the CLI mints it (``x402c admin-key create --principal``)."""
    with transaction(engine) as s:
        return admin_keys.create_key(s, name=principal, scopes=["admin"], principal=principal)[1]


def approval_audit(engine: Engine, payment_id: str) -> list[dict[str, Any]]:
    with transaction(engine) as s:
        rows = s.execute(
            select(AuditEntry)
            .where(col(AuditEntry.target_id) == payment_id)
            .order_by(col(AuditEntry.at), col(AuditEntry.id))
        ).scalars()
        return [{"actor": r.actor, "action": r.action, **(r.after or {})} for r in rows]


# ------------------------------------------------------------------------------ four eyes


def test_one_admin_with_two_keys_is_one_approver(api: ApiHarness) -> None:
    """The reported defect: approve with key 1, mint key 2 with key 1, approve again."""
    engine = api.runtime.engine
    payment_id = waiting_payment(engine, make_connection(api))
    alice = person_key(engine, "alice")
    first = api.client.post(
        f"/v1/admin/payments/{payment_id}/approve", json={}, headers=bearer(alice)
    )
    assert first.status_code == 200 and first.json()["state"] == "requires_approval"

    minted = api.client.post(
        "/v1/admin/keys", json={"name": "second", "scopes": ["admin"]}, headers=bearer(alice)
    )
    assert minted.status_code == 201
    assert minted.json()["principal"] == "alice"  # inherited, not a new person
    again = api.client.post(
        f"/v1/admin/payments/{payment_id}/approve",
        json={},
        headers=bearer(minted.json()["key_once"]),
    )
    assert again.status_code == 409, again.text
    assert "alice" in again.json()["detail"]
    with transaction(engine) as s:
        payment = s.get(Payment, payment_id)
        assert payment is not None and payment.state == "requires_approval"
        approvals = s.execute(select(Approval).where(col(Approval.payment_id) == payment_id))
        assert [a.principal for a in approvals.scalars()] == ["alice"]

    bob = person_key(engine, "bob")
    second = api.client.post(
        f"/v1/admin/payments/{payment_id}/approve", json={}, headers=bearer(bob)
    )
    assert second.status_code == 200, second.text
    trail = [e for e in approval_audit(engine, payment_id) if e["action"] == "payment.approve"]
    assert [(e["principal"], e["approvals"], e["approvals_required"]) for e in trail] == [
        ("alice", 1, 2),
        ("bob", 2, 2),
    ]
    assert all(e["admin_key_id"] == e["actor"] and e["actor"].startswith("key_") for e in trail)


def test_a_rejection_is_audited_with_the_principal(api: ApiHarness) -> None:
    engine = api.runtime.engine
    payment_id = waiting_payment(engine, make_connection(api))
    carol = person_key(engine, "carol")
    response = api.client.post(
        f"/v1/admin/payments/{payment_id}/reject",
        json={"note": "unknown payee"},
        headers=bearer(carol),
    )
    assert response.json()["state"] == "rejected"
    (entry,) = approval_audit(engine, payment_id)
    assert (entry["action"], entry["principal"], entry["note"]) == (
        "payment.reject",
        "carol",
        "unknown payee",
    )


def test_a_key_minted_after_the_payment_by_an_approver_cannot_approve(engine: Engine) -> None:
    """Defence in depth, whatever principal such a key carries: a key minted after the payment
    was created speaks for its minter too, in either order of approval."""
    payment_id = waiting_payment(engine, "conn_x", required=3)
    with transaction(engine) as s:
        dave, _ = admin_keys.create_key(s, name="dave", scopes=["admin"], principal="dave")
        dave.created_at = datetime.now(UTC) - timedelta(days=1)
        # A key naming another principal but minted by dave after the payment was created
        # (no API path makes one; a future or legacy path must not open the hole).
        puppet = AdminKey(
            id=new_id("key"),
            name="puppet",
            prefix="x402c_sk_puppet00",
            secret_hash="0" * 64,
            scopes=["admin"],
            principal="erin",
            created_by=dave.id,
        )
        s.add(puppet)
        s.add(dave)
    ttl = timedelta(hours=1)
    with transaction(engine) as s:
        record_decision(s, payment_id, admin_key_id=dave.id, decision="approve", ttl=ttl)
    with transaction(engine) as s, pytest.raises(Conflict):
        record_decision(s, payment_id, admin_key_id=puppet.id, decision="approve", ttl=ttl)

    other = waiting_payment(engine, "conn_x", required=3)
    with transaction(engine) as s:
        record_decision(s, other, admin_key_id=puppet.id, decision="approve", ttl=ttl)
    with transaction(engine) as s, pytest.raises(Conflict):  # the reverse order
        record_decision(s, other, admin_key_id=dave.id, decision="approve", ttl=ttl)


def test_an_api_minted_key_cannot_name_another_principal(engine: Engine) -> None:
    with transaction(engine) as s:
        alice, _ = admin_keys.create_key(s, name="a", scopes=["admin"], principal="alice")
        with pytest.raises(ValidationFailed):
            admin_keys.create_key(s, name="b", scopes=["admin"], created_by=alice, principal="bob")
        with pytest.raises(ValidationFailed):
            admin_keys.create_key(s, name="c", scopes=["admin"], principal="no spaces please")


# ------------------------------------------------------------------------------ scoping


def actions_key(api: ApiHarness, connections: list[str]) -> tuple[str, str]:
    response = api.client.post(
        "/v1/admin/keys",
        json={"name": "workflow", "scopes": ["actions"], "connections": connections},
        headers=api.auth(),
    )
    assert response.status_code == 201, response.text
    return response.json()["id"], response.json()["key_once"]


def test_an_actions_key_must_say_which_connections_it_may_use(api: ApiHarness) -> None:
    no_list = api.client.post(
        "/v1/admin/keys", json={"name": "wf", "scopes": ["actions"]}, headers=api.auth()
    )
    assert no_list.status_code == 422 and no_list.json()["errors"][0]["field"] == "connections"
    unknown = api.client.post(
        "/v1/admin/keys",
        json={"name": "wf", "scopes": ["actions"], "connections": ["conn_nope"]},
        headers=api.auth(),
    )
    assert unknown.status_code == 422
    admin_with_list = api.client.post(
        "/v1/admin/keys",
        json={"name": "wf", "scopes": ["admin"], "connections": ["conn_nope"]},
        headers=api.auth(),
    )
    assert admin_with_list.status_code == 422
    _, everything = actions_key(api, ["*"])
    listed = api.client.get("/v1/admin/keys", headers=api.auth()).json()["data"]
    assert {k["name"]: k["connections"] for k in listed}["workflow"] == ["*"]
    assert everything.startswith("x402c_sk_")


def test_actions_keys_act_and_read_jobs_only_on_their_connections(api: ApiHarness) -> None:
    mine, theirs = make_connection(api, "mine"), make_connection(api, "theirs")
    _, key = actions_key(api, [mine])

    def run(conn: str, auth: dict[str, str], idem: str) -> Any:
        return api.client.post(
            f"/v1/connections/{conn}/actions/balance",
            json={},
            headers={**auth, "idempotency-key": idem},
        )

    assert run(mine, bearer(key), "k1").status_code == 202
    refused = run(theirs, bearer(key), "k2")
    assert refused.status_code == 403, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert run("conn_does_not_exist", bearer(key), "k3").status_code == 403  # no oracle

    their_job = run(theirs, api.auth("admin"), "k4").json()["id"]  # admin keys use all
    legacy_job = run(theirs, api.auth("actions"), "k5").json()["id"]  # unscoped legacy key
    assert api.client.get(f"/v1/jobs/{their_job}", headers=bearer(key)).status_code == 404
    assert api.client.get(f"/v1/jobs/{legacy_job}", headers=api.auth("actions")).status_code == 200
    my_job = run(mine, bearer(key), "k1").json()["id"]
    assert api.client.get(f"/v1/jobs/{my_job}", headers=bearer(key)).status_code == 200


def test_a_hooks_key_deletes_only_what_it_subscribed(api: ApiHarness) -> None:
    conn = make_connection(api)
    _, key_a = actions_key(api, [conn])
    _, key_b = actions_key(api, [conn])
    hook = {"connection_id": conn, "url": "https://hooks.example.com/a", "event_types": []}
    mine = api.client.post("/v1/hooks", json=hook, headers=bearer(key_a)).json()["id"]
    admins = api.client.post("/v1/admin/subscriptions", json=hook, headers=api.auth()).json()["id"]

    assert api.client.delete(f"/v1/hooks/{admins}", headers=bearer(key_a)).status_code == 404
    assert api.client.delete(f"/v1/hooks/{mine}", headers=bearer(key_b)).status_code == 404
    with transaction(api.runtime.engine) as s:
        statuses = {sub.id: sub.status for sub in s.execute(select(Subscription)).scalars()}
    assert statuses[admins] == statuses[mine] == "active"

    assert api.client.delete(f"/v1/hooks/{mine}", headers=bearer(key_a)).status_code == 200
    assert api.client.delete(f"/v1/hooks/{admins}", headers=api.auth()).status_code == 200


def test_a_hooks_key_subscribes_only_on_its_connections(api: ApiHarness) -> None:
    mine, theirs = make_connection(api, "mine"), make_connection(api, "theirs")
    _, key = actions_key(api, [mine])
    hook = {"connection_id": theirs, "url": "https://hooks.example.com/a"}
    assert api.client.post("/v1/hooks", json=hook, headers=bearer(key)).status_code == 403


# ------------------------------------------------------------------------------ rate limit


@pytest.fixture
def limited(engine: Engine, tmp_path: Path) -> Any:
    settings = Settings(
        data_dir=tmp_path,
        master_keys=MasterKeyRing.generate_spec("r1"),
        auth_failure_limit=3,
        auth_failure_window_s=600,
    )
    rt = Runtime(settings=settings, engine=engine, resolver=test_resolver)
    with transaction(engine) as s:
        _, key = admin_keys.create_key(s, name="ops", scopes=["admin"], principal="ops")
    yield create_app(runtime=rt), key
    rt.close()


def test_failed_authentication_is_limited_per_address_with_retry_after(limited: Any) -> None:
    app, good = limited
    attacker = TestClient(app, client=("203.0.113.7", 5000))
    bystander = TestClient(app, client=("198.51.100.9", 5000))
    for i in range(3):
        wrong = {"authorization": f"Bearer x402c_sk_guess{i:03d}_nope"}
        assert attacker.get("/v1/admin/keys", headers=wrong).status_code == 401
    blocked = attacker.get("/v1/admin/keys", headers=bearer("x402c_sk_guess999_nope"))
    assert blocked.status_code == 429, blocked.text
    assert blocked.headers["content-type"].startswith("application/problem+json")
    assert 1 <= int(blocked.headers["retry-after"]) <= 600
    # Refused before any lookup, even with a valid key, while the address is over the limit.
    assert attacker.get("/v1/admin/keys", headers=bearer(good)).status_code == 429
    # Other addresses are not affected.
    assert bystander.get("/v1/admin/keys", headers=bearer(good)).status_code == 200


def test_failed_authentication_is_limited_per_key_prefix_across_addresses(limited: Any) -> None:
    app, good = limited
    prefix = good[: len(admin_keys.KEY_PREFIX) + 8]
    for i in range(3):
        client = TestClient(app, client=(f"203.0.113.{10 + i}", 5000))
        wrong = bearer(prefix + "_wrongsecret")
        assert client.get("/v1/admin/keys", headers=wrong).status_code == 401
    fresh = TestClient(app, client=("203.0.113.99", 5000))
    response = fresh.get("/v1/admin/keys", headers=bearer(prefix + "_another"))
    assert response.status_code == 429 and "retry-after" in response.headers
    # Knowing the prefix does not lock the key's holder out: the right secret still works.
    holder = TestClient(app, client=("198.51.100.1", 5000))
    assert holder.get("/v1/admin/keys", headers=bearer(good)).status_code == 200


def _asked_by(engine: Engine, payment_id: str, key_id: str) -> None:
    """Record that ``key_id`` asked for the payment (its send job created it)."""
    from connector.jobs import link_payment, start_job

    with transaction(engine) as s:
        payment = s.get(Payment, payment_id)
        assert payment is not None
        job = start_job(
            s,
            connection_id=payment.connection_id,
            action="send",
            body={"to": PAYEE, "amount": "150"},
            idempotency_key=new_id("idem"),
            requested_by=key_id,
        ).job
        link_payment(s, job.id, payment_id)


def _key_id(engine: Engine, secret: str) -> str:
    with transaction(engine) as s:
        key = admin_keys.authenticate(s, secret)
        assert key is not None
        return key.id


def test_an_admin_who_asked_for_a_payment_cannot_approve_it(api: ApiHarness) -> None:
    """The requester's principal is not a second pair of eyes: carol sends with her admin key,
    then tries to approve with it and with a second key of hers; dave and erin can."""
    engine = api.runtime.engine
    payment_id = waiting_payment(engine, make_connection(api), required=2)
    carol = person_key(engine, "carol")
    _asked_by(engine, payment_id, _key_id(engine, carol))
    for key in (carol, person_key(engine, "carol")):
        refused = api.client.post(
            f"/v1/admin/payments/{payment_id}/approve", json={}, headers=bearer(key)
        )
        assert refused.status_code == 409, refused.text
        assert "someone else" in refused.json()["detail"]
    for person in ("dave", "erin"):
        ok = api.client.post(
            f"/v1/admin/payments/{payment_id}/approve",
            json={},
            headers=bearer(person_key(engine, person)),
        )
        assert ok.status_code == 200, ok.text
    with transaction(engine) as s:
        approvals = s.execute(select(Approval).where(col(Approval.payment_id) == payment_id))
        assert sorted(a.principal for a in approvals.scalars()) == ["dave", "erin"]


def test_the_agents_minter_approves_what_the_agent_asked_for(api: ApiHarness) -> None:
    """A machine key (actions scope only) inherits its minter's principal; that person approving
    their agent's payment is the approval flow working as meant."""
    engine = api.runtime.engine
    payment_id = waiting_payment(engine, make_connection(api), required=1)
    frank = person_key(engine, "frank")
    agent = api.client.post(
        "/v1/admin/keys",
        json={"name": "agent", "scopes": ["actions"], "connections": ["*"]},
        headers=bearer(frank),
    )
    assert agent.status_code == 201, agent.text
    _asked_by(engine, payment_id, agent.json()["id"])
    ok = api.client.post(f"/v1/admin/payments/{payment_id}/approve", json={}, headers=bearer(frank))
    assert ok.status_code == 200, ok.text
