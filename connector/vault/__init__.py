"""Envelope encryption of secrets at rest (see docs/security.md)."""

from connector.vault.envelope import DecryptionFailed, MasterKeyError, MasterKeyRing, Vault

__all__ = ["DecryptionFailed", "MasterKeyError", "MasterKeyRing", "Vault"]
