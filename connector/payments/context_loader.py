"""Build a :class:`ConnectionContext` from the stored connection (secrets stay lazy)."""

from __future__ import annotations

from sqlmodel import Session

from connector.connections import service as connections
from connector.facilitator.auth import FacilitatorCredentials
from connector.payments.context import ConnectionContext
from connector.policy.rules import SpendingPolicy
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.x402.exact_evm import SigningKey


def load_connection(
    rt: Runtime, connection_id: str, session: Session | None = None
) -> ConnectionContext:
    """Read the connection (in ``session`` when the caller has a transaction open anyway)."""
    if session is not None:
        conn = connections.get_for_payment(session, connection_id)
    else:
        with UnitOfWork(rt.engine) as uow:
            conn = connections.get_for_payment(uow.session, connection_id)
    vault = rt.vault

    def account() -> SigningKey:
        return connections.signing_account(vault, conn)

    def archived(address: str) -> SigningKey | None:
        return connections.archived_signing_account(rt.engine, vault, conn.id, address)

    def api_key() -> FacilitatorCredentials:
        return connections.api_key(vault, conn)

    return ConnectionContext(
        id=conn.id,
        network=conn.network,
        rpc_url=conn.rpc_url,
        facilitator_url=conn.facilitator_url,
        wallet_address=conn.wallet_address,
        capture_default=conn.capture_default,
        policy=SpendingPolicy.model_validate(conn.policy or {}),
        _account=account,
        _api_key=api_key,
        extra={"asset": conn.asset},
        pay_to=conn.pay_to,
        _archived=archived,
    )
