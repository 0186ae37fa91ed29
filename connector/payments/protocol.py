"""The bridge between the payment services and the x402 protocol package.

Services speak in :class:`Requirement`, stored wire dicts and datetimes; this module turns them
into signed payloads, headers and offers, so no service touches base64 or EIP-712 itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from connector.actions.schemas import SendInput
from connector.errors import PolicyRefused, ValidationFailed
from connector.payments.context import ConnectionContext
from connector.payments.http_fetch import Fetched, HttpFetcher
from connector.runtime import Runtime
from connector.storage.models.payments import Payment
from connector.x402 import auth_capture, codec
from connector.x402.codec import IncomingPayment, PaymentOffer
from connector.x402.errors import ProtocolError
from connector.x402.exact_evm import SigningKey, sign_exact
from connector.x402.fields import checksum
from connector.x402.networks import USDC, to_caip2
from connector.x402.requirement import Requirement, requirement_from_wire

__all__ = ["Requirement"]

payment_required_response = codec.payment_required_response
settlement_headers = codec.settlement_headers
read_payment_header = codec.read_payment_header


def fetcher_for(rt: Runtime) -> HttpFetcher:
    settings = rt.settings

    def build() -> HttpFetcher:
        policy = rt.outbound()
        return HttpFetcher(
            timeout_s=settings.send_timeout_s,
            max_bytes=settings.send_max_response_bytes,
            guard=policy.guard(),
            transport=policy.transport(),
        )

    fetcher: HttpFetcher = rt._cached(("fetcher",), build)
    return fetcher


def normalize_network(network: str) -> str:
    try:
        return to_caip2(network)
    except ProtocolError as exc:
        raise ValidationFailed(exc.detail, field="network") from exc


# ------------------------------------------------------------------------------ payer side


@dataclass(frozen=True)
class Chosen:
    requirement: Requirement
    raw: dict[str, Any]  # exactly as offered: v2 echoes it in `accepted`


def parse_payment_required(fetched: Fetched) -> PaymentOffer:
    return codec.parse_payment_required(fetched.status, fetched.headers, fetched.body)


def choose_requirement(
    offer: PaymentOffer, ctx: ConnectionContext, inp: SendInput
) -> tuple[Chosen, PolicyRefused | None]:
    """The cheapest option we can pay; if none is acceptable, the cheapest with the refusal."""
    wanted_network = normalize_network(inp.network) if inp.network else None
    reasons: list[str] = []
    acceptable: list[Chosen] = []
    options = [Chosen(r, raw) for r, raw in zip(offer.accepts, offer.raw_accepts, strict=True)]
    for option in options:
        req = option.requirement
        if req.scheme != "exact" and (problem := _auth_capture_problem(req, offer.version)):
            reasons.append(f"{req.network}: {problem}")
        elif wanted_network and req.network != wanted_network:
            reasons.append(f"{req.network}: not the requested network")
        elif not wanted_network and req.network != ctx.network and not ctx.policy.allowed_networks:
            reasons.append(f"{req.network}: connection pays on {ctx.network}")
        elif inp.asset and req.asset.lower() != inp.asset.lower():
            reasons.append(f"{req.network}: asset {req.asset} is not the requested asset")
        elif not req.token_name or not req.token_version:
            reasons.append(f"{req.network}: offer lacks the token's EIP-712 name/version")
        else:
            acceptable.append(option)
    if acceptable:
        return min(acceptable, key=lambda c: c.requirement.amount), None
    cheapest = min(options, key=lambda c: c.requirement.amount)
    return cheapest, PolicyRefused(
        "no payment option is acceptable: " + "; ".join(reasons), rule="no_acceptable_offer"
    )


def _auth_capture_problem(req: Requirement, version: int) -> str | None:
    """Why we cannot pay this ``authCapture`` option (None: we can). Non-escrow schemes get the
    generic refusal."""
    if not auth_capture.is_auth_capture(req):
        return f"scheme {req.scheme} unsupported"
    if version != 2:
        return "authCapture needs x402 v2"
    try:
        extra = auth_capture.parse_extra(req.extra)
    except auth_capture.AuthCaptureInvalid as exc:
        return f"authCapture offer refused ({exc.reason}): {exc.detail}"
    if extra.asset_transfer_method != "eip3009":
        return "authCapture via permit2 is not implemented"
    return None


def asset_for(
    rt: Runtime, ctx: ConnectionContext, network: str, asset: str | None
) -> tuple[str, str, str]:
    """(token address, EIP-712 name, version) for payments on ``network``."""
    found = _asset(rt, ctx, network, asset, read_chain=True)
    assert found is not None
    return found


def _asset(
    rt: Runtime, ctx: ConnectionContext, network: str, asset: str | None, *, read_chain: bool
) -> tuple[str, str, str] | None:
    chosen = asset or ctx.extra.get("asset")
    known = USDC.get(network)
    if chosen is None:
        if known is None:
            raise ValidationFailed(
                f"no default asset on {network}: give `asset` or set it on the connection",
                field="asset",
            )
        chosen = known.address
    # When the registry knows the address but no SDK states its domain, read it from the token.
    if (
        known is not None
        and known.address.lower() == str(chosen).lower()
        and known.name is not None
        and known.version is not None
    ):
        return known.address, known.name, known.version
    chain = rt.chain(ctx.rpc_url)
    token = str(chosen)
    domain = chain.token_domain(token) if read_chain else chain.cached_token_domain(token)
    if domain is None:
        return None
    return checksum(token), domain[0], domain[1]


def direct_requirement(rt: Runtime, ctx: ConnectionContext, inp: SendInput) -> Chosen:
    chosen = _direct(rt, ctx, inp, read_chain=True)
    assert chosen is not None
    return chosen


def direct_requirement_offline(
    rt: Runtime, ctx: ConnectionContext, inp: SendInput
) -> Chosen | None:
    """:func:`direct_requirement` without any network call, or None when the token's EIP-712
    domain has not been read from the chain yet."""
    return _direct(rt, ctx, inp, read_chain=False)


def _direct(
    rt: Runtime, ctx: ConnectionContext, inp: SendInput, *, read_chain: bool
) -> Chosen | None:
    assert inp.to is not None and inp.amount is not None
    network = normalize_network(inp.network or ctx.network)
    found = _asset(rt, ctx, network, inp.asset, read_chain=read_chain)
    if found is None:
        return None
    asset, name, version = found
    requirement = Requirement(
        scheme="exact",
        network=network,
        amount=int(inp.amount),
        asset=asset,
        pay_to=checksum(inp.to),
        max_timeout_seconds=300,
        extra={"name": name, "version": version},
    )
    return Chosen(requirement, requirement.to_v2())


def transfer_requirement(payment: Payment, *, pay_to: str, amount: int) -> Requirement:
    """A requirement for a transfer of ``payment``'s token (refunds, escrow release)."""
    extra = {}
    if payment.requirement:
        extra = dict(payment.requirement.get("extra") or {})
    return Requirement(
        scheme="exact",
        network=payment.network,
        amount=amount,
        asset=payment.asset,
        pay_to=pay_to,
        max_timeout_seconds=300,
        extra={"name": extra.get("name"), "version": extra.get("version")},
    )


def requirement_to_wire(requirement: Requirement, version: int) -> dict[str, Any]:
    return requirement.to_wire(version)


def requirement_from_stored(stored: dict[str, Any], version: int) -> Requirement:
    return requirement_from_wire(stored, version)


#: The last second a ``datetime`` can hold (year 9999). EIP-3009 deadlines are any uint256, and
#: payers may sign "never expires" as 2**256 - 1: such deadlines are stored as this instead.
_LAST_DATETIME_S = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())


def deadline_from_epoch(seconds: int) -> datetime:
    """A uint256 Unix deadline as a UTC datetime, clamped to what a datetime can hold."""
    return datetime.fromtimestamp(min(max(seconds, 0), _LAST_DATETIME_S), UTC)


@dataclass(frozen=True)
class Signed:
    wire: dict[str, Any]
    nonce: str
    valid_before: datetime
    payer: str


def sign_payment(
    account: SigningKey,
    requirement: Requirement,
    version: int,
    resource: dict[str, Any] | None,
    *,
    accepted_raw: dict[str, Any] | None = None,
) -> Signed:
    if auth_capture.is_auth_capture(requirement):
        return _sign_auth_capture(account, requirement, resource, accepted_raw)
    signed = sign_exact(account, requirement)
    wire = codec.build_payment_payload(
        signed.payload, requirement, version, accepted_raw=accepted_raw, resource=resource
    )
    return Signed(
        wire=wire,
        nonce=signed.nonce,
        valid_before=deadline_from_epoch(signed.valid_before),
        payer=account.address,
    )


def _sign_auth_capture(
    account: SigningKey,
    requirement: Requirement,
    resource: dict[str, Any] | None,
    accepted_raw: dict[str, Any] | None,
) -> Signed:
    """An ``authCapture`` payment (v2 only): the signed ``ReceiveWithAuthorization`` to the
    canonical collector plus the terms it commits to (``paymentInfo``), which the payer keeps so it
    can ``reclaim`` alone after the capture deadline."""
    client_payload, info = auth_capture.sign_auth_capture(account, requirement)
    wire: dict[str, Any] = {
        "x402Version": 2,
        "accepted": accepted_raw if accepted_raw is not None else requirement.to_v2(),
        "payload": {**client_payload.to_wire(), "paymentInfo": info.to_wire()},
    }
    if resource is not None:
        wire["resource"] = resource
    return Signed(
        wire=wire,
        nonce=client_payload.authorization.nonce,
        valid_before=datetime.fromtimestamp(client_payload.authorization.valid_before, UTC),
        payer=account.address,
    )


def payment_header(version: int, wire: dict[str, Any]) -> tuple[str, str]:
    return codec.payment_header(version, wire)


def parse_settlement(fetched: Fetched) -> dict[str, Any] | None:
    return codec.parse_settlement(fetched.headers)


def http_result(fetched: Fetched) -> dict[str, Any]:
    body, encoding = fetched.body_for_result()
    keep = {k: v for k, v in fetched.headers.items() if k not in ("set-cookie",)}
    return {
        "status": fetched.status,
        "headers": keep,
        "body": body,
        "body_encoding": encoding,
        "truncated": fetched.truncated,
    }


def error_from_body(fetched: Fetched) -> str:
    try:
        import json

        data = json.loads(fetched.body[:4096])
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return str(data["error"])[:300]
    except ValueError:
        pass
    return fetched.body[:200].decode("utf-8", "replace")


# ------------------------------------------------------------------------------ payee side


@dataclass(frozen=True)
class Incoming:
    version: int
    wire: dict[str, Any]
    payer: str
    nonce: str
    valid_before: datetime


def check_incoming(incoming: IncomingPayment, requirement: Requirement) -> Incoming:
    """Cheap local checks before asking the facilitator: right offer, right recipient/amount.

    ``exact`` pays ``payTo`` directly; ``authCapture`` pays the escrow's token collector (the
    payee the payer signed is the canonical collector; ``payTo`` is inside the signed terms,
    which the facilitator checks through the nonce)."""
    if incoming.accepted is not None and not incoming.accepted.same_offer(requirement):
        raise ValidationFailed(
            "the accepted requirement does not match this offer", field="accepted"
        )
    if incoming.network != requirement.network:
        raise ValidationFailed("payment is for another network", field="network")
    auth = incoming.payload.authorization
    payee = requirement.pay_to
    if auth_capture.is_auth_capture(requirement):
        try:
            payee = auth_capture.parse_extra(requirement.extra).deployment.eip3009_collector
        except auth_capture.AuthCaptureInvalid as exc:  # our own offer: cannot happen
            raise ValidationFailed(exc.detail, field="accepted") from exc
    if auth.to.lower() != payee.lower() or auth.value != requirement.amount:
        raise ValidationFailed("payment recipient or amount does not match", field="payload")
    return Incoming(
        version=incoming.version,
        wire=incoming.wire,
        payer=incoming.payer,
        nonce=incoming.nonce,
        valid_before=deadline_from_epoch(auth.valid_before),
    )


def headers_dict(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}
