"""Admin API details a user tripped on: default subscriptions show their real URL, approve and
reject need no body."""

from __future__ import annotations

from connector.storage.db import transaction
from connector.webhooks import subscriptions
from tests.fixtures.api import ApiHarness
from tests.integration.test_api_admin import connection_body


def test_default_subscription_shows_the_connections_webhook_url(api: ApiHarness) -> None:
    created = api.client.post("/v1/admin/connections", json=connection_body(), headers=api.auth())
    assert created.status_code == 201, created.text
    conn = created.json()["id"]
    with transaction(api.runtime.engine) as session:
        subscriptions.default_for(session, conn)  # what the dispatcher makes on first event
    listed = api.client.get("/v1/admin/subscriptions", headers=api.auth("read")).json()["data"]
    default = next(s for s in listed if s["is_default"])
    assert default["connection_id"] == conn
    assert default["url"] == "https://hooks.example.com/x"


def test_approve_and_reject_accept_a_bare_post(api: ApiHarness) -> None:
    for decision in ("approve", "reject"):
        bare = api.client.post(f"/v1/admin/payments/pay_nope/{decision}", headers=api.auth())
        # Not a 422 about a missing body: the request is valid, the payment does not exist.
        assert bare.status_code == 404, bare.text
        noted = api.client.post(
            f"/v1/admin/payments/pay_nope/{decision}", json={"note": "ok"}, headers=api.auth()
        )
        assert noted.status_code == 404, noted.text
