"""Envelope encryption: AES-256-GCM per secret, data keys wrapped by a master key.

Token format (one TEXT column, self-describing)::

    v1.<master key id>.<b64 wrapped data key>.<b64 nonce>.<b64 ciphertext+tag>

* every secret gets a fresh 256-bit data key; the data key is wrapped with AES-GCM under the
  master key named in the token, so rotating the master key only re-wraps data keys;
* the associated data binds the ciphertext to ``owner`` (row id) and ``field``: a token copied to
  another row or column fails authentication instead of decrypting into the wrong place;
* master keys come from configuration (``X402C_MASTER_KEYS`` or a key file); the first key is
  active for new writes, the others only decrypt until retired.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from connector.errors import ConnectorError
from connector.settings import Settings

FORMAT = "v1"


class MasterKeyError(ConnectorError):
    code = "master_key_error"
    title = "Vault master key misconfigured"


class DecryptionFailed(ConnectorError):
    """A stored secret cannot be read: tampered, moved to another row/field, or key missing."""

    code = "secret_unreadable"
    status = 500
    title = "Stored secret cannot be decrypted"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class MasterKey:
    kid: str
    key: bytes


class MasterKeyRing:
    """Ordered master keys; ``active`` encrypts, all decrypt."""

    def __init__(self, keys: list[MasterKey]) -> None:
        if not keys:
            raise MasterKeyError("no vault master key configured")
        kids = [k.kid for k in keys]
        if len(set(kids)) != len(kids):
            raise MasterKeyError("duplicate master key ids")
        self._keys = {k.kid: k for k in keys}
        self.active = keys[0]

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def get(self, kid: str) -> MasterKey | None:
        return self._keys.get(kid)

    @staticmethod
    def parse(spec: str) -> MasterKeyRing:
        """``kid:base64(32 bytes)[,kid:base64…]``; the first one is active."""
        keys = []
        for part in [p.strip() for p in spec.replace("\n", ",").split(",") if p.strip()]:
            kid, sep, material = part.partition(":")
            if not sep or not kid.isidentifier() or len(kid) > 32:
                raise MasterKeyError(
                    "master key entries must look like 'kid:base64key' (kid: letters, digits, _)"
                )
            try:
                raw = base64.b64decode(material, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise MasterKeyError(f"master key {kid!r} is not valid base64") from exc
            if len(raw) != 32:
                raise MasterKeyError(f"master key {kid!r} must be 32 bytes, got {len(raw)}")
            keys.append(MasterKey(kid, raw))
        return MasterKeyRing(keys)

    @staticmethod
    def generate_spec(kid: str = "k1") -> str:
        return f"{kid}:{base64.b64encode(secrets.token_bytes(32)).decode()}"


def load_key_ring(settings: Settings) -> MasterKeyRing:
    if settings.master_keys is not None:
        return MasterKeyRing.parse(settings.master_keys.get_secret_value())
    path = settings.resolved_master_key_file
    if path.exists():
        return MasterKeyRing.parse(path.read_text())
    if settings.mode == "production" or settings.master_key_file is not None:
        raise MasterKeyError(f"master key file {path} does not exist")
    # Embedded dev mode: create a key file readable by this user only.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as handle:
        handle.write(MasterKeyRing.generate_spec("dev1") + "\n")
    return MasterKeyRing.parse(path.read_text())


class Vault:
    def __init__(self, ring: MasterKeyRing) -> None:
        self.ring = ring

    @classmethod
    def from_settings(cls, settings: Settings) -> Vault:
        return cls(load_key_ring(settings))

    @staticmethod
    def _aad(owner: str, field: str) -> bytes:
        return f"x402c|{owner}|{field}".encode()

    def encrypt(self, plaintext: str, *, owner: str, field: str) -> str:
        master = self.ring.active
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = secrets.token_bytes(12)
        aad = self._aad(owner, field)
        ciphertext = AESGCM(data_key).encrypt(nonce, plaintext.encode(), aad)
        return self._token(master, data_key, nonce, ciphertext, aad)

    def _token(
        self, master: MasterKey, data_key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes
    ) -> str:
        wrap_nonce = secrets.token_bytes(12)
        wrapped = wrap_nonce + AESGCM(master.key).encrypt(wrap_nonce, data_key, aad)
        return ".".join([FORMAT, master.kid, _b64(wrapped), _b64(nonce), _b64(ciphertext)])

    def _open(self, token: str, owner: str, field: str) -> tuple[bytes, bytes, bytes, bytes]:
        def fail(why: str) -> DecryptionFailed:
            return DecryptionFailed(
                f"secret {field!r} of {owner} cannot be decrypted: {why}", owner=owner, field=field
            )

        parts = token.split(".") if isinstance(token, str) else []
        if len(parts) != 5 or parts[0] != FORMAT:
            raise fail("not a vault token")
        master = self.ring.get(parts[1])
        if master is None:
            raise fail(f"master key {parts[1]!r} is not configured")
        aad = self._aad(owner, field)
        try:
            wrapped, nonce, ciphertext = (_unb64(p) for p in parts[2:])
            data_key = AESGCM(master.key).decrypt(wrapped[:12], wrapped[12:], aad)
        except (InvalidTag, ValueError, binascii.Error) as exc:
            raise fail("wrong key, tampered, or belongs to another row or field") from exc
        return data_key, nonce, ciphertext, aad

    def decrypt(self, token: str, *, owner: str, field: str) -> str:
        data_key, nonce, ciphertext, aad = self._open(token, owner, field)
        try:
            return AESGCM(data_key).decrypt(nonce, ciphertext, aad).decode()
        except (InvalidTag, UnicodeDecodeError) as exc:
            raise DecryptionFailed(
                f"secret {field!r} of {owner} cannot be decrypted: ciphertext tampered",
                owner=owner,
                field=field,
            ) from exc

    def rewrap(self, token: str, *, owner: str, field: str) -> str:
        """Re-wrap the data key under the active master key (ciphertext unchanged)."""
        data_key, nonce, ciphertext, aad = self._open(token, owner, field)
        return self._token(self.ring.active, data_key, nonce, ciphertext, aad)

    @staticmethod
    def key_id_of(token: str) -> str:
        parts = token.split(".")
        return parts[1] if len(parts) == 5 else ""

    @staticmethod
    def hint(secret: str) -> str:
        """What may be shown of a secret: its last four characters."""
        return "…" + secret[-4:] if len(secret) >= 12 else "…"
