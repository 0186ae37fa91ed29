"""Moved to :mod:`connector.net.ssrf` (one guard for every outbound client); kept importable."""

from connector.net.ssrf import (
    GuardedTransport,
    OutboundPolicy,
    Resolver,
    _GuardedBackend,
    check_host,
    check_url,
    classify,
    guard_for,
    system_resolver,
)

__all__ = [
    "GuardedTransport",
    "OutboundPolicy",
    "Resolver",
    "_GuardedBackend",
    "check_host",
    "check_url",
    "classify",
    "guard_for",
    "system_resolver",
]
