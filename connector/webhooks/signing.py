"""Standard Webhooks signatures (https://www.standardwebhooks.com), written here, proven in tests
against the ``standardwebhooks`` package.

``webhook-signature: v1,<base64 HMAC-SHA256(key, f"{id}.{timestamp}.{body}")>``; the key is the
base64-decoded part after ``whsec_``. During a secret rotation both signatures are sent,
space-separated, so receivers can switch secrets without missing a delivery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence

from connector.errors import ConnectorError

PREFIX = "whsec_"


class SignatureInvalid(ConnectorError):
    code = "webhook_signature_invalid"
    status = 400
    title = "Webhook signature invalid"


def generate_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(PREFIX))


def _signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign(secrets_: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: one ``v1,…`` per secret, space-separated."""
    if not secrets_:
        raise ValueError("at least one secret is needed")
    return " ".join(_signature(s, msg_id, timestamp, body) for s in secrets_)


def headers_for(
    secrets_: Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets_, msg_id, timestamp, body),
    }


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: int, tolerance_s: int = 300
) -> None:
    """Raise :class:`SignatureInvalid` unless one signature matches and the time is fresh."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, header = (
        lower.get("webhook-id"),
        lower.get("webhook-timestamp"),
        lower.get("webhook-signature"),
    )
    if not msg_id or not stamp or not header:
        raise SignatureInvalid("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError as exc:
        raise SignatureInvalid("webhook-timestamp is not an integer") from exc
    if abs(now - timestamp) > tolerance_s:
        raise SignatureInvalid("webhook-timestamp is outside the tolerance window")
    expected = _signature(secret, msg_id, timestamp, body)
    for candidate in header.split():
        if hmac.compare_digest(candidate.encode(), expected.encode()):
            return
    raise SignatureInvalid("no matching signature")
