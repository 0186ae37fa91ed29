"""SSRF guard for every outbound URL a customer controls: webhook targets, ``send`` URLs, and a
connection's RPC and facilitator URLs (used by actions and the connection test).

Two layers, both driven by one :class:`OutboundPolicy` built from the settings:

1. :meth:`OutboundPolicy.check_url` resolves the host and refuses private, loopback, link-local,
   multicast, reserved, CGNAT and cloud-metadata addresses (IPv4 and IPv6, including IPv4-mapped
   IPv6) and ambiguous numeric hosts (``0177.0.0.1``, ``2130706433``). It runs when a URL is
   written (connections, subscriptions) and before each request or redirect hop.
2. At connect time the check is repeated and the socket connects to the very address that was
   checked (:class:`GuardedTransport` for httpx, :meth:`OutboundPolicy.create_connection` for
   ``http.client``), so DNS rebinding (public at check time, private at connect time) cannot slip
   through. TLS still verifies the original hostname (SNI and certificate), because only the TCP
   connect is redirected.

Loopback can be allowed for dev and tests (``X402C_OUTBOUND_ALLOW_LOOPBACK``); an operator can
allow named hosts or networks for its own infrastructure (``X402C_OUTBOUND_ALLOW_HOSTS``, e.g. a
private RPC node). Cloud-metadata addresses are refused whatever is allowed.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpcore
import httpx

from connector.errors import UnsafeURL

Resolver = Callable[[str, int], list[str]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_METADATA = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
    ipaddress.ip_address("100.100.100.200"),
}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# Hosts made only of digits, dots and hex markers are IPv4 in some spelling resolvers accept
# (octal, hex, a single integer); only the canonical dotted-quad form is allowed.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]*))*\.?$", re.IGNORECASE)


class _Settings(Protocol):
    """The settings fields the policy reads (keeps this module free of the settings import)."""

    @property
    def outbound_loopback_allowed(self) -> bool: ...
    @property
    def outbound_allow_hosts(self) -> str: ...


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


def _parse_allow_hosts(spec: str) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for raw in spec.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.add(entry.rstrip("."))
    return frozenset(names), tuple(networks)


@dataclass(frozen=True)
class OutboundPolicy:
    """Where outbound calls may go; one instance serves every client of a process.

    ``allow_names`` are exact host names (``*.example.internal`` matches subdomains) that may
    resolve to private addresses; ``allow_networks`` are address ranges that may be reached.
    """

    allow_loopback: bool = False
    allow_names: frozenset[str] = frozenset()
    allow_networks: tuple[IPNetwork, ...] = ()
    resolver: Resolver = system_resolver

    @classmethod
    def from_settings(cls, settings: _Settings, resolver: Resolver | None = None) -> OutboundPolicy:
        names, networks = _parse_allow_hosts(settings.outbound_allow_hosts)
        return cls(
            allow_loopback=settings.outbound_loopback_allowed,
            allow_names=names,
            allow_networks=networks,
            resolver=resolver or system_resolver,
        )

    # ---------------------------------------------------------------------- checks

    def _name_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if host in self.allow_names:
            return True
        return any(name.startswith("*.") and host.endswith(name[1:]) for name in self.allow_names)

    def refusal(self, address: str, *, named: bool = False) -> str | None:
        """Why a connection to ``address`` is refused under this policy (None: allowed)."""
        why = classify(address)
        if why is None or why == "metadata":
            return why
        if why == "loopback" and self.allow_loopback:
            return None
        if named:
            return None
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip.version == net.version and ip in net for net in self.allow_networks):
            return None
        return why

    def check_url(self, url: str) -> list[str]:
        """Raise :class:`UnsafeURL` unless every address of the URL's host is allowed; returns
        the vetted addresses."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise UnsafeURL("malformed URL (host or port)", url=url[:200]) from exc
        if parts.scheme not in ("http", "https"):
            raise UnsafeURL(f"only http(s) URLs are allowed, not {parts.scheme[:20]!r}", url=url)
        if parts.username or parts.password:
            raise UnsafeURL("URLs with credentials are refused", url=url)
        host = parts.hostname
        if not host:
            raise UnsafeURL("URL has no host", url=url)
        port = port or (443 if parts.scheme == "https" else 80)
        return self.check_host(host, port)

    def check_host(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` and vet every address; returns the addresses to connect to."""
        bare = host.strip("[]")
        try:
            addresses = [str(ipaddress.ip_address(bare))]
        except ValueError:
            if _NUMERIC_HOST.match(bare):
                raise UnsafeURL(
                    f"{host[:100]} is a non-canonical numeric address; use the dotted form",
                    host=host[:100],
                    reason="ambiguous",
                ) from None
            try:
                addresses = self.resolver(bare, port)
            except (OSError, UnicodeError) as exc:
                raise UnsafeURL(f"cannot resolve {host[:100]}: {exc}", host=host[:100]) from exc
        if not addresses:
            raise UnsafeURL(f"{host[:100]} resolves to no address", host=host[:100])
        named = self._name_allowed(bare)
        for address in addresses:
            why = self.refusal(address, named=named)
            if why is not None:
                raise UnsafeURL(
                    f"{host[:100]} resolves to a {why} address ({address}); "
                    "outbound calls there are refused",
                    host=host[:100],
                    reason=why,
                )
        return addresses

    def guard(self) -> Callable[[str], None]:
        """A URL check for code that takes a ``guard(url)`` callable (redirect hops)."""

        def guard(url: str) -> None:
            self.check_url(url)

        return guard

    # ---------------------------------------------------------------------- connecting

    def transport(self, **kwargs: Any) -> GuardedTransport:
        """An httpx transport that checks and pins every connection under this policy."""
        return GuardedTransport(policy=self, **kwargs)

    def create_connection(
        self,
        address: tuple[str, int],
        timeout: float | None = None,
        source_address: tuple[str, int] | None = None,
    ) -> socket.socket:
        """``socket.create_connection`` for ``http.client``: vet, then connect to a vetted
        address (never a second resolution)."""
        host, port = address
        last: OSError | None = None
        for vetted in self.check_host(host, port):
            try:
                return socket.create_connection((vetted, port), timeout, source_address)
            except OSError as exc:
                last = exc
        assert last is not None
        raise last


def check_url(
    url: str, *, allow_loopback: bool = False, resolver: Resolver = system_resolver
) -> list[str]:
    """Raise :class:`UnsafeURL` unless every address of the URL's host is allowed."""
    return OutboundPolicy(allow_loopback=allow_loopback, resolver=resolver).check_url(url)


def check_host(
    host: str, port: int, *, allow_loopback: bool, resolver: Resolver = system_resolver
) -> list[str]:
    return OutboundPolicy(allow_loopback=allow_loopback, resolver=resolver).check_host(host, port)


def guard_for(
    *, allow_loopback: bool, resolver: Resolver = system_resolver
) -> Callable[[str], None]:
    return OutboundPolicy(allow_loopback=allow_loopback, resolver=resolver).guard()


_TLS: ssl.SSLContext | None = None
_TLS_LOCK = threading.Lock()


def shared_tls_context() -> ssl.SSLContext:
    """The process's default TLS client context (system CAs, hostname checks), built once.

    Building one loads the CA bundle (~20 ms of CPU here); every guarded transport used to build
    two, so a worker paid ~40 ms for each new RPC node, webhook receiver or paid URL, on the
    first job that met it. A context is safe to share between threads and connections.
    """
    global _TLS
    with _TLS_LOCK:
        if _TLS is None:
            _TLS = httpx.create_ssl_context()
        return _TLS


class _GuardedBackend(httpcore.NetworkBackend):
    def __init__(
        self, allow_loopback: bool, resolver: Resolver, policy: OutboundPolicy | None = None
    ) -> None:
        self._inner = httpcore.SyncBackend()
        self._policy = policy or OutboundPolicy(allow_loopback=allow_loopback, resolver=resolver)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self._policy.check_host(host, port)
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
        policy: OutboundPolicy | None = None,
        limits: httpx.Limits | None = None,
        backend: httpcore.NetworkBackend | None = None,
    ) -> None:
        tls = shared_tls_context()
        super().__init__(verify=tls)  # builds a pool we replace: at least not another context
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        self._pool = httpcore.ConnectionPool(
            ssl_context=tls,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend or _GuardedBackend(allow_loopback, resolver, policy),
        )
