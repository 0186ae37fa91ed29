"""x402 over HTTP: header names, base64 JSON, and parsing of every message, both versions.

| message | v1 | v2 |
|---|---|---|
| offer (402) | JSON body `{x402Version:1, error, accepts}` | `PAYMENT-REQUIRED` header |
| payment | `X-PAYMENT` header | `PAYMENT-SIGNATURE` header (echoes `accepted`) |
| settlement | `X-PAYMENT-RESPONSE` header | `PAYMENT-RESPONSE` header |

Headers are capped in size before decoding, and every parse error is a typed
:class:`~connector.x402.errors.ProtocolError` naming the field.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from connector.x402 import fields as f
from connector.x402.errors import MalformedPayment, ProtocolError, UnsupportedScheme
from connector.x402.exact_evm import ExactPayload, parse_exact_payload
from connector.x402.networks import to_caip2, to_v1_name
from connector.x402.requirement import Requirement, requirement_from_wire

PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE = "PAYMENT-RESPONSE"
X_PAYMENT = "X-PAYMENT"
X_PAYMENT_RESPONSE = "X-PAYMENT-RESPONSE"

MAX_HEADER_BYTES = 32 * 1024
MAX_BODY_BYTES = 256 * 1024
MAX_ACCEPTS = 32


def encode_b64_json(value: Any) -> str:
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.b64encode(raw).decode("ascii")


def decode_b64_json(value: str, where: str) -> dict[str, Any]:
    if not isinstance(value, str):
        raise MalformedPayment(f"{where} must be a string", field=where)
    if len(value) > MAX_HEADER_BYTES:
        raise MalformedPayment(f"{where} is larger than {MAX_HEADER_BYTES} bytes", field=where)
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedPayment(f"{where} is not valid base64", field=where) from exc
    return _json_object(raw, where)


def _json_object(raw: bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedPayment(f"{where} is not valid UTF-8 JSON", field=where) from exc
    return f.obj(data, where)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _version(data: dict[str, Any], where: str) -> int:
    version = data.get("x402Version")
    if version not in (1, 2) or isinstance(version, bool):
        raise MalformedPayment(f"{where}.x402Version must be 1 or 2", field=f"{where}.x402Version")
    return int(version)


# ------------------------------------------------------------------------------ offers (402)


@dataclass(frozen=True)
class PaymentOffer:
    version: int
    accepts: list[Requirement]
    resource: dict[str, Any] | None = None  # v2 resource info
    error: str | None = None
    raw_accepts: list[dict[str, Any]] = field(default_factory=list)


def parse_offer_document(data: dict[str, Any], where: str) -> PaymentOffer:
    version = _version(data, where)
    accepts = data.get("accepts")
    if not isinstance(accepts, list) or not accepts:
        raise MalformedPayment(
            f"{where}.accepts must be a non-empty list", field=f"{where}.accepts"
        )
    if len(accepts) > MAX_ACCEPTS:
        raise MalformedPayment(f"{where}.accepts has too many entries", field=f"{where}.accepts")
    parsed = []
    raw: list[dict[str, Any]] = []
    for i, item in enumerate(accepts):
        try:
            parsed.append(requirement_from_wire(item, version, f"{where}.accepts[{i}]"))
            raw.append(item)
        except ProtocolError:
            continue  # one broken or unknown option must not hide the valid ones
    if not parsed:
        raise MalformedPayment(f"{where}.accepts has no usable option", field=f"{where}.accepts")
    resource = f.optional_obj(data, "resource", where) if version == 2 else None
    error = data.get("error") if isinstance(data.get("error"), str) else None
    return PaymentOffer(version, parsed, resource, error, raw)


def parse_payment_required(
    status: int, headers: Mapping[str, str], body: bytes | None
) -> PaymentOffer:
    """Read a 402: the v2 header wins; the v1 JSON body is the fallback."""
    if status != 402:
        raise MalformedPayment(f"expected HTTP 402, got {status}", field="status")
    header = _header(headers, PAYMENT_REQUIRED)
    if header:
        return parse_offer_document(decode_b64_json(header, PAYMENT_REQUIRED), PAYMENT_REQUIRED)
    if body:
        if len(body) > MAX_BODY_BYTES:
            raise MalformedPayment("402 body is too large", field="body")
        return parse_offer_document(_json_object(body, "body"), "body")
    raise MalformedPayment("402 response carries no payment requirements", field="body")


def payment_required_response(
    requirement: Requirement,
    resource_url: str,
    description: str | None,
    error: str | None,
    protocols: str = "both",
    alternatives: tuple[Requirement, ...] = (),
) -> tuple[dict[str, str], dict[str, Any]]:
    """Headers and body of a 402. ``protocols`` "both": v2 header + v1 body, so either client
    understands it; "v2": the header, and the same v2 object as body (a v1 client then sees
    ``x402Version: 2`` and knows it cannot pay); "v1": the v1 body only, no v2 header.
    ``alternatives``: further v2 options after ``requirement`` (v2 only)."""
    v2 = {
        "x402Version": 2,
        "error": error or "Payment required",
        "resource": {
            "url": resource_url,
            "description": description or "",
            "mimeType": requirement.mime_type or "application/json",
        },
        "accepts": [requirement.to_v2(), *(other.to_v2() for other in alternatives)],
    }
    if protocols == "v2":
        return {PAYMENT_REQUIRED: encode_b64_json(v2)}, v2
    v1 = {"x402Version": 1, "error": error or "Payment required", "accepts": [requirement.to_v1()]}
    if protocols == "v1":
        return {}, v1
    return {PAYMENT_REQUIRED: encode_b64_json(v2)}, v1


# ------------------------------------------------------------------------------ payments


@dataclass(frozen=True)
class IncomingPayment:
    version: int
    scheme: str
    network: str  # CAIP-2
    payload: ExactPayload
    wire: dict[str, Any]  # exactly as received (forwarded to facilitators)
    accepted: Requirement | None = None  # v2 echo of the chosen requirement

    @property
    def payer(self) -> str:
        return self.payload.authorization.from_

    @property
    def nonce(self) -> str:
        return self.payload.authorization.nonce


#: ``authCapture`` (on-chain escrow) under the spec's name and the TypeScript client's.
AUTH_CAPTURE_SCHEMES = frozenset({"authCapture", "auth-capture"})


def parse_payment_payload(
    data: Any, where: str = "paymentPayload", *, auth_capture: bool = False
) -> IncomingPayment:
    """Parse a client's payment. ``auth_capture``: also accept a v2 ``authCapture`` payment, whose
    ``payload`` carries the same ERC-3009 ``authorization`` and ``signature`` (payee: the escrow's
    token collector) plus the terms' ``salt``; the rest of it stays in ``wire`` for the
    facilitator."""
    d = f.obj(data, where)
    version = _version(d, where)
    if version == 1:
        scheme = f.string(d, "scheme", where, max_len=32)
        network = to_caip2(f.string(d, "network", where, max_len=64))
        accepted = None
    else:
        accepted = requirement_from_wire(d.get("accepted"), 2, f"{where}.accepted")
        scheme, network = accepted.scheme, accepted.network
    escrow = auth_capture and version == 2 and scheme in AUTH_CAPTURE_SCHEMES
    if scheme != "exact" and not escrow:
        raise UnsupportedScheme(f"scheme {scheme!r} is not supported", field=f"{where}.scheme")
    payload = parse_exact_payload(d.get("payload"), f"{where}.payload")
    return IncomingPayment(version, scheme, network, payload, d, accepted)


def read_payment_header(
    headers: Mapping[str, str], *, auth_capture: bool = False
) -> IncomingPayment | None:
    """The payment a client attached (``PAYMENT-SIGNATURE`` or ``X-PAYMENT``), if any."""
    for name in (PAYMENT_SIGNATURE, X_PAYMENT):
        value = _header(headers, name)
        if value:
            return parse_payment_payload(
                decode_b64_json(value, name), name, auth_capture=auth_capture
            )
    return None


def build_payment_payload(
    payload: ExactPayload,
    requirement: Requirement,
    version: int,
    *,
    accepted_raw: dict[str, Any] | None = None,
    resource: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Wire payload for the chosen requirement. v2 echoes ``accepted`` exactly as offered."""
    if version == 1:
        return {
            "x402Version": 1,
            "scheme": requirement.scheme,
            "network": requirement.to_v1()["network"],
            "payload": payload.to_wire(),
        }
    wire: dict[str, Any] = {
        "x402Version": 2,
        "accepted": accepted_raw if accepted_raw is not None else requirement.to_v2(),
        "payload": payload.to_wire(),
    }
    if resource is not None:
        wire["resource"] = resource
    return wire


def payment_header(version: int, wire_payload: dict[str, Any]) -> tuple[str, str]:
    return (X_PAYMENT if version == 1 else PAYMENT_SIGNATURE), encode_b64_json(wire_payload)


# ------------------------------------------------------------------------------ settlement


def settlement_headers(version: int, settlement: dict[str, Any]) -> dict[str, str]:
    """The settlement response header; a v1 one names the network by its v1 name
    (``base-sepolia``), as v1 clients expect, whatever form ``settlement`` carries."""
    if version == 1:
        network = settlement.get("network")
        if isinstance(network, str) and network:
            settlement = {**settlement, "network": to_v1_name(network)}
        return {X_PAYMENT_RESPONSE: encode_b64_json(settlement)}
    return {PAYMENT_RESPONSE: encode_b64_json(settlement)}


def parse_settlement(headers: Mapping[str, str]) -> dict[str, Any] | None:
    for name in (PAYMENT_RESPONSE, X_PAYMENT_RESPONSE):
        value = _header(headers, name)
        if value:
            try:
                return decode_b64_json(value, name)
            except MalformedPayment:
                return None
    return None
