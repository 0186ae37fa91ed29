"""Master-key rotation: re-wrap every stored secret under the active key, row by row.

Each row is re-wrapped in its own short transaction, so rotation runs while the service serves
traffic; a row changed concurrently is simply re-read on the next pass. Afterwards
:func:`keys_in_use` must no longer list the old key id before it is removed from configuration.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel, col

from connector.storage.db import UnitOfWork
from connector.storage.models.connections import Connection, WalletKey
from connector.storage.models.events import Subscription
from connector.vault.envelope import Vault

#: (table model, {column: vault field name}). Every vault token in the database is listed here.
SECRET_COLUMNS: list[tuple[type[SQLModel], dict[str, str]]] = [
    (
        Connection,
        {
            "api_key_token": "api_key",
            "webhook_secret_token": "webhook_secret",
            "previous_webhook_secret_token": "previous_webhook_secret",
            "wallet_key_token": "wallet_key",
        },
    ),
    (WalletKey, {"key_token": "key"}),
    (Subscription, {"secret_token": "secret", "previous_secret_token": "previous_secret"}),
]


@dataclass
class RotationReport:
    rewrapped: int = 0
    already_current: int = 0
    failed: list[str] = field(default_factory=list)


def keys_in_use(engine: Engine) -> Counter[str]:
    counts: Counter[str] = Counter()
    with UnitOfWork(engine) as uow:
        for model, columns in SECRET_COLUMNS:
            for row in uow.session.execute(select(model)).scalars():
                for column in columns:
                    token = getattr(row, column)
                    if token:
                        counts[Vault.key_id_of(token)] += 1
    return counts


def rewrap_all(engine: Engine, vault: Vault, batch: int = 200) -> RotationReport:
    report = RotationReport()
    active = vault.ring.active.kid
    for model, columns in SECRET_COLUMNS:
        pk = col(model.id)  # type: ignore[attr-defined]
        last = ""
        while True:
            with UnitOfWork(engine) as uow:
                ids = list(
                    uow.session.execute(
                        select(pk).where(pk > last).order_by(pk).limit(batch)
                    ).scalars()
                )
            if not ids:
                break
            last = ids[-1]
            for row_id in ids:
                with UnitOfWork(engine) as uow:
                    row = uow.session.get(model, row_id)
                    if row is None:
                        continue
                    changed = False
                    for column, field_name in columns.items():
                        token = getattr(row, column)
                        if not token:
                            continue
                        if Vault.key_id_of(token) == active:
                            report.already_current += 1
                            continue
                        try:
                            setattr(
                                row, column, vault.rewrap(token, owner=row_id, field=field_name)
                            )
                        except Exception as exc:  # report and continue: one bad row must not stop
                            report.failed.append(f"{row_id}.{column}: {exc}")
                            continue
                        report.rewrapped += 1
                        changed = True
                    if changed:
                        uow.session.add(row)
                        uow.commit()
    return report
