"""SSRF guard for every outbound URL a customer controls (webhook targets, ``send`` URLs).

Two layers:

1. :func:`check_url` resolves the host and refuses private, loopback, link-local, multicast,
   reserved, CGNAT and cloud-metadata addresses (IPv4 and IPv6, including IPv4-mapped IPv6).
2. :class:`GuardedTransport` repeats the check at connect time and connects to the very address it
   checked, so DNS rebinding (public at check time, private at connect time) cannot slip through.
   TLS still verifies the original hostname (SNI and certificate), because only the TCP connect is
   redirected.

Loopback can be allowed by configuration for dev and tests only; every other class stays refused.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from connector.errors import UnsafeURL

Resolver = Callable[[str, int], list[str]]

_METADATA = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
    ipaddress.ip_address("100.100.100.200"),
}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def classify(address: str) -> str | None:
    """Why ``address`` is refused (None when it is a public unicast address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return classify(str(mapped))
        if ip in ipaddress.ip_network("::/96"):  # IPv4-compatible (deprecated) form
            return classify(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    if ip in _METADATA:
        return "metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "cgnat"
    if ip.is_private:
        return "private"
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return None


def _refusal(address: str, allow_loopback: bool) -> str | None:
    why = classify(address)
    if why == "loopback" and allow_loopback:
        return None
    return why


def check_url(
    url: str, *, allow_loopback: bool = False, resolver: Resolver = system_resolver
) -> list[str]:
    """Raise :class:`UnsafeURL` unless every address of the URL's host is allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL(f"only http(s) URLs are allowed, not {parts.scheme!r}", url=url)
    if parts.username or parts.password:
        raise UnsafeURL("URLs with credentials are refused", url=url)
    host = parts.hostname
    if not host:
        raise UnsafeURL("URL has no host", url=url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return check_host(host, port, allow_loopback=allow_loopback, resolver=resolver)


def check_host(
    host: str, port: int, *, allow_loopback: bool, resolver: Resolver = system_resolver
) -> list[str]:
    try:
        addresses = [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        try:
            addresses = resolver(host, port)
        except OSError as exc:
            raise UnsafeURL(f"cannot resolve {host}: {exc}", host=host) from exc
    if not addresses:
        raise UnsafeURL(f"{host} resolves to no address", host=host)
    for address in addresses:
        why = _refusal(address, allow_loopback)
        if why is not None:
            raise UnsafeURL(
                f"{host} resolves to a {why} address ({address}); outbound calls there are refused",
                host=host,
                reason=why,
            )
    return addresses


def guard_for(
    *, allow_loopback: bool, resolver: Resolver = system_resolver
) -> Callable[[str], None]:
    def guard(url: str) -> None:
        check_url(url, allow_loopback=allow_loopback, resolver=resolver)

    return guard


class _GuardedBackend(httpcore.NetworkBackend):
    def __init__(self, allow_loopback: bool, resolver: Resolver) -> None:
        self._inner = httpcore.SyncBackend()
        self._allow_loopback = allow_loopback
        self._resolver = resolver

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = check_host(
            host, port, allow_loopback=self._allow_loopback, resolver=self._resolver
        )
        return self._inner.connect_tcp(addresses[0], port, timeout, local_address, socket_options)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise UnsafeURL("unix sockets are refused")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """An httpx transport that checks and pins the address at connect time."""

    def __init__(
        self,
        *,
        allow_loopback: bool = False,
        resolver: Resolver = system_resolver,
        limits: httpx.Limits | None = None,
        backend: httpcore.NetworkBackend | None = None,
    ) -> None:
        super().__init__()
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend or _GuardedBackend(allow_loopback, resolver),
        )
