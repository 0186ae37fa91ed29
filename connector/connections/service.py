"""Create, read, update, delete and rotate connections. Secrets go in and out only here, and
only through the vault; reads return :class:`ConnectionView` (hints and flags, no secrets)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import bindparam, select
from sqlmodel import Session, SQLModel, col

from connector.audit import audit
from connector.connections.schemas import (
    ConnectionCreate,
    ConnectionCreated,
    ConnectionUpdate,
    ConnectionView,
)
from connector.errors import (
    ConcurrentUpdate,
    NotFound,
    UnsafeURL,
    ValidationFailed,
    WalletKeyMissing,
)
from connector.facilitator.auth import CdpJwtAuth, FacilitatorCredentials
from connector.ids import new_id
from connector.logs import register_secret
from connector.storage.models.connections import Connection, WalletKey
from connector.vault import Vault
from connector.webhooks.signing import generate_secret
from connector.x402.exact_evm import Signer
from connector.x402.fields import checksum

API_KEY, WEBHOOK_SECRET, PREVIOUS_WEBHOOK_SECRET, WALLET_KEY = (
    "api_key",
    "webhook_secret",
    "previous_webhook_secret",
    "wallet_key",
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def view(conn: Connection) -> ConnectionView:
    rotating = conn.previous_webhook_secret_expires_at
    if rotating is not None and rotating <= datetime.now(UTC):
        rotating = None
    return ConnectionView(
        id=conn.id,
        name=conn.name,
        network=conn.network,
        rpc_url=conn.rpc_url,
        facilitator_url=conn.facilitator_url,
        asset=conn.asset,
        has_api_key=conn.api_key_token is not None,
        api_key_hint=conn.api_key_hint,
        api_key_id=conn.api_key_id,
        facilitator_auth=(
            "none" if conn.api_key_token is None else "jwt" if conn.api_key_id else "bearer"
        ),
        webhook_url=conn.webhook_url,
        has_webhook_secret=True,
        webhook_secret_rotating_until=_iso(rotating),
        wallet_address=conn.wallet_address,
        has_wallet_key=conn.wallet_key_token is not None,
        pay_to=receiving_address(conn),
        capture_default=conn.capture_default,
        policy=conn.policy,
        created_at=conn.created_at.isoformat(),
        updated_at=conn.updated_at.isoformat(),
    )


def receiving_address(conn: _HasAddresses) -> str:
    """Where incoming payments go: the configured ``pay_to``, else the wallet's address."""
    address = conn.pay_to or conn.wallet_address
    if address is None:  # the create/update rules keep one of them set
        raise ValidationFailed(f"connection {conn.id} has neither pay_to nor a wallet")
    return address


def _public(conn: Connection) -> dict[str, Any]:
    return view(conn).model_dump()


def _new_wallet(session: Session, vault: Vault, conn_id: str, key_hex: str | None) -> LocalAccount:
    account: LocalAccount = Account.from_key(key_hex) if key_hex else Account.create()
    wallet_id = new_id("wal")
    session.add(
        WalletKey(
            id=wallet_id,
            connection_id=conn_id,
            address=account.address,
            key_token=vault.encrypt("0x" + account.key.hex(), owner=wallet_id, field="key"),
            status="active",
        )
    )
    return account


#: Vets an outbound URL (the runtime's ``OutboundPolicy.check_url``); raises ``UnsafeURL``.
URLCheck = Callable[[str], object]
URL_FIELDS = ("rpc_url", "facilitator_url", "webhook_url")


def vet_urls(check: URLCheck | None, values: dict[str, Any]) -> None:
    """Refuse, when written, any URL the connector would later refuse to call: the same SSRF
    rules as delivery, reported as a 422 naming the field."""
    if check is None:
        return
    for field in URL_FIELDS:
        url = values.get(field)
        if not url:
            continue
        try:
            check(url)
        except UnsafeURL as exc:
            raise ValidationFailed(
                f"{field}: {exc.detail}", field=field, reason=exc.context.get("reason")
            ) from exc


def create(
    session: Session,
    vault: Vault,
    data: ConnectionCreate,
    *,
    actor: str = "system",
    request_id: str | None = None,
    check_url: URLCheck | None = None,
) -> ConnectionCreated:
    vet_urls(check_url, data.model_dump(include=set(URL_FIELDS)))
    if data.facilitator_url is None:  # the API fills in the configured default first
        raise ValidationFailed("facilitator_url is required", field="facilitator_url")
    conn_id = new_id("conn")
    now = datetime.now(UTC)
    generated = data.webhook_secret is None
    webhook_secret = generate_secret() if generated else data.webhook_secret.get_secret_value()  # type: ignore[union-attr]
    key_hex = data.private_key.get_secret_value() if data.private_key else None
    # Receiving needs only an address: with `pay_to` and no key, hold no key at all.
    receive_only = key_hex is None and data.pay_to is not None
    account = None if receive_only else _new_wallet(session, vault, conn_id, key_hex)
    api_key = data.api_key.get_secret_value() if data.api_key else None
    conn = Connection(
        id=conn_id,
        name=data.name,
        network=data.network,
        rpc_url=data.rpc_url,
        facilitator_url=data.facilitator_url,
        asset=data.asset,
        api_key_token=vault.encrypt(api_key, owner=conn_id, field=API_KEY) if api_key else None,
        api_key_hint=Vault.hint(api_key) if api_key else None,
        api_key_id=data.api_key_id,
        webhook_url=data.webhook_url,
        webhook_secret_token=vault.encrypt(webhook_secret, owner=conn_id, field=WEBHOOK_SECRET),
        wallet_key_token=(
            vault.encrypt("0x" + account.key.hex(), owner=conn_id, field=WALLET_KEY)
            if account
            else None
        ),
        wallet_address=account.address if account else None,
        pay_to=checksum(data.pay_to) if data.pay_to else None,
        capture_default=data.capture_default,
        policy=data.policy.model_dump(mode="json", exclude_defaults=True),
        created_at=now,
        updated_at=now,
    )
    session.add(conn)
    session.flush()
    audit(
        session,
        actor=actor,
        action="connection.create",
        target_type="connection",
        target_id=conn_id,
        after=_public(conn),
        request_id=request_id,
    )
    return ConnectionCreated(
        **view(conn).model_dump(), webhook_secret_once=webhook_secret if generated else None
    )


@dataclass(frozen=True)
class PaymentConnection:
    """The columns a payment needs, read with one Core statement (no ORM identity map: this read
    happens on every action and costs half as much this way). Secrets stay ciphertexts."""

    id: str
    network: str
    rpc_url: str
    facilitator_url: str
    asset: str | None
    wallet_address: str | None
    pay_to: str | None
    capture_default: str
    policy: dict[str, Any]
    wallet_key_token: str | None = dataclasses.field(repr=False)
    api_key_token: str | None = dataclasses.field(repr=False)
    api_key_id: str | None = None


_CONNECTIONS = SQLModel.metadata.tables["connections"]
_READ_FOR_PAYMENT = select(
    *(_CONNECTIONS.c[name] for name in PaymentConnection.__dataclass_fields__)
).where(_CONNECTIONS.c.id == bindparam("b_id"), _CONNECTIONS.c.deleted_at.is_(None))


def get_for_payment(session: Session, conn_id: str) -> PaymentConnection:
    row = session.execute(_READ_FOR_PAYMENT, {"b_id": conn_id}).first()
    if row is None:
        raise NotFound(f"connection {conn_id} not found", connection_id=conn_id)
    return PaymentConnection(*row)


def get(session: Session, conn_id: str) -> Connection:
    conn = session.get(Connection, conn_id)
    if conn is None or conn.deleted_at is not None:
        raise NotFound(f"connection {conn_id} not found", connection_id=conn_id)
    return conn


def list_page(
    session: Session,
    *,
    limit: int = 50,
    starting_after: str | None = None,
    network: str | None = None,
    name: str | None = None,
) -> tuple[list[Connection], bool]:
    """A page ordered by id (ids are time-ordered); returns (rows, has_more)."""
    query = select(Connection).where(col(Connection.deleted_at).is_(None))
    if starting_after:
        query = query.where(col(Connection.id) > starting_after)
    if network:
        query = query.where(col(Connection.network) == network)
    if name:
        query = query.where(col(Connection.name).contains(name))
    rows = list(session.execute(query.order_by(col(Connection.id)).limit(limit + 1)).scalars())
    return rows[:limit], len(rows) > limit


def _save(
    session: Session,
    conn: Connection,
    *,
    action: str,
    actor: str,
    request_id: str | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    expected_version: int | None = None,
) -> None:
    """Bump the version, stage the row and write its audit entry in the same transaction."""
    _bump(conn, expected_version)
    session.add(conn)
    audit(
        session,
        actor=actor,
        action=action,
        target_type="connection",
        target_id=conn.id,
        before=before,
        after=after,
        request_id=request_id,
    )


def _bump(conn: Connection, expected_version: int | None) -> None:
    if expected_version is not None and conn.version != expected_version:
        raise ConcurrentUpdate(
            f"connection {conn.id} is at version {conn.version}, not {expected_version}"
        )
    conn.version += 1
    conn.updated_at = datetime.now(UTC)


def update(
    session: Session,
    vault: Vault,
    conn_id: str,
    data: ConnectionUpdate,
    *,
    actor: str = "system",
    request_id: str | None = None,
    expected_version: int | None = None,
    check_url: URLCheck | None = None,
) -> ConnectionView:
    conn = get(session, conn_id)
    before = _public(conn)
    changes = data.model_dump(exclude_unset=True)
    vet_urls(check_url, changes)
    for field in (
        "name", "network", "rpc_url", "facilitator_url", "asset", "webhook_url", "api_key_id"
    ):  # fmt: skip
        if field in changes:
            setattr(conn, field, changes[field])
    if "capture_default" in changes and data.capture_default is not None:
        conn.capture_default = data.capture_default
    if data.policy is not None:
        conn.policy = data.policy.model_dump(mode="json", exclude_defaults=True)
    if "pay_to" in changes:
        if data.pay_to is None and conn.wallet_address is None:
            raise ValidationFailed(
                "a receive-only connection needs its pay_to address", field="pay_to"
            )
        conn.pay_to = checksum(data.pay_to) if data.pay_to else None
    if "api_key" in changes:
        secret = data.api_key.get_secret_value() if data.api_key else None
        conn.api_key_token = vault.encrypt(secret, owner=conn.id, field=API_KEY) if secret else None
        conn.api_key_hint = Vault.hint(secret) if secret else None
    _save(
        session,
        conn,
        action="connection.update",
        actor=actor,
        request_id=request_id,
        before=before,
        after=_public(conn),
        expected_version=expected_version,
    )
    return view(conn)


def delete(
    session: Session, conn_id: str, *, actor: str = "system", request_id: str | None = None
) -> None:
    """Soft delete: payments and audits keep referring to the row; secrets stay encrypted."""
    conn = get(session, conn_id)
    before = _public(conn)
    conn.deleted_at = datetime.now(UTC)
    _save(
        session,
        conn,
        action="connection.delete",
        actor=actor,
        request_id=request_id,
        before=before,
        after=None,
    )


def rotate_webhook_secret(
    session: Session,
    vault: Vault,
    conn_id: str,
    *,
    overlap: timedelta,
    actor: str = "system",
    request_id: str | None = None,
) -> tuple[ConnectionView, str]:
    """New secret now; the old one keeps signing (second signature) until ``overlap`` ends."""
    conn = get(session, conn_id)
    old = vault.decrypt(conn.webhook_secret_token, owner=conn.id, field=WEBHOOK_SECRET)
    fresh = generate_secret()
    conn.previous_webhook_secret_token = vault.encrypt(
        old, owner=conn.id, field=PREVIOUS_WEBHOOK_SECRET
    )
    conn.previous_webhook_secret_expires_at = datetime.now(UTC) + overlap
    conn.webhook_secret_token = vault.encrypt(fresh, owner=conn.id, field=WEBHOOK_SECRET)
    _save(
        session,
        conn,
        action="connection.rotate_webhook_secret",
        actor=actor,
        request_id=request_id,
        before=None,
        after={"webhook_secret_rotating_until": _iso(conn.previous_webhook_secret_expires_at)},
    )
    return view(conn), fresh


def rotate_wallet(
    session: Session,
    vault: Vault,
    conn_id: str,
    *,
    private_key: str | None = None,
    actor: str = "system",
    request_id: str | None = None,
) -> ConnectionView:
    """New wallet key; the old one is archived (kept for refunds and audits), never deleted."""
    conn = get(session, conn_id)
    before = _public(conn)
    now = datetime.now(UTC)
    for wallet in session.execute(
        select(WalletKey).where(
            col(WalletKey.connection_id) == conn.id, col(WalletKey.status) == "active"
        )
    ).scalars():
        wallet.status = "archived"
        wallet.archived_at = now
        session.add(wallet)
    account = _new_wallet(session, vault, conn.id, private_key)
    conn.wallet_key_token = vault.encrypt("0x" + account.key.hex(), owner=conn.id, field=WALLET_KEY)
    conn.wallet_address = account.address
    _save(
        session,
        conn,
        action="connection.rotate_wallet",
        actor=actor,
        request_id=request_id,
        before=before,
        after=_public(conn),
    )
    return view(conn)


# ---------------------------------------------------------------------------- secret access


class _HasAddresses(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def wallet_address(self) -> str | None: ...
    @property
    def pay_to(self) -> str | None: ...


class _HoldsSecrets(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def wallet_address(self) -> str | None: ...
    @property
    def wallet_key_token(self) -> str | None: ...
    @property
    def api_key_token(self) -> str | None: ...


def signing_account(vault: Vault, conn: _HoldsSecrets) -> Signer:
    """The wallet's key for signing. The address is the one derived from this key when it was
    stored; the ciphertext is bound to this connection and field, so the two cannot drift.
    A receive-only connection has none: :class:`WalletKeyMissing` says so."""
    if conn.wallet_key_token is None or conn.wallet_address is None:
        raise WalletKeyMissing(
            f"connection {conn.id} holds no wallet key (receive-only): sending, refunding or "
            "forwarding needs one; add it with rotate-wallet",
            connection_id=conn.id,
        )
    key = vault.decrypt(conn.wallet_key_token, owner=conn.id, field=WALLET_KEY)
    register_secret(key)
    return Signer(address=conn.wallet_address, key=bytes.fromhex(key.removeprefix("0x")))


def archived_signing_account(
    engine: Any, vault: Vault, conn_id: str, address: str
) -> Signer | None:
    """The key of an earlier wallet of this connection at ``address`` (kept for refunds of
    money it received), or None."""
    from connector.storage.db import UnitOfWork

    with UnitOfWork(engine) as uow:
        wallets = uow.session.execute(
            select(WalletKey).where(col(WalletKey.connection_id) == conn_id)
        ).scalars()
        found = next((w for w in wallets if w.address.lower() == address.lower()), None)
        if found is None:
            return None
        key_id, token, wallet_address = found.id, found.key_token, found.address
    key = vault.decrypt(token, owner=key_id, field="key")
    register_secret(key)
    return Signer(address=wallet_address, key=bytes.fromhex(key.removeprefix("0x")))


def api_key(vault: Vault, conn: _HoldsSecrets) -> FacilitatorCredentials:
    """The facilitator credentials: None, the bearer key, or JWT auth (key id + secret)."""
    if conn.api_key_token is None:
        return None
    secret = vault.decrypt(conn.api_key_token, owner=conn.id, field=API_KEY)
    register_secret(secret)
    key_id = getattr(conn, "api_key_id", None)
    return CdpJwtAuth(key_id, secret) if key_id else secret


def webhook_secrets(vault: Vault, conn: Connection, now: datetime | None = None) -> list[str]:
    """Current secret first, then the previous one while its overlap window lasts."""
    now = now or datetime.now(UTC)
    out = [vault.decrypt(conn.webhook_secret_token, owner=conn.id, field=WEBHOOK_SECRET)]
    expires = conn.previous_webhook_secret_expires_at
    if conn.previous_webhook_secret_token and expires and expires > now:
        out.append(
            vault.decrypt(
                conn.previous_webhook_secret_token, owner=conn.id, field=PREVIOUS_WEBHOOK_SECRET
            )
        )
    for secret in out:
        register_secret(secret)
    return out
