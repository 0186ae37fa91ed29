"""How a connection authenticates to its facilitator: none (x402.org-style), a static bearer key,
or a per-request signed JWT from an API key id + secret, as Coinbase's CDP facilitator expects.

The CDP token (read from the ``cdp-sdk`` package's ``cdp/auth/utils/jwt.py``; written here with
``cryptography`` alone): header ``{alg, kid: key id, typ: "JWT", nonce: 16 random digits}``;
claims ``{sub: key id, iss: "cdp", iat, nbf: now, exp: now + 120,
uris: ["<METHOD> <host><path>"]}``; signed ES256 with a PEM EC key, or EdDSA with a base64
Ed25519 key (64 bytes: seed + public key). A token is bound to one method and URL and lives
two minutes, so a fresh one is made for every request.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from connector.errors import ValidationFailed

JWT_LIFETIME_S = 120


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parse_cdp_secret(secret: str) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    """A PEM EC (P-256) key or a base64 Ed25519 key (seed + public key, 64 bytes)."""
    text = secret.replace("\\n", "\n").strip()
    if "BEGIN" in text:
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise ValidationFailed("API key secret is not a readable PEM key") from exc
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            return key
        raise ValidationFailed("a PEM API key secret must be an EC P-256 key")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ValidationFailed("API key secret is neither PEM nor base64") from exc
    if len(raw) != 64:
        raise ValidationFailed("a base64 Ed25519 API key secret must decode to 64 bytes")
    return ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32])


@dataclass(frozen=True)
class CdpJwtAuth:
    """Per-request JWT auth. The secret is parsed once; ``repr`` never shows it."""

    key_id: str
    secret: str = field(repr=False)
    _key: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.key_id:
            raise ValidationFailed("API key id is required for JWT auth", field="api_key_id")
        object.__setattr__(self, "_key", parse_cdp_secret(self.secret))

    @property
    def fingerprint(self) -> str:
        """Identifies the credentials in caches without holding the secret."""
        import hashlib

        return "jwt:" + hashlib.sha256(f"{self.key_id}\0{self.secret}".encode()).hexdigest()[:16]

    def token(self, method: str, url: str, now: int | None = None) -> str:
        parts = urlsplit(url)
        now = int(time.time()) if now is None else now
        ec_key = isinstance(self._key, ec.EllipticCurvePrivateKey)
        header = {
            "alg": "ES256" if ec_key else "EdDSA",
            "kid": self.key_id,
            "typ": "JWT",
            "nonce": "".join(secrets.choice("0123456789") for _ in range(16)),
        }
        claims = {
            "sub": self.key_id,
            "iss": "cdp",
            "iat": now,
            "nbf": now,
            "exp": now + JWT_LIFETIME_S,
            "uris": [f"{method.upper()} {parts.netloc}{parts.path}"],
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        ).encode()
        if ec_key:
            der = self._key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
            r, s = decode_dss_signature(der)
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # JWS wants raw r || s
        else:
            signature = self._key.sign(signing_input)
        return signing_input.decode() + "." + _b64url(signature)

    def headers(self, method: str, url: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token(method, url)}"}


#: What a connection hands its facilitator client: nothing, a bearer key, or JWT credentials.
FacilitatorCredentials = str | CdpJwtAuth | None
