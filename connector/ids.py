"""Prefixed, opaque, time-ordered ids (``pay_01j…``).

Ids sort by creation time (48-bit millisecond clock, then 80 random bits, Crockford base32), so a
cursor page ordered by id is stable and needs no separate timestamp column.
"""

from __future__ import annotations

import secrets
import threading
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


_last = (0, 0)
_last_lock = threading.Lock()


def new_id(prefix: str) -> str:
    """Return a fresh id such as ``pay_01jd3x…`` (26 chars after the prefix).

    Within one process ids are strictly increasing even inside one millisecond (the random part
    is incremented instead of redrawn), so the events of one transaction sort in the order they
    happened and are delivered in that order.
    """
    global _last
    if prefix not in PREFIXES:
        raise ValueError(f"unknown id prefix {prefix!r}")
    millis = time.time_ns() // 1_000_000
    with _last_lock:
        last_millis, last_rand = _last
        if millis <= last_millis and last_rand < (1 << 80) - 1:
            millis, rand = last_millis, last_rand + 1
        else:
            rand = secrets.randbits(79)  # leaves room to count up within the millisecond
        _last = (millis, rand)
    return f"{prefix}_{_encode(millis, 10)}{_encode(rand, 16)}"


def has_prefix(value: str, prefix: str) -> bool:
    """True when ``value`` looks like an id of the given kind (cheap input check)."""
    head, sep, tail = value.partition("_")
    return sep == "_" and head == prefix and len(tail) == 26 and set(tail) <= set(_ALPHABET)
