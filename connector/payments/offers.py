"""Paywall offers served from memory.

A payment request's offer (price, asset, network, recipient, resource) never changes once created,
so its 402 answer is built once per process and kept: an unpaid hit is a dictionary lookup, no
database transaction, no connection read, no write (issue 13; before, each unpaid hit cost six
PostgreSQL transactions).

What *does* change is whether the request is still open:

* **expiry** is a deadline stored with the offer, checked on every hit (exact);
* **pay-out** (``paid_count`` reaching ``max_payments``) and **give-back** (a definite settlement
  failure frees the slot) are written by this process's paywall code, which updates the cached
  state from the ``RETURNING`` of its own conditional update (exact in this process);
* anything written by *another* process (another API replica paying the same request, a worker
  failing a settlement, an operator closing it) is picked up when the cached state is older than
  ``paywall_state_ttl_s`` (default 1 s): the next hit re-reads two columns. ``0`` re-reads on
  every hit.

The cached state only decides what an *unpaid* visitor sees (402 offer or 410 gone) and lets a
paid hit on a request known to be closed be refused before the facilitator is asked. It never
grants anything: a payment is accepted only by the conditional claim in the database
(``paid_count < max_payments``), so a stale cache cannot oversell.

The connection a paid hit needs (facilitator URL and API key) is cached the same way, for the same
TTL, so a rotated facilitator key applies to paywall hits within ``paywall_state_ttl_s``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import select
from sqlmodel import col

from connector.errors import NotFound
from connector.payments import escrow_operator
from connector.payments.context import ConnectionContext
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import PaymentRequest
from connector.x402 import auth_capture, codec
from connector.x402.requirement import Requirement

#: Offers kept per process (LRU). One offer is a few kilobytes with its prebuilt answer.
MAX_OFFERS = 10_000


@dataclass(frozen=True)
class Offer:
    """The immutable part of a payment request, with its unpaid 402 answer prebuilt."""

    request: PaymentRequest  # a detached snapshot; never written through
    requirement: Requirement
    url: str
    headers_402: dict[str, str]
    body_402: bytes  # the v1 JSON body, rendered once
    #: Further options after ``requirement`` (authCapture: the same terms under the name the
    #: official TypeScript client registers, ``auth-capture``).
    alternatives: tuple[Requirement, ...] = ()

    def requirement_for(self, scheme: str) -> Requirement:
        """The offered requirement a payer accepted by its scheme name (the first one when no
        option carries that name: the payment then fails the offer's own match)."""
        for option in (self.requirement, *self.alternatives):
            if option.scheme == scheme:
                return option
        return self.requirement

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def connection_id(self) -> str:
        return self.request.connection_id

    @property
    def expires_at(self) -> datetime | None:
        return self.request.expires_at


@dataclass(frozen=True)
class OfferState:
    """The mutable part: open or not, and how many payments it took."""

    status: str
    paid_count: int
    max_payments: int
    read_at: float  # time.monotonic() of the database read (or of our own write)
    #: Read from the database just now by this hit (as opposed to remembered).
    just_read: bool = False

    def closed_reason(self) -> str | None:
        if self.status != "open":
            return f"payment request is {self.status}"
        if self.paid_count >= self.max_payments:
            return "payment request already paid"
        return None


def paywall_url(rt: Runtime, request_id: str) -> str:
    return f"{rt.settings.public_base_url.rstrip('/')}/pay/{request_id}"


def requirement_of(rt: Runtime, request: PaymentRequest) -> Requirement:
    """The requirement a payment request's paywall offers: an ``exact`` transfer, or for an
    on-chain escrow request ``authCapture`` with its stored terms as ``extra`` (all absolute,
    fixed at creation, so the offer never changes)."""
    if request.scheme in auth_capture.SCHEME_ALIASES:
        scheme, extra = auth_capture.SCHEME, escrow_operator.requirement_extra(request)
    else:
        scheme, extra = "exact", {"name": request.token_name, "version": request.token_version}
    return Requirement(
        scheme=scheme,
        network=request.network,
        amount=request.amount,
        asset=request.asset,
        pay_to=request.pay_to,
        max_timeout_seconds=request.max_timeout_seconds,
        extra=extra,
        resource=paywall_url(rt, request.id),
        description=request.description,
        mime_type=request.mime_type,
    )


#: The scheme name ``@x402/evm``'s auth-capture client (2.27) registers under; offered as a
#: second, identical option so that client can pay without a rename (decision 0009).
TS_CLIENT_SCHEME = "auth-capture"


def build_offer(rt: Runtime, request: PaymentRequest) -> Offer:
    requirement = requirement_of(rt, request)
    alternatives: tuple[Requirement, ...] = ()
    if requirement.scheme == auth_capture.SCHEME:
        alternatives = (replace(requirement, scheme=TS_CLIENT_SCHEME),)
    url = paywall_url(rt, request.id)
    headers, body = codec.payment_required_response(
        requirement, url, request.description, None, request.protocols, alternatives
    )
    rendered = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return Offer(request, requirement, url, headers, rendered, alternatives)


class OfferCache:
    """Per-process cache of offers, their open/closed state and their connections."""

    def __init__(self, state_ttl_s: float, max_offers: int = MAX_OFFERS) -> None:
        self.state_ttl_s = state_ttl_s
        self.max_offers = max_offers
        self._lock = threading.Lock()
        self._offers: OrderedDict[str, Offer] = OrderedDict()
        self._states: dict[str, OfferState] = {}
        self._connections: dict[str, tuple[float, ConnectionContext]] = {}

    # -- offers --------------------------------------------------------------------------

    def cached(self, request_id: str) -> Offer | None:
        """The offer if this process has it, without touching the database."""
        return self._offers.get(request_id)

    def offer(
        self, rt: Runtime, request_id: str, *, refresh: bool = False
    ) -> tuple[Offer, OfferState]:
        """The offer and a state no older than the TTL (or just read, with ``refresh``)."""
        offer = self._offers.get(request_id)
        state = self._states.get(request_id)
        if offer is not None and state is not None and not refresh and self.fresh(state):
            return offer, state
        with UnitOfWork(rt.engine) as uow:
            if offer is None:
                request = uow.session.get(PaymentRequest, request_id)
                if request is None:
                    raise NotFound(f"payment request {request_id} not found")
                uow.session.expunge(request)
                offer = build_offer(rt, request)
                status, paid = request.status, request.paid_count
                max_payments = request.max_payments
            else:
                row = uow.session.execute(
                    select(
                        col(PaymentRequest.status),
                        col(PaymentRequest.paid_count),
                        col(PaymentRequest.max_payments),
                    ).where(col(PaymentRequest.id) == request_id)
                ).one_or_none()
                if row is None:  # deleted underneath us
                    self.forget(request_id)
                    raise NotFound(f"payment request {request_id} not found")
                status, paid, max_payments = row
        read_at = time.monotonic()
        with self._lock:
            self._offers[request_id] = offer
            self._offers.move_to_end(request_id)
            self._states[request_id] = OfferState(status, paid, max_payments, read_at)
            while len(self._offers) > self.max_offers:
                old, _ = self._offers.popitem(last=False)
                self._states.pop(old, None)
        return offer, OfferState(status, paid, max_payments, read_at, just_read=True)

    @staticmethod
    def fresh_from_db(state: OfferState) -> bool:
        return state.just_read

    def forget_state(self, request_id: str) -> None:
        """Drop the remembered state (the next hit reads the row), e.g. after a give-back."""
        with self._lock:
            self._states.pop(request_id, None)

    def fresh(self, state: OfferState) -> bool:
        return time.monotonic() - state.read_at < self.state_ttl_s

    def state(self, request_id: str) -> OfferState | None:
        """The cached state if it is fresh enough to answer from, else None."""
        state = self._states.get(request_id)
        if state is not None and self.fresh(state):
            return state
        return None

    def note(self, request_id: str, status: str, paid_count: int, max_payments: int) -> None:
        """Record a state this process just wrote (from the UPDATE's RETURNING)."""
        with self._lock:
            if request_id in self._offers:
                self._states[request_id] = OfferState(
                    status, paid_count, max_payments, time.monotonic()
                )

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._offers.pop(request_id, None)
            self._states.pop(request_id, None)

    # -- connections ---------------------------------------------------------------------

    def connection(
        self, connection_id: str, load: Callable[[], ConnectionContext]
    ) -> ConnectionContext:
        hit = self._connections.get(connection_id)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self.state_ttl_s:
            return hit[1]
        ctx = load()
        with self._lock:
            if len(self._connections) >= self.max_offers:
                self._connections.clear()
            self._connections[connection_id] = (now, ctx)
        return ctx


def cache_for(rt: Runtime) -> OfferCache:
    cache: OfferCache = rt._cached(
        ("paywall_offers",), lambda: OfferCache(rt.settings.paywall_state_ttl_s)
    )
    return cache


__all__ = ["Offer", "OfferCache", "OfferState", "build_offer", "cache_for", "paywall_url"]
