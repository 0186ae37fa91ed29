"""A change is committed BEFORE its success is answered: a commit that fails is a problem
response, never a 200 with values that were not saved (PATCH of a connection, key revocation).

PostgreSQL makes the commit itself fail with a deferred constraint trigger: every statement of
the request succeeds, and the database refuses only at COMMIT.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text

from tests.fixtures.api import ApiHarness
from tests.integration.test_api_admin import connection_body

pytestmark = pytest.mark.postgres


@pytest.fixture
def refuse_at_commit(api: ApiHarness) -> Iterator[None]:
    """A rename of a connection, or a key's revocation, fails at COMMIT (for this test only);
    other updates (e.g. a key's ``last_used_at`` at authentication) still commit."""
    engine = api.runtime.engine
    if engine.dialect.name != "postgresql":
        pytest.skip("deferred constraint triggers are a PostgreSQL feature")
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION x402c_test_refuse() RETURNS trigger AS $$ BEGIN "
                "IF (TG_TABLE_NAME = 'connections' AND NEW.name IS DISTINCT FROM OLD.name) "
                "OR (TG_TABLE_NAME = 'admin_keys' "
                "AND NEW.revoked_at IS DISTINCT FROM OLD.revoked_at) THEN "
                "RAISE EXCEPTION 'refused at commit'; END IF; RETURN NULL; END $$ "
                "LANGUAGE plpgsql"
            )
        )
        for table in ("connections", "admin_keys"):
            conn.execute(
                text(
                    f"CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER UPDATE ON {table} "
                    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                    "EXECUTE FUNCTION x402c_test_refuse()"
                )
            )
    try:
        yield
    finally:
        with engine.begin() as conn:
            for table in ("connections", "admin_keys"):
                conn.execute(text(f"DROP TRIGGER IF EXISTS refuse_at_commit ON {table}"))


def test_a_patch_whose_commit_fails_is_not_answered_200(
    api: ApiHarness, refuse_at_commit: None
) -> None:
    created = api.client.post(
        "/v1/admin/connections", json=connection_body(), headers=api.auth()
    ).json()
    response = api.client.patch(
        f"/v1/admin/connections/{created['id']}", json={"name": "Renamed"}, headers=api.auth()
    )
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith("/commit_failed")
    stored = api.client.get(f"/v1/admin/connections/{created['id']}", headers=api.auth()).json()
    assert stored["name"] == created["name"]  # and indeed nothing changed


def test_a_key_revocation_whose_commit_fails_is_not_answered_200(
    api: ApiHarness, refuse_at_commit: None
) -> None:
    made = api.client.post(
        "/v1/admin/keys", json={"name": "temp", "scopes": ["read"]}, headers=api.auth()
    )
    assert made.status_code in (200, 201), made.text
    key = made.json()
    response = api.client.delete(f"/v1/admin/keys/{key['id']}", headers=api.auth())
    assert response.status_code == 503, response.text
    # the key still works: the revocation was not saved, and nobody was told it was
    still = {"authorization": f"Bearer {key['key_once']}"}
    assert api.client.get("/v1/admin/connections", headers=still).status_code == 200
