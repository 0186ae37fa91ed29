"""Connection storage on SQLite and PostgreSQL: masked reads, vault-only secrets, rotation."""

from __future__ import annotations

import base64

import pytest
from eth_account import Account
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.engine import Engine

from connector.connections import service
from connector.connections.schemas import ConnectionCreate, ConnectionUpdate
from connector.errors import NotFound
from connector.storage.db import transaction
from connector.storage.models.connections import AuditEntry, Connection, WalletKey
from connector.vault import DecryptionFailed, MasterKeyRing, Vault
from connector.vault.rotation import keys_in_use, rewrap_all

API_KEY = "fac_live_0123456789abcdef"
PRIVATE_KEY = "0x" + "5a" * 32
WHSEC = "whsec_" + base64.b64encode(b"w" * 32).decode()


def make(vault: Vault, engine: Engine, **overrides: object) -> str:
    data = {
        "name": "Buyer agent",
        "network": "base-sepolia",
        "rpc_url": "https://rpc.example.com",
        "facilitator_url": "https://facilitator.example.com",
        "api_key": API_KEY,
        "webhook_url": "https://hooks.example.com/x402",
        "webhook_secret": WHSEC,
        "private_key": PRIVATE_KEY,
        **overrides,
    }
    with transaction(engine) as s:
        return service.create(s, vault, ConnectionCreate.model_validate(data)).id


@pytest.fixture
def vault() -> Vault:
    return Vault(MasterKeyRing.parse(MasterKeyRing.generate_spec("k1")))


def test_crud_with_masked_reads(engine: Engine, vault: Vault) -> None:
    conn_id = make(vault, engine)
    with transaction(engine) as s:
        conn = service.get(s, conn_id)
        shown = service.view(conn).model_dump_json()
        assert conn.network == "eip155:84532"
        assert conn.wallet_address == Account.from_key(PRIVATE_KEY).address
        assert API_KEY not in shown and PRIVATE_KEY[2:] not in shown and WHSEC not in shown
        assert service.view(conn).api_key_hint == "…cdef"
        assert service.api_key(vault, conn) == API_KEY
        assert service.signing_account(vault, conn).address == conn.wallet_address
        assert service.webhook_secrets(vault, conn) == [WHSEC]
    with transaction(engine) as s:
        service.update(s, vault, conn_id, ConnectionUpdate(name="Renamed", api_key=None))
    with transaction(engine) as s:
        conn = service.get(s, conn_id)
        assert conn.name == "Renamed" and conn.api_key_token is None and conn.version == 2
        service.delete(s, conn_id)
    with transaction(engine) as s:
        with pytest.raises(Exception, match="not found"):
            service.get(s, conn_id)
        actions = [
            a.action for a in s.execute(select(AuditEntry).order_by(AuditEntry.id)).scalars()
        ]
        assert actions == ["connection.create", "connection.update", "connection.delete"]
        for entry in s.execute(select(AuditEntry)).scalars():
            assert API_KEY not in str(entry.before) + str(entry.after)


def test_generated_secrets_and_wallet(engine: Engine, vault: Vault) -> None:
    with transaction(engine) as s:
        created = service.create(
            s,
            vault,
            ConnectionCreate(
                name="gen",
                network="eip155:31337",
                rpc_url="http://127.0.0.1:8545",
                facilitator_url="http://127.0.0.1:8403",
            ),
        )
    assert created.webhook_secret_once and created.webhook_secret_once.startswith("whsec_")
    with transaction(engine) as s:
        conn = service.get(s, created.id)
        assert service.webhook_secrets(vault, conn) == [created.webhook_secret_once]
        assert not service.view(conn).has_api_key


def test_swapped_ciphertext_between_rows_fails_clearly(engine: Engine, vault: Vault) -> None:
    a, b = make(vault, engine), make(vault, engine, api_key="other_key_0123456789")
    with transaction(engine) as s:
        row_a, row_b = s.get(Connection, a), s.get(Connection, b)
        assert row_a is not None and row_b is not None
        row_a.api_key_token = row_b.api_key_token
        s.add(row_a)
    with transaction(engine) as s, pytest.raises(DecryptionFailed) as info:
        service.api_key(vault, service.get(s, a))
    assert a in info.value.detail and "api_key" in info.value.detail


def test_rotate_webhook_secret_keeps_the_old_one_during_overlap(
    engine: Engine, vault: Vault
) -> None:
    from datetime import timedelta

    conn_id = make(vault, engine)
    with transaction(engine) as s:
        _, fresh = service.rotate_webhook_secret(s, vault, conn_id, overlap=timedelta(hours=1))
    with transaction(engine) as s:
        assert service.webhook_secrets(vault, service.get(s, conn_id)) == [fresh, WHSEC]


def test_rotate_wallet_archives_the_old_key(engine: Engine, vault: Vault) -> None:
    conn_id = make(vault, engine)
    with transaction(engine) as s:
        service.rotate_wallet(s, vault, conn_id)
    with transaction(engine) as s:
        wallets = (
            s.execute(select(WalletKey).where(WalletKey.connection_id == conn_id)).scalars().all()
        )
        assert sorted(w.status for w in wallets) == ["active", "archived"]
        old = next(w for w in wallets if w.status == "archived")
        assert old.address == Account.from_key(PRIVATE_KEY).address
        assert vault.decrypt(old.key_token, owner=old.id, field="key") == PRIVATE_KEY
        assert service.get(s, conn_id).wallet_address != old.address


def test_master_key_rotation_rewraps_everything(engine: Engine, vault: Vault) -> None:
    ids = [make(vault, engine) for _ in range(3)]
    old_spec = f"k1:{base64.b64encode(vault.ring.active.key).decode()}"
    new_vault = Vault(MasterKeyRing.parse(MasterKeyRing.generate_spec("k2") + "," + old_spec))
    before = keys_in_use(engine)
    assert set(before) == {"k1"}
    report = rewrap_all(engine, new_vault)
    assert report.rewrapped == before["k1"] and not report.failed
    assert set(keys_in_use(engine)) == {"k2"}
    only_new = Vault(
        MasterKeyRing.parse(f"k2:{base64.b64encode(new_vault.ring.active.key).decode()}")
    )
    with transaction(engine) as s:
        for conn_id in ids:
            assert service.api_key(only_new, service.get(s, conn_id)) == API_KEY


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "x" * 500),
        ("rpc_url", "ftp://nope"),
        ("facilitator_url", "not a url"),
        ("private_key", "0x1234"),
        ("network", "narnia"),
        ("webhook_url", "https://user:pw@hooks.example.com"),
    ],
)
def test_bad_input_names_the_field(field: str, value: str) -> None:
    data = {
        "name": "n",
        "network": "base",
        "rpc_url": "https://r.example",
        "facilitator_url": "https://f.example",
        field: value,
    }
    with pytest.raises(ValidationError) as info:
        ConnectionCreate.model_validate(data)
    assert info.value.errors()[0]["loc"][0] == field


def test_the_payment_read_carries_ciphertexts_only_and_hides_them(
    engine: Engine, vault: Vault
) -> None:
    conn_id = make(vault, engine)
    with transaction(engine) as s:
        record = service.get_for_payment(s, conn_id)
        full = service.get(s, conn_id)
        assert (record.wallet_address, record.network) == (full.wallet_address, full.network)
        assert record.wallet_key_token == full.wallet_key_token  # still a vault ciphertext
        assert service.signing_account(vault, record).key == bytes.fromhex(PRIVATE_KEY[2:])
        assert service.api_key(vault, record) == API_KEY
        assert full.wallet_key_token not in repr(record)
        assert full.api_key_token is not None and full.api_key_token not in repr(record)
        service.delete(s, conn_id)
    with transaction(engine) as s, pytest.raises(NotFound):
        service.get_for_payment(s, conn_id)
