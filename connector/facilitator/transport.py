"""Keep-alive HTTP/1.1 for the facilitator: the standard library's ``http.client``, pooled.

Every payment calls the facilitator once, so this client's CPU is paid on every payment. httpx
spends about 1.3 ms of CPU per JSON request on this machine, ``http.client`` about 0.5 ms (see
docs/decisions/0003-payment-hot-path.md). The price of the shortcut is features the facilitator
call does not need: no redirects (a facilitator that redirects is misconfigured), no HTTP/2, no
cookies. When an HTTP proxy is configured for the facilitator's URL, the client falls back to
httpx, which honours it (see :func:`proxied`).

Failures before a complete answer (refused, reset, timeout, a malformed status line) raise
:class:`TransportFailure`; the caller decides about retrying. A request that finds a pooled
connection closed by the server (keep-alive timeout) is re-sent once on a new connection, which
is safe for the facilitator's endpoints: ``/verify`` reads, ``/settle`` is idempotent per
authorization nonce.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

#: ``socket.create_connection``'s signature; the SSRF guard supplies one that vets the address.
CreateConnection = Callable[[tuple[str, int], float | None, tuple[str, int] | None], socket.socket]


class TransportFailure(Exception):
    """No complete HTTP answer was received."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    complete: bool = True  # False: the body was longer than the limit and was cut there


# Errors that mean "the idle connection we reused was already closed by the server".
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def proxied(url: str) -> bool:
    """True when the environment routes ``url`` through a proxy (``HTTPS_PROXY``, ``NO_PROXY``)."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if parts.scheme not in proxies:
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")


class KeepAliveClient:
    """Requests to one origin over a small pool of persistent connections; thread-safe."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str],
        timeout_s: float,
        connect_timeout_s: float,
        max_body_bytes: int = 1 << 20,
        max_idle: int = 16,
        create_connection: CreateConnection | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        host_header = parts.netloc.rsplit("@", 1)[-1]
        self._headers = {"host": host_header, "connection": "keep-alive", **headers}
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_body = max_body_bytes
        self._max_idle = max_idle
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._tls = ssl.create_default_context() if self._https else None
        self._create_connection = create_connection

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """``headers``: extra headers for this request only (a per-request auth token)."""
        conn: http.client.HTTPConnection | None = None
        try:
            conn, reused = self._checkout()
            try:
                return self._exchange(conn, method, path, body, headers)
            except _STALE:
                if not reused:
                    raise
                conn.close()
                conn = None
                conn = self._connect()  # the server closed an idle connection: once more
                return self._exchange(conn, method, path, body, headers)
        except (OSError, http.client.HTTPException) as exc:
            if conn is not None:
                conn.close()
            raise TransportFailure(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise

    # ------------------------------------------------------------------ internals

    def _checkout(self) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._tls is not None:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._connect_timeout_s, context=self._tls
            )
        else:
            conn = http.client.HTTPConnection(
                self._host, self._port, timeout=self._connect_timeout_s
            )
        if self._create_connection is not None:
            # http.client opens its socket through this hook (TLS then wraps it with the URL's
            # hostname), so a guard can vet the address and connect to exactly that address.
            conn._create_connection = self._create_connection  # type: ignore[attr-defined]
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self._timeout_s)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: bytes | None,
        extra: dict[str, str] | None = None,
    ) -> Answer:
        headers = {**self._headers, **(extra or {})}
        if body is not None:
            headers["content-type"] = "application/json"
        # skip_host: our own Host header (with the port as given in the URL).
        conn.putrequest(method, self._prefix + path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)  # headers and body leave in one send(): no Nagle/delayed-ACK stall
        response = conn.getresponse()
        data = response.read(self._max_body + 1)
        if len(data) > self._max_body:
            conn.close()  # the rest is unread: this connection cannot be reused
            return Answer(response.status, data[: self._max_body], complete=False)
        if response.will_close:
            conn.close()
        else:
            self._checkin(conn)
        return Answer(response.status, data)

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()
