"""On-chain escrow (``authCapture``) for incoming payments: the paywall's offer and collection, and
``release`` / ``void`` / ``refund`` as escrow ``capture`` / ``void`` / ``refund``.

The connector never holds the money: the escrow contract does, and only its operator (the
facilitator's signer, ``extra.captureAuthorizer``) can move it, only to the receiver and the fee
receiver the payer signed for, or back to the payer. Every operation goes to the facilitator as an
``authCapture`` payload (``type`` authorize/charge/capture/void/refund) and ends the same way:
the escrow events of its transaction are applied with
:func:`~connector.payments.escrow_ledger.apply_escrow_events`, the one place that moves an escrow
payment from chain evidence. Nothing here decides a payment's state from a facilitator's word.

Unknown outcomes stay unknown. A collection whose transaction has no receipt keeps the payment in
``settling`` (and the paywall its claim); an operation whose transaction has no receipt stays
``pending`` in the payment's ledger and the action raises
:class:`~connector.errors.SettlementPending`, so its job is retried. A retry never sends an
operation twice when its transaction is known: it reads the receipt. When the facilitator did not
answer at all, the retry first replays the payment's escrow history and sends again only if the
operation left no trace.

Operations on one payment are serialized through the ledger (``escrow.ops``): an operation is
recorded before it is sent, under the payment's optimistic lock, and a second one waits
(:class:`EscrowBusy`, retried) until the first has an outcome.

Outcomes count only with the network's confirmations (``X402C_NETWORK_CONFIRMATIONS``, 1 on the
dev chain): a transaction mined but not deep enough — collection, capture, void or refund,
succeeded or reverted — is still pending (the paywall asks the payer to retry, an operation
raises :class:`~connector.errors.SettlementPending`). An operation whose answer was lost and
whose history shows escrow operations not confirmed yet is pending too, never sent again: it may
be one of them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from eth_utils.address import to_checksum_address
from sqlmodel import Session

from connector.actions.schemas import ReceiveInput
from connector.chain.auth_capture import EscrowSnapshot
from connector.chain.client import ChainClient
from connector.errors import (
    ConcurrentUpdate,
    Conflict,
    EscrowRefused,
    ExternalServiceError,
    NotFound,
    SettlementPending,
    ValidationFailed,
)
from connector.facilitator.client import FacilitatorError
from connector.ids import new_id
from connector.logs import get_logger
from connector.payments import escrow_sync
from connector.payments.context import ConnectionContext
from connector.payments.escrow_ledger import apply_escrow_events, totals_of
from connector.payments.machine import update_fields
from connector.payments.onchain import SETTLEMENT_PENDING, outcome
from connector.payments.states import PaymentState
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment, PaymentRequest, Refund
from connector.x402 import auth_capture as ac
from connector.x402.networks import chain_id_of
from connector.x402.requirement import Requirement, requirement_from_wire

log = get_logger(__name__)
S = PaymentState
T = TypeVar("T")

#: How long an answer of the facilitator's ``/supported`` and a look for escrow code are reused.
AVAILABILITY_TTL_S = 60.0
#: An operation recorded as being sent but without any transaction for this long is settled from
#: the escrow's history by whoever comes next (its own job gave up or crashed).
STALE_OPERATION_S = 600
#: Finished operations kept in the ledger (the escrow events stay complete regardless).
KEEP_OPERATIONS = 20
IN_FLIGHT = ("sending", "pending")


def _now() -> int:
    """The connector's clock for escrow deadlines (Unix seconds; a seam for tests)."""
    return int(time.time())


def is_escrow(payment: Payment) -> bool:
    return payment.scheme in ac.SCHEME_ALIASES


# --------------------------------------------------------------------------------- errors


class EscrowUnavailable(Conflict):
    """``authCapture`` asked for where it cannot run (no escrow code, or a facilitator that does
    not operate it)."""

    code = "escrow_unavailable"
    title = "On-chain escrow is not available here"


class CaptureDeadlinePassed(EscrowRefused):
    code = "capture_deadline_expired"
    title = "The capture deadline has passed"


class RefundDeadlinePassed(EscrowRefused):
    code = "refund_deadline_expired"
    title = "The refund deadline has passed"


class EscrowOperationFailed(Conflict):
    """The facilitator or the chain definitely refused the operation (nothing moved)."""

    code = "escrow_operation_failed"
    title = "The escrow operation failed"


class EscrowBusy(ExternalServiceError):
    """Another operation on the same payment is in flight: this one runs after it (retried)."""

    code = "escrow_operation_in_flight"
    status = 409
    title = "Another escrow operation on this payment is in flight"


# --------------------------------------------------------------------------------- availability

_cache_lock = threading.Lock()
_cache: dict[tuple[str, ...], tuple[float, Any]] = {}


def _cached(key: tuple[str, ...], build: Callable[[], T]) -> T:
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is not None and now - hit[0] < AVAILABILITY_TTL_S:
        value: T = hit[1]
        return value
    value = build()
    with _cache_lock:
        if len(_cache) > 1_000:
            _cache.clear()
        _cache[key] = (now, value)
    return value


def escrow_code_present(chain: ChainClient, deployment: ac.Deployment) -> bool:
    """Code at the escrow and both collectors it needs here (an empty address would "succeed")."""
    for address in (
        deployment.escrow,
        deployment.eip3009_collector,
        deployment.operator_refund_collector,
    ):
        if len(chain.rpc("eth_getCode", [address, "latest"]) or "0x") <= 2:
            return False
    return True


@dataclass(frozen=True)
class FacilitatorEscrow:
    supports: bool  # advertises authCapture (v2) on the network
    signers: tuple[str, ...]  # its signing addresses for the network (the operator candidates)


def facilitator_escrow(rt: Runtime, ctx: ConnectionContext, network: str) -> FacilitatorEscrow:
    """What the connection's facilitator says about ``authCapture`` on ``network`` (cached)."""

    def ask() -> FacilitatorEscrow:
        answer = rt.facilitator(ctx.facilitator_url, ctx.api_key()).supported()
        supports = any(
            isinstance(k, dict)
            and k.get("scheme") in ac.SCHEME_ALIASES
            and k.get("network") == network
            and k.get("x402Version") == 2
            for k in answer.get("kinds") or []
        )
        raw = answer.get("signers") if isinstance(answer.get("signers"), dict) else {}
        family = network.split(":")[0] + ":*"
        found: list[str] = []
        for key in (network, family):
            for address in (raw or {}).get(key) or []:
                if isinstance(address, str) and len(address) == 42 and address not in found:
                    found.append(address)
        return FacilitatorEscrow(supports, tuple(found))

    return _cached(("facilitator", ctx.facilitator_url, network), ask)


def _code_here(rt: Runtime, ctx: ConnectionContext) -> bool:
    return _cached(
        ("code", ctx.rpc_url),
        lambda: escrow_code_present(rt.chain(ctx.rpc_url), ac.DEFAULT_DEPLOYMENT),
    )


def choose_scheme(
    rt: Runtime, ctx: ConnectionContext, inp: ReceiveInput, network: str, capture: str
) -> str:
    """The scheme a new paywall offers: what was asked for, else on-chain escrow for a manual
    capture wherever it can run (its contracts have code here and the facilitator operates them),
    else ``exact``. Asking for ``authCapture`` where it cannot run is refused (409)."""
    if inp.scheme == "exact":
        return "exact"
    asked = inp.scheme == "authCapture" or inp.escrow_terms_given
    if not asked and (capture != "manual" or inp.custodial):
        return "exact"
    if network != ctx.network:
        if asked:
            raise EscrowUnavailable(
                f"authCapture is offered on the connection's network ({ctx.network}) only",
                field="network",
            )
        return "exact"
    if not _code_here(rt, ctx):
        if asked:
            raise EscrowUnavailable(
                f"no AuthCaptureEscrow contract on {network} (at {ac.DEFAULT_DEPLOYMENT.escrow})",
                field="scheme",
            )
        return "exact"
    if not facilitator_escrow(rt, ctx, network).supports:
        if asked:
            raise EscrowUnavailable(
                f"the connection's facilitator does not support authCapture on {network}",
                field="scheme",
            )
        return "exact"
    return ac.SCHEME


def offer_terms(
    rt: Runtime, ctx: ConnectionContext, inp: ReceiveInput, network: str, now: datetime
) -> dict[str, Any]:
    """The escrow terms a new ``authCapture`` paywall commits every payer to (absolute deadlines,
    computed now, so the offer never changes)."""
    operator = inp.operator
    if operator is None:
        signers = facilitator_escrow(rt, ctx, network).signers
        if not signers:
            raise EscrowUnavailable(
                "the facilitator names no signer to operate the escrow; give `operator`",
                field="operator",
            )
        operator = signers[0]
    start = int(now.timestamp())
    return {
        "operator": str(to_checksum_address(operator)),
        "capture_deadline": start + inp.capture_window_s(),
        "refund_deadline": start + inp.refund_window_s(),
        "min_fee_bps": inp.min_fee_bps,
        "max_fee_bps": inp.max_fee_bps,
        "fee_receiver": str(to_checksum_address(inp.fee_receiver or ac.ZERO_ADDRESS)),
        "escrow": ac.DEFAULT_DEPLOYMENT.escrow,
    }


def requirement_extra(request: PaymentRequest) -> dict[str, Any]:
    """The ``extra`` of a paywall's ``authCapture`` requirement, from its stored terms."""
    terms = request.escrow_terms or {}
    deployment = ac.resolve_deployment(terms.get("escrow")) or ac.DEFAULT_DEPLOYMENT
    return ac.build_extra(
        token_name=request.token_name,
        token_version=request.token_version,
        capture_authorizer=str(terms["operator"]),
        capture_deadline=int(terms["capture_deadline"]),
        refund_deadline=int(terms["refund_deadline"]),
        fee_recipient=str(terms.get("fee_receiver") or ac.ZERO_ADDRESS),
        min_fee_bps=int(terms.get("min_fee_bps", 0)),
        max_fee_bps=int(terms.get("max_fee_bps", 0)),
        deployment=deployment,
        auto_capture=request.capture == "automatic",
    )


# --------------------------------------------------------------------------------- terms


@dataclass(frozen=True)
class Terms:
    """Everything needed to operate one payment's escrow."""

    wire: dict[str, Any]  # the requirement as the payer accepted it (sent back to the facilitator)
    requirement: Requirement
    extra: ac.AuthCaptureExtra
    info: ac.PaymentInfo

    @property
    def deployment(self) -> ac.Deployment:
        return self.extra.deployment

    @property
    def payment_hash(self) -> str:
        digest = ac.payment_info_hash(
            self.info, chain_id=chain_id_of(self.requirement.network), escrow=self.deployment.escrow
        )
        return "0x" + digest.hex()


def terms_of(payment: Payment) -> Terms:
    """The payment's escrow terms, rebuilt from its requirement and the payer's signed
    authorization and salt (exactly as the facilitator rebuilds them)."""
    if not is_escrow(payment) or payment.requirement is None or payment.signed_payload is None:
        raise Conflict(f"payment {payment.id} is not an on-chain escrow payment")
    requirement = requirement_from_wire(payment.requirement, 2)
    extra = ac.parse_extra(requirement.extra)
    client = ac.parse_client_payload(payment.signed_payload.get("payload"))
    info = ac.terms_for(
        requirement,
        extra,
        payer=client.authorization.from_,
        salt=client.salt,
        pre_approval_expiry=client.authorization.valid_before,
    )
    return Terms(payment.requirement, requirement, extra, info)


def collection_payload(wire: dict[str, Any], requirement: Requirement) -> dict[str, Any]:
    """The payer's payment as the facilitator's collection request: ``authorize`` (hold) or,
    for an ``autoCapture`` offer, ``charge`` of the whole amount with the minimum fee."""
    inner = dict(wire.get("payload") or {})
    if requirement.extra.get("autoCapture") is True:
        inner["type"] = "charge"
        inner["capture"] = {
            "amount": str(requirement.amount),
            "feeBps": int(requirement.extra.get("minFeeBps", 0)),
            "feeRecipient": requirement.extra.get("feeRecipient", ac.ZERO_ADDRESS),
        }
    else:
        inner["type"] = "authorize"
    return {**wire, "payload": inner}


def _operation_payload(terms: Terms, inner: dict[str, Any]) -> dict[str, Any]:
    return {"x402Version": 2, "accepted": terms.wire, "payload": inner}


# --------------------------------------------------------------------------------- chain evidence


@dataclass(frozen=True)
class Mined:
    """A transaction's fate: ``None`` status means no receipt yet (unknown)."""

    status: int | None
    events: list[ac.EscrowEvent]
    block: int | None = None  # the block it was mined in


def _events_in(logs: list[dict[str, Any]], terms: Terms) -> list[ac.EscrowEvent]:
    escrow, topic = terms.deployment.escrow.lower(), terms.payment_hash.lower()
    found: list[ac.EscrowEvent] = []
    for raw in logs:
        topics = [str(t).lower() for t in raw.get("topics") or []]
        if str(raw.get("address", "")).lower() != escrow or len(topics) < 2 or topics[1] != topic:
            continue
        event = ac.decode_escrow_log(raw)
        if event is not None:
            found.append(event)
    return found


def read_transaction(chain: ChainClient, tx_hash: str, terms: Terms) -> Mined:
    """The escrow events of one transaction of this payment (raises ExternalServiceError when
    the chain cannot be read: unknown)."""
    receipt = chain.get_receipt(tx_hash)
    if receipt is None:
        return Mined(None, [])
    events = _events_in(receipt.logs, terms) if receipt.status == 1 else []
    return Mined(receipt.status, events, receipt.block_number)


def _read(rt: Runtime, chain: ChainClient, payment: Payment) -> EscrowSnapshot:
    """The payment's escrow history since the last read, as of the newest block deep enough to
    count (raises ExternalServiceError when the chain cannot be read)."""
    return escrow_sync.read(chain, payment, depth=escrow_sync.confirmations(rt, payment))


def _confirmed_block(rt: Runtime, chain: ChainClient, payment: Payment) -> int | None:
    """The newest block whose events count now (None: every mined one, no read needed)."""
    return escrow_sync.confirmed_block(chain, escrow_sync.confirmations(rt, payment))


def _in_session(rt: Runtime, payment_id: str, work: Callable[[Session, Payment], T]) -> T:
    """Run ``work`` on the freshly read payment in one transaction; on a lost race re-read and run
    it again (the ledger skips what another writer already applied)."""
    for attempt in range(3):
        with UnitOfWork(rt.engine) as uow:
            payment = uow.session.get(Payment, payment_id, populate_existing=True)
            if payment is None:
                raise NotFound(f"payment {payment_id} not found")
            try:
                result = work(uow.session, payment)
            except ConcurrentUpdate:
                uow.rollback()
                if attempt == 2:
                    raise
                continue
            uow.commit()
            return result
    raise AssertionError("unreachable")


def apply_events(
    rt: Runtime,
    payment_id: str,
    events: list[ac.EscrowEvent],
    *,
    confirmed_through: int | None,
    scan: EscrowSnapshot | None = None,
) -> Payment:
    """Apply the events that count (see :func:`apply_escrow_events`); ``scan``: the history
    read they come from, whose progress is remembered."""

    def work(session: Session, payment: Payment) -> Payment:
        changed = apply_escrow_events(session, payment, events, confirmed_through=confirmed_through)
        if scan is not None:
            escrow_sync.remember_scan(rt, session, payment, scan, changed)
        return payment

    return _in_session(rt, payment_id, work)


def _apply_collection(
    rt: Runtime,
    payment_id: str,
    events: list[ac.EscrowEvent],
    confirmed_through: int | None,
    tx_hash: str | None,
    scan: EscrowSnapshot | None = None,
) -> Payment:
    """Apply a collection's events that count. One mined but not deep enough yet leaves the
    payment ``settling`` with its transaction remembered: the next attempt (the payer asking
    again, a job retry, the reconciler) reads that receipt again, never sends it again."""
    payment = apply_events(rt, payment_id, events, confirmed_through=confirmed_through, scan=scan)
    if payment.state == S.SETTLING.value:
        return _remember_tx(rt, payment_id, tx_hash)
    return payment


# --------------------------------------------------------------------------------- collection


def collect(rt: Runtime, ctx: ConnectionContext, payment: Payment) -> Payment:
    """Take an escrow payment in ``settling`` as far as the chain allows: authorize (hold) or
    charge through the facilitator, then apply the escrow events of that transaction.

    Collecting is idempotent by construction (the payer's ERC-3009 nonce and the escrow's
    ``PaymentAlreadyCollected``), so a retry may send again when no transaction is known; a
    known transaction is read first. A definite refusal fails the payment and gives its paywall
    slot back; anything else unknown leaves it ``settling`` with what is known.
    """
    if payment.state != S.SETTLING.value:
        return payment
    terms = terms_of(payment)
    chain = rt.chain(ctx.rpc_url)
    if payment.tx_hash:
        try:
            mined = read_transaction(chain, payment.tx_hash, terms)
            through = _confirmed_block(rt, chain, payment)
        except ExternalServiceError:
            return payment
        if mined.status == 1 and mined.events:
            return _apply_collection(rt, payment.id, mined.events, through, payment.tx_hash)
        if mined.status is None:
            return payment
    facilitator = rt.facilitator(ctx.facilitator_url, ctx.api_key())
    body = collection_payload(payment.signed_payload or {}, terms.requirement)
    try:
        answer = facilitator.settle(body, terms.wire)
    except FacilitatorError as exc:
        status = exc.context.get("status_code")
        if not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)):
            log.warning("escrow collection outcome unknown", extra={"payment_id": payment.id})
            return payment
        answer = {"success": False, "errorReason": exc.detail}
    tx_hash = str(answer.get("transaction") or "") or None
    reason = str(answer.get("errorReason") or "facilitator refused")
    if answer.get("success") and tx_hash:
        try:
            mined = read_transaction(chain, tx_hash, terms)
            through = _confirmed_block(rt, chain, payment)
        except ExternalServiceError:
            mined, through = Mined(None, []), None
        if mined.status == 1 and mined.events:
            return _apply_collection(rt, payment.id, mined.events, through, tx_hash)
        return _remember_tx(rt, payment.id, tx_hash)
    verdict = outcome(rt, ctx, payment, tx_hash, pending=reason == SETTLEMENT_PENDING)
    if verdict.settled:  # the payer's authorization is used: the escrow collected it
        try:
            snapshot: EscrowSnapshot | None = _read(rt, chain, payment)
        except ExternalServiceError:
            snapshot = None
        if snapshot is not None and snapshot.events:
            return _apply_collection(
                rt, payment.id, snapshot.events, snapshot.block, verdict.tx_hash, snapshot
            )
        return _remember_tx(rt, payment.id, verdict.tx_hash)
    if verdict.unknown:
        log.warning("escrow collection pending", extra={"payment_id": payment.id})
        return _remember_tx(rt, payment.id, verdict.tx_hash)
    return _fail_collection(rt, payment.id, reason)


def _remember_tx(rt: Runtime, payment_id: str, tx_hash: str | None) -> Payment:
    def work(session: Session, payment: Payment) -> Payment:
        if tx_hash and payment.tx_hash != tx_hash and payment.state == S.SETTLING.value:
            update_fields(session, payment, tx_hash=tx_hash)
        return payment

    return _in_session(rt, payment_id, work)


def _fail_collection(rt: Runtime, payment_id: str, reason: str) -> Payment:
    from connector.payments import offers
    from connector.payments.receive import end_unmoved

    def work(session: Session, payment: Payment) -> Payment:
        if payment.state != S.SETTLING.value:
            return payment  # decided by someone else meanwhile
        return end_unmoved(
            session,
            payment,
            S.FAILED,
            failure_code="settlement_failed",
            failure_reason=reason[:1000],
        )

    payment = _in_session(rt, payment_id, work)
    if payment.payment_request_id and payment.state == S.FAILED.value:
        offers.cache_for(rt).forget_state(payment.payment_request_id)
    return payment


# --------------------------------------------------------------------------------- operations


def operations(payment: Payment) -> list[dict[str, Any]]:
    return [dict(op) for op in (payment.escrow or {}).get("ops") or []]


def _find(payment: Payment, key: str) -> dict[str, Any] | None:
    return next((op for op in operations(payment) if op.get("key") == key), None)


def _store_op(session: Session, payment: Payment, op: dict[str, Any]) -> None:
    """Insert or replace ``op`` (by key) in the payment's ledger, under its optimistic lock."""
    ops = [o for o in operations(payment) if o.get("key") != op["key"]] + [op]
    finished = [o for o in ops if o.get("status") not in IN_FLIGHT]
    drop = {id(o) for o in finished[: max(0, len(finished) - KEEP_OPERATIONS)]}
    ledger = dict(payment.escrow or {})
    ledger["ops"] = [o for o in ops if id(o) not in drop]
    update_fields(session, payment, escrow=ledger)


_TOTAL_OF = {"capture": "captured", "void": "voided", "refund": "refunded"}


def _moved(payment: Payment, op: dict[str, Any]) -> bool:
    """Whether the ledger shows ``op`` happened (its total grew past what it was at planning)."""
    total = int(getattr(totals_of(payment), _TOTAL_OF[op["type"]]))
    before = int(op.get("before", 0))
    return total > before if op["type"] == "void" else total >= before + int(op["amount"])


@dataclass(frozen=True)
class Planned:
    payment: Payment
    op: dict[str, Any]
    refund: Refund | None = None


def _check_payment(rt: Runtime, ctx: ConnectionContext, payment_id: str) -> Payment:
    with UnitOfWork(rt.engine) as uow:
        payment = uow.session.get(Payment, payment_id)
    if payment is None or payment.connection_id != ctx.id:
        raise NotFound(f"payment {payment_id} not found")
    if payment.direction != "incoming":
        raise Conflict(
            f"payment {payment_id} is outgoing: only its escrow operator's side can "
            "capture, void or refund it",
            payment_id=payment_id,
        )
    if payment.state == S.SETTLING.value:
        payment = collect(rt, ctx, payment)
        if payment.state == S.SETTLING.value:
            raise SettlementPending(
                f"payment {payment_id} is not in the escrow yet (collection pending)",
                payment_id=payment_id,
            )
    return payment


def operate(
    rt: Runtime,
    ctx: ConnectionContext,
    payment_id: str,
    kind: str,
    *,
    key: str,
    amount: int | None = None,
    fee_bps: int | None = None,
    reason: str | None = None,
) -> tuple[Payment, Refund | None]:
    """Run one escrow operation (``capture``, ``void`` or ``refund``) for ``key`` (the job's
    idempotency key): plan it (refusing what the escrow would refuse, before anything is sent),
    send it through the facilitator, apply its escrow events. Safe to call again with the same
    key: it resumes, never repeats a sent operation."""
    for attempt in range(3):
        payment = _check_payment(rt, ctx, payment_id)
        if _find(payment, key) is not None:
            break
        payment = _settle_others(rt, ctx, payment, key)
        try:
            _plan(rt, payment, kind, key, amount, fee_bps, reason)
            break
        except ConcurrentUpdate:  # the payment moved while we checked: check again
            if attempt == 2:
                raise
    return _drive(rt, ctx, payment_id, key)


def _settle_others(rt: Runtime, ctx: ConnectionContext, payment: Payment, key: str) -> Payment:
    """Resolve operations of other callers still in flight (by their receipts, or from the
    history once stale); raise :class:`EscrowBusy` while one stays undecided."""
    for op in operations(payment):
        if op.get("key") == key or op.get("status") not in IN_FLIGHT:
            continue
        with contextlib.suppress(SettlementPending, EscrowOperationFailed, EscrowBusy):
            _drive(rt, ctx, payment.id, str(op["key"]), resume_only=True)
    with UnitOfWork(rt.engine) as uow:
        fresh = uow.session.get(Payment, payment.id)
    assert fresh is not None
    busy = [o for o in operations(fresh) if o.get("status") in IN_FLIGHT and o.get("key") != key]
    if busy:
        raise EscrowBusy(
            f"escrow {busy[0]['type']} on payment {payment.id} is still in flight; this "
            "operation runs after it",
            payment_id=payment.id,
        )
    return fresh


def _plan(
    rt: Runtime,
    payment: Payment,
    kind: str,
    key: str,
    amount: int | None,
    fee_bps: int | None,
    reason: str | None,
) -> Planned:
    terms = terms_of(payment)
    totals = totals_of(payment)
    extra = terms.extra
    now = _now()
    op: dict[str, Any] = {"key": key, "type": kind, "status": "sending", "tx_hash": None}
    if kind == "capture":
        if extra.capture_deadline <= now + ac.SETTLEMENT_MARGIN_S:
            raise CaptureDeadlinePassed(
                f"payment {payment.id}: the capture deadline "
                f"({_iso(extra.capture_deadline)}) has passed; what is still held can only be "
                "voided or reclaimed by the payer",
                payment_id=payment.id,
            )
        if totals.held <= 0:
            raise EscrowRefused(
                f"payment {payment.id} holds nothing to capture", payment_id=payment.id
            )
        value = totals.held if amount is None else amount
        if value <= 0 or value > totals.held:
            raise EscrowRefused(
                f"capture of {value} exceeds the {totals.held} still held for payment {payment.id}",
                payment_id=payment.id,
                field="amount",
            )
        bps = extra.min_fee_bps if fee_bps is None else fee_bps
        if not extra.min_fee_bps <= bps <= extra.max_fee_bps:
            raise ValidationFailed(
                f"fee_bps {bps} is outside the payer's signed bounds "
                f"[{extra.min_fee_bps}, {extra.max_fee_bps}]",
                field="fee_bps",
            )
        op.update(amount=str(value), fee_bps=bps, fee_receiver=extra.fee_recipient)
        op["before"] = str(totals.captured)
    elif kind == "void":
        if totals.held <= 0:
            raise EscrowRefused(
                f"payment {payment.id} holds nothing to void", payment_id=payment.id
            )
        op.update(amount=str(totals.held), before=str(totals.voided))
    elif kind == "refund":
        if extra.refund_deadline <= now + ac.SETTLEMENT_MARGIN_S:
            raise RefundDeadlinePassed(
                f"payment {payment.id}: the refund deadline ({_iso(extra.refund_deadline)}) "
                "has passed; the escrow refuses any refund, nothing was sent",
                payment_id=payment.id,
            )
        refundable = totals.refundable
        if refundable <= 0:
            raise EscrowRefused(
                f"payment {payment.id} has nothing captured left to refund",
                payment_id=payment.id,
            )
        value = refundable if amount is None else amount
        if value <= 0 or value > refundable:
            raise ValidationFailed(
                f"refund of {value} exceeds the {refundable} captured and not yet refunded",
                field="amount",
            )
        op.update(amount=str(value), before=str(totals.refunded))
    else:
        raise ValueError(f"unknown escrow operation {kind}")
    op["at"] = now

    def work(session: Session, current: Payment) -> Planned:
        if current.version != payment.version:  # something moved since we checked: re-plan
            raise ConcurrentUpdate(f"payment {payment.id} changed", payment_id=payment.id)
        row: Refund | None = None
        if kind == "refund":
            row = Refund(
                id=new_id("ref"),
                payment_id=payment.id,
                amount=int(op["amount"]),
                state="pending",
                idempotency_key=key,
                reason=reason,
                signed_payload={"escrow": {"type": "refund", "amount": op["amount"]}},
            )
            session.add(row)
            session.flush()
            op["refund_id"] = row.id
        _store_op(session, current, op)
        return Planned(current, op, row)

    return _in_session_once(rt, payment.id, work)


def _in_session_once(rt: Runtime, payment_id: str, work: Callable[[Session, Payment], T]) -> T:
    """Like :func:`_in_session` but a lost race is raised (the caller's checks are stale)."""
    with UnitOfWork(rt.engine) as uow:
        payment = uow.session.get(Payment, payment_id, populate_existing=True)
        if payment is None:
            raise NotFound(f"payment {payment_id} not found")
        result = work(uow.session, payment)
        uow.commit()
        return result


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _inner(terms: Terms, op: dict[str, Any]) -> dict[str, Any]:
    inner: dict[str, Any] = {"type": op["type"], "paymentInfo": terms.info.to_wire()}
    if op["type"] in ("capture", "refund"):
        inner["amount"] = str(op["amount"])
    if op["type"] == "capture":
        inner["feeBps"] = int(op.get("fee_bps", 0))
        inner["feeRecipient"] = op.get("fee_receiver") or ac.ZERO_ADDRESS
    return inner


def _drive(
    rt: Runtime, ctx: ConnectionContext, payment_id: str, key: str, *, resume_only: bool = False
) -> tuple[Payment, Refund | None]:
    """Take the operation ``key`` to its outcome. ``resume_only``: never send (another caller's
    operation: only its known transaction, or once stale its history, may decide it)."""
    with UnitOfWork(rt.engine) as uow:
        payment = uow.session.get(Payment, payment_id)
    assert payment is not None
    op = _find(payment, key)
    assert op is not None
    terms = terms_of(payment)
    chain = rt.chain(ctx.rpc_url)
    if op["status"] == "done":
        return payment, _refund_of(rt, op)
    if op["status"] == "failed":
        return _failed(rt, payment, op)
    if op.get("tx_hash"):
        return _decide_by_receipt(rt, chain, terms, payment, op)
    # Recorded but without a transaction: maybe sent by an attempt that never heard back.
    # The escrow's history says whether it happened; only if it left no trace is it sent again.
    stale = _now() - int(op.get("at", 0)) >= STALE_OPERATION_S
    if op.get("tried") or stale:
        try:
            snapshot = _read(rt, chain, payment)
        except ExternalServiceError as exc:
            raise SettlementPending(
                f"escrow {op['type']} of {payment_id}: chain unreadable; outcome unknown",
                payment_id=payment_id,
            ) from exc
        payment = apply_events(
            rt, payment_id, snapshot.events, confirmed_through=snapshot.block, scan=snapshot
        )
        if _moved(payment, op):
            tx = next((e.tx_hash for e in reversed(snapshot.confirmed)), None)
            return _finish(rt, payment_id, key, tx, [], confirmed_through=None)
        if snapshot.unconfirmed or not snapshot.complete:
            # This operation may be among them: sending it again could do it twice. Its
            # outcome is known once they count (or the history is read through the head).
            raise SettlementPending(
                f"escrow {op['type']} of {payment_id}: the escrow shows operations not "
                "confirmed yet (or its history is still being read); outcome unknown",
                payment_id=payment_id,
            )
        if resume_only and stale:
            return _record_failure(rt, payment_id, key, "abandoned: never sent", None)
    if resume_only:
        raise EscrowBusy(f"escrow {op['type']} on {payment_id} in flight", payment_id=payment_id)
    return _send(rt, ctx, chain, terms, payment, op)


def _send(
    rt: Runtime,
    ctx: ConnectionContext,
    chain: ChainClient,
    terms: Terms,
    payment: Payment,
    op: dict[str, Any],
) -> tuple[Payment, Refund | None]:
    key = str(op["key"])
    if not _claim_send(rt, payment.id, key, int(op.get("attempts", 0))):
        # Another run of the same job (a redelivered task) is sending it right now.
        raise SettlementPending(
            f"escrow {op['type']} of {payment.id} is being sent by another attempt",
            payment_id=payment.id,
        )
    if op.get("refund_id"):
        _refund_state(rt, str(op["refund_id"]), "settling")
    facilitator = rt.facilitator(ctx.facilitator_url, ctx.api_key())
    try:
        answer = facilitator.settle(_operation_payload(terms, _inner(terms, op)), terms.wire)
    except FacilitatorError as exc:
        status = exc.context.get("status_code")
        if not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)):
            raise SettlementPending(
                f"escrow {op['type']} of {payment.id}: facilitator unreachable or failing; "
                "the outcome is not known yet",
                payment_id=payment.id,
            ) from exc
        answer = {"success": False, "errorReason": exc.detail}
    tx_hash = str(answer.get("transaction") or "") or None
    reason = str(answer.get("errorReason") or "facilitator refused")
    if tx_hash:
        _update_op(rt, payment.id, key, status="pending", tx_hash=tx_hash)
        op = {**op, "status": "pending", "tx_hash": tx_hash}
        return _decide_by_receipt(rt, chain, terms, payment, op, reason=reason)
    if reason == SETTLEMENT_PENDING:
        raise SettlementPending(
            f"escrow {op['type']} of {payment.id} is pending", payment_id=payment.id
        )
    # Refused before anything was sent (verification or simulation): definite, nothing moved.
    return _record_failure(rt, payment.id, key, reason, None)


def _decide_by_receipt(
    rt: Runtime,
    chain: ChainClient,
    terms: Terms,
    payment: Payment,
    op: dict[str, Any],
    *,
    reason: str | None = None,
) -> tuple[Payment, Refund | None]:
    tx_hash = str(op["tx_hash"])
    try:
        mined = read_transaction(chain, tx_hash, terms)
    except ExternalServiceError as exc:
        raise SettlementPending(
            f"escrow {op['type']} of {payment.id}: chain unreadable; outcome unknown",
            payment_id=payment.id,
            tx_hash=tx_hash,
        ) from exc
    if mined.status is None:
        raise SettlementPending(
            f"escrow {op['type']} of {payment.id}: transaction {tx_hash} not mined yet",
            payment_id=payment.id,
            tx_hash=tx_hash,
        )
    try:
        through = _confirmed_block(rt, chain, payment)
    except ExternalServiceError as exc:
        raise SettlementPending(
            f"escrow {op['type']} of {payment.id}: chain unreadable; outcome unknown",
            payment_id=payment.id,
            tx_hash=tx_hash,
        ) from exc
    if through is not None and mined.block is not None and mined.block > through:
        # Mined, not deep enough: a reorganization may still undo it (or, reverted, include
        # it again). Decided either way only with the network's confirmations.
        raise SettlementPending(
            f"escrow {op['type']} of {payment.id}: transaction {tx_hash} mined in block "
            f"{mined.block}, not confirmed yet",
            payment_id=payment.id,
            tx_hash=tx_hash,
        )
    if mined.status != 1:
        return _record_failure(rt, payment.id, str(op["key"]), ac.TRANSACTION_REVERTED, tx_hash)
    events = mined.events
    if not events:  # mined without this payment's events (not expected): ask the history
        try:
            snapshot = _read(rt, chain, payment)
            events, through = snapshot.events, snapshot.block
        except ExternalServiceError:
            events = []
    return _finish(rt, payment.id, str(op["key"]), tx_hash, events, confirmed_through=through)


def _claim_send(rt: Runtime, payment_id: str, key: str, seen: int) -> bool:
    """Count one more send attempt, unless someone counted one since we read ``seen``: of two
    runs of the same job that both decided to send, exactly one sends (the payment's version
    check serializes the claims)."""

    def work(session: Session, payment: Payment) -> bool:
        op = _find(payment, key)
        if op is None or op.get("status") not in IN_FLIGHT or int(op.get("attempts", 0)) != seen:
            return False
        _store_op(session, payment, {**op, "tried": True, "attempts": seen + 1})
        return True

    try:
        return _in_session_once(rt, payment_id, work)
    except ConcurrentUpdate:
        return False


def _update_op(rt: Runtime, payment_id: str, key: str, **changes: Any) -> None:
    def work(session: Session, payment: Payment) -> None:
        op = _find(payment, key)
        if op is not None and op.get("status") in IN_FLIGHT:
            _store_op(session, payment, {**op, **changes})

    _in_session(rt, payment_id, work)


def _finish(
    rt: Runtime,
    payment_id: str,
    key: str,
    tx_hash: str | None,
    events: list[ac.EscrowEvent],
    *,
    confirmed_through: int | None,
) -> tuple[Payment, Refund | None]:
    """Apply the operation's escrow events and mark it done, in one transaction (a refund's row
    succeeds in it too; a hold voided whole frees its paywall slot as an exact hold's void does)."""
    from connector.payments import offers
    from connector.payments.receive import give_back_slot

    def work(session: Session, payment: Payment) -> tuple[Payment, Refund | None]:
        before = payment.state
        apply_escrow_events(session, payment, events, confirmed_through=confirmed_through)
        op = _find(payment, key)
        assert op is not None
        refund = session.get(Refund, op["refund_id"]) if op.get("refund_id") else None
        if op.get("status") != "done":
            _store_op(session, payment, {**op, "status": "done", "tx_hash": tx_hash})
            if refund is not None and refund.state not in ("succeeded", "failed"):
                refund.state = "succeeded"
                refund.tx_hash = tx_hash
                refund.updated_at = datetime.now(UTC)
                session.add(refund)
        if before != S.VOIDED.value and payment.state == S.VOIDED.value:
            give_back_slot(session, payment)
        return payment, refund

    payment, refund = _in_session(rt, payment_id, work)
    if payment.payment_request_id and payment.state == S.VOIDED.value:
        offers.cache_for(rt).forget_state(payment.payment_request_id)
    return payment, refund


def _record_failure(
    rt: Runtime, payment_id: str, key: str, reason: str, tx_hash: str | None
) -> tuple[Payment, Refund | None]:
    def work(session: Session, payment: Payment) -> Payment:
        op = _find(payment, key)
        assert op is not None
        if op.get("status") in IN_FLIGHT:
            _store_op(
                session,
                payment,
                {**op, "status": "failed", "reason": reason[:500], "tx_hash": tx_hash},
            )
            if op.get("refund_id"):
                refund = session.get(Refund, op["refund_id"])
                if refund is not None and refund.state not in ("succeeded", "failed"):
                    refund.state = "failed"
                    refund.failure_reason = reason[:1000]
                    refund.tx_hash = tx_hash
                    refund.updated_at = datetime.now(UTC)
                    session.add(refund)
        return payment

    payment = _in_session(rt, payment_id, work)
    op = _find(payment, key)
    assert op is not None
    return _failed(rt, payment, op)


def _failed(rt: Runtime, payment: Payment, op: dict[str, Any]) -> tuple[Payment, Refund | None]:
    """A refund's failure is its row's (the refund job reports it); a capture's or void's is an
    error (the job fails with it)."""
    refund = _refund_of(rt, op)
    if refund is not None:
        return payment, refund
    raise EscrowOperationFailed(
        f"escrow {op['type']} of payment {payment.id} failed: {op.get('reason')}; nothing moved",
        payment_id=payment.id,
    )


def _refund_of(rt: Runtime, op: dict[str, Any]) -> Refund | None:
    if not op.get("refund_id"):
        return None
    with UnitOfWork(rt.engine) as uow:
        return uow.session.get(Refund, op["refund_id"])


def _refund_state(rt: Runtime, refund_id: str, state: str) -> None:
    with UnitOfWork(rt.engine) as uow:
        row = uow.session.get(Refund, refund_id)
        if row is not None and row.state == "pending":
            row.state = state
            row.updated_at = datetime.now(UTC)
            uow.session.add(row)
            uow.commit()
