"""Keccak-256 without the per-call object churn.

``eth_utils.keccak`` (through eth-hash and pycryptodome's ``Keccak_Hash``) spends ~7 µs per call on
Python-level object creation and argument checks for a 200-byte input whose hashing itself takes
well under a microsecond. Verification does three keccaks per payment (struct hash, EIP-712
digest, recovered public key), which made hashing cost about as much as the signature recovery
(see ``bench/bench_verify.py``).

In order of preference: ``safe-pysha3``'s C ``keccak_256`` (~0.8 µs for a 64-byte input here);
pycryptodome's compiled Keccak called directly through its cffi library, with one sponge state per
thread reset between calls (~2.4 µs: four foreign calls); ``eth_utils.keccak``. Each candidate is
checked against ``eth_utils`` before use, and a unit test compares them over many lengths.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

from eth_utils.crypto import keccak as _eth_keccak

_CAPACITY = 64  # bytes: 2 x 256 bits
_ROUNDS = 24
_KECCAK_PADDING = 0x01  # original Keccak, not SHA-3's 0x06


def _slow(data: bytes) -> bytes:
    return bytes(_eth_keccak(data))


def _build_fast() -> Callable[[bytes], bytes] | None:
    try:
        lib: Any = getattr(importlib.import_module("Crypto.Hash.keccak"), "_raw_keccak_lib")  # noqa: B009
        _raw_api: Any = importlib.import_module("Crypto.Util._raw_api")
    except (ImportError, AttributeError):
        return None
    if getattr(_raw_api, "backend", None) != "cffi":
        return None
    ffi: Any = _raw_api.ffi
    local = threading.local()

    def state() -> Any:
        st = getattr(local, "state", None)
        if st is None:
            holder = ffi.new("void **")
            if lib.keccak_init(holder, _CAPACITY, _ROUNDS) != 0:
                raise RuntimeError("keccak_init failed")
            st = ffi.gc(holder[0], lib.keccak_destroy)
            local.state = st
            local.out = ffi.new("uint8_t[32]")
        return st

    reset, absorb, digest, unpack = (
        lib.keccak_reset,
        lib.keccak_absorb,
        lib.keccak_digest,
        ffi.unpack,
    )

    def keccak256(data: bytes) -> bytes:
        st = getattr(local, "state", None) or state()
        out = local.out
        reset(st)
        if absorb(st, data, len(data)):
            raise RuntimeError("keccak_absorb failed")
        if digest(st, out, 32, _KECCAK_PADDING):
            raise RuntimeError("keccak_digest failed")
        return bytes(unpack(out, 32))

    try:
        if keccak256(b"") != _slow(b""):
            return None
    except Exception:
        return None
    return keccak256


def _build_pysha3() -> Callable[[bytes], bytes] | None:
    try:
        module: Any = importlib.import_module("sha3")
        keccak_256: Any = module.keccak_256
    except (ImportError, AttributeError):
        return None

    def keccak256(data: bytes) -> bytes:
        return bytes(keccak_256(data).digest())

    try:
        if keccak256(b"") != _slow(b"") or keccak256(b"x" * 200) != _slow(b"x" * 200):
            return None
    except Exception:
        return None
    return keccak256


_fast = _build_pysha3() or _build_fast()

#: Keccak-256 of ``data`` (Ethereum's "sha3").
keccak256: Callable[[bytes], bytes] = _fast or _slow
FAST = _fast is not None

__all__ = ["FAST", "keccak256"]
