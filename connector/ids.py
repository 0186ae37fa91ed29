"""Prefixed, opaque, time-ordered ids (``pay_01j…``).

Ids sort by creation time (48-bit millisecond clock, then 80 random bits, Crockford base32), so a
cursor page ordered by id is stable and needs no separate timestamp column.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"

PREFIXES = frozenset(
    {
        "conn",
        "pay",
        "evt",
        "whd",
        "wha",
        "sub",
        "key",
        "aud",
        "job",
        "req",
        "ref",
        "apr",
        "idem",
        "rsv",
        "prq",
        "wal",
    }
)


def _encode(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """Return a fresh id such as ``pay_01jd3x…`` (26 chars after the prefix)."""
    if prefix not in PREFIXES:
        raise ValueError(f"unknown id prefix {prefix!r}")
    millis = time.time_ns() // 1_000_000
    rand = secrets.randbits(80)
    return f"{prefix}_{_encode(millis, 10)}{_encode(rand, 16)}"


def has_prefix(value: str, prefix: str) -> bool:
    """True when ``value`` looks like an id of the given kind (cheap input check)."""
    head, sep, tail = value.partition("_")
    return sep == "_" and head == prefix and len(tail) == 26 and set(tail) <= set(_ALPHABET)
