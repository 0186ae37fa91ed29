"""The per-connection spending policy and its stateless rules.

Every refusal names the rule that refused (``max_per_payment``, ``payee_deny``, ``budget.day``…),
so a workflow can show the user exactly why a payment did not happen.

Budgets are **rolling windows** (the last 24 h, 7 days, 30 days), not calendar periods: a rolling
window cannot be drained twice around midnight, which is what an agent with a loop would do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_serializer,
    field_validator,
)

from connector.errors import PolicyRefused

BUDGET_WINDOWS: dict[str, timedelta] = {
    "day": timedelta(days=1),
    "week": timedelta(days=7),
    "month": timedelta(days=30),
}


_UINT = re.compile(r"^[0-9]{1,78}$")


def _int_or_none(value: object) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("amounts are integers in atomic units (send a decimal string)")
    if isinstance(value, int) and value < 0:
        raise ValueError("amounts cannot be negative")
    text = str(value)
    if not _UINT.match(text):  # never int()'s own message: it would leak Python internals
        raise ValueError("amounts are non-negative integers in atomic units (a decimal string)")
    number = int(text)
    if number >= 2**256:
        raise ValueError("amounts cannot exceed uint256 (2**256 - 1)")
    return number


#: Bounds of the policy's lists (each checked on every payment; stored with the connection).
MAX_POLICY_LIST = 1000
PolicyItem = Annotated[str, StringConstraints(min_length=1, max_length=256)]
PolicyList = Annotated[list[PolicyItem], Field(max_length=MAX_POLICY_LIST)]


class SpendingPolicy(BaseModel):
    """Stored as JSON on the connection; amounts are atomic units (decimal strings on the wire)."""

    model_config = ConfigDict(extra="forbid")

    max_per_payment: int | None = None
    budget_day: int | None = None
    budget_week: int | None = None
    budget_month: int | None = None
    budget_alert_ratio: float = Field(default=0.8, gt=0, le=1)
    allowed_networks: PolicyList = Field(default_factory=list)  # empty = any
    allowed_assets: PolicyList = Field(default_factory=list)  # empty = any
    payee_allow: PolicyList = Field(default_factory=list)
    payee_deny: PolicyList = Field(default_factory=list)
    domain_allow: PolicyList = Field(default_factory=list)
    domain_deny: PolicyList = Field(default_factory=list)
    approval_threshold: int | None = None  # amounts >= this wait for approval
    approvals_required: int = Field(default=1, ge=1, le=10)
    approval_ttl_hours: float = Field(default=24, gt=0, le=24 * 30)
    dry_run: bool = False

    @field_validator(
        "max_per_payment",
        "budget_day",
        "budget_week",
        "budget_month",
        "approval_threshold",
        mode="before",
    )
    @classmethod
    def _amounts(cls, value: object) -> int | None:
        return _int_or_none(value)

    @field_serializer(
        "max_per_payment",
        "budget_day",
        "budget_week",
        "budget_month",
        "approval_threshold",
        when_used="json",
    )
    def _amounts_as_strings(self, value: int | None) -> str | None:
        # Money is a decimal string on the wire: a JSON number above 2**53 loses digits in
        # JavaScript, which is what most workflow builders run.
        return None if value is None else str(value)

    @field_validator("payee_allow", "payee_deny", "allowed_assets")
    @classmethod
    def _lower_addresses(cls, value: list[str]) -> list[str]:
        return [v.lower() for v in value]

    @field_validator("domain_allow", "domain_deny")
    @classmethod
    def _lower_domains(cls, value: list[str]) -> list[str]:
        return [v.lower().strip(".") for v in value]

    def budget_limits(self) -> dict[str, int]:
        limits = {"day": self.budget_day, "week": self.budget_week, "month": self.budget_month}
        return {name: limit for name, limit in limits.items() if limit is not None}


@dataclass(frozen=True)
class Candidate:
    """What the policy is asked about: one prospective outgoing payment."""

    amount: int
    asset: str
    network: str
    payee: str
    url: str | None = None  # the URL that answered 402 (where the payment header would go)
    # URLs the request passed through before ``url`` (the one asked for, redirect hops): the
    # domain rules hold for each, so an allowed host cannot launder a payment to another one
    via: tuple[str, ...] = ()


def _domain_matches(host: str, patterns: list[str]) -> bool:
    return any(host == p or host.endswith("." + p) for p in patterns)


def check_static_rules(policy: SpendingPolicy, candidate: Candidate) -> None:
    """Raise :class:`PolicyRefused` naming the first rule the candidate breaks."""
    if policy.max_per_payment is not None and candidate.amount > policy.max_per_payment:
        raise PolicyRefused(
            f"amount {candidate.amount} exceeds max_per_payment {policy.max_per_payment}",
            rule="max_per_payment",
        )
    if policy.allowed_networks and candidate.network not in policy.allowed_networks:
        raise PolicyRefused(f"network {candidate.network} is not allowed", rule="allowed_networks")
    if policy.allowed_assets and candidate.asset.lower() not in policy.allowed_assets:
        raise PolicyRefused(f"asset {candidate.asset} is not allowed", rule="allowed_assets")
    payee = candidate.payee.lower()
    if payee in policy.payee_deny:
        raise PolicyRefused(f"payee {candidate.payee} is on the deny list", rule="payee_deny")
    if policy.payee_allow and payee not in policy.payee_allow:
        raise PolicyRefused(f"payee {candidate.payee} is not on the allow list", rule="payee_allow")
    urls = [*candidate.via, candidate.url] if candidate.url is not None else []
    for url in urls:
        host = (urlsplit(url).hostname or "").lower().strip(".")
        where = "" if url == candidate.url else " (on the way to the 402)"
        if _domain_matches(host, policy.domain_deny):
            raise PolicyRefused(f"domain {host}{where} is on the deny list", rule="domain_deny")
        if policy.domain_allow and not _domain_matches(host, policy.domain_allow):
            raise PolicyRefused(
                f"domain {host}{where} is not on the allow list", rule="domain_allow"
            )


def needs_approval(policy: SpendingPolicy, amount: int) -> bool:
    return policy.approval_threshold is not None and amount >= policy.approval_threshold
