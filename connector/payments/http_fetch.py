"""Outbound HTTP for ``send``: bounded in time and size, guarded against SSRF, no auto-redirects.

A hostile or broken 402 server must not be able to hang a worker (slow drip), exhaust memory
(huge body) or steer us into the internal network (redirect to a private address). So:

* one overall deadline for the whole exchange, checked while the body streams in;
* the body is read up to ``max_bytes`` and the rest dropped (``truncated=True``);
* every URL, including each redirect hop we choose to follow, passes the caller's guard first.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx

from connector.errors import ExternalServiceError, UnsafeURL

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


class FetchFailed(ExternalServiceError):
    code = "fetch_failed"
    title = "The target URL could not be fetched"


@dataclass
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes
    truncated: bool
    url: str
    redirects: list[str] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def body_for_result(self) -> tuple[str, str]:
        """(text, encoding): UTF-8 text when it decodes, else base64."""
        try:
            return self.body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            return base64.b64encode(self.body).decode(), "base64"


URLGuard = Callable[[str], None]
#: Request headers meant for one origin only: dropped when a redirect leads to another origin.
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


def same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def without_credentials(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The caller's headers minus credentials, for a request to another origin than theirs."""
    return {k: v for k, v in (headers or {}).items() if k.lower() not in CREDENTIAL_HEADERS}


def _no_guard(url: str) -> None:
    return None


class HttpFetcher:
    def __init__(
        self,
        *,
        timeout_s: float = 15.0,
        max_bytes: int = 1024 * 1024,
        max_redirects: int = 3,
        guard: URLGuard = _no_guard,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.guard = guard
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
            follow_redirects=False,
            transport=transport,
            headers={"user-agent": "x402-connector"},
        )

    def close(self) -> None:
        self._client.close()

    def fetch(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        follow_redirects: bool = True,
    ) -> Fetched:
        """Send one request (following at most ``max_redirects`` guarded hops for GET/HEAD)."""
        deadline = time.monotonic() + self.timeout_s
        hops: list[str] = []
        current = url
        while True:
            self.guard(current)
            fetched = self._once(method, current, headers, body, deadline)
            fetched.redirects = hops
            location = fetched.header("location")
            can_follow = follow_redirects and method in ("GET", "HEAD")
            if fetched.status in REDIRECT_CODES and location and can_follow:
                if len(hops) >= self.max_redirects:
                    raise FetchFailed(
                        f"too many redirects (more than {self.max_redirects})",
                        retryable=False,
                        url=url,
                    )
                hops.append(current)
                nxt = urljoin(current, location)
                if not same_origin(current, nxt):
                    headers = without_credentials(headers)
                current = nxt
                continue
            return fetched

    def _once(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        body: bytes | None,
        deadline: float,
    ) -> Fetched:
        try:
            with self._client.stream(method, url, headers=dict(headers or {}), content=body) as r:
                chunks: list[bytes] = []
                size = 0
                truncated = False
                for chunk in r.iter_bytes():
                    if time.monotonic() > deadline:
                        raise FetchFailed(
                            f"{url} exceeded the {self.timeout_s:g}s deadline while sending "
                            "its body",
                            retryable=False,
                            url=url,
                        )
                    room = self.max_bytes - size
                    if len(chunk) > room:
                        chunks.append(chunk[:room])
                        truncated = True
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                return Fetched(
                    status=r.status_code,
                    headers={k.lower(): v for k, v in r.headers.items()},
                    body=b"".join(chunks),
                    truncated=truncated,
                    url=url,
                )
        except UnsafeURL:
            raise
        except httpx.TimeoutException as exc:
            raise FetchFailed(f"{url} timed out ({type(exc).__name__})", url=url) from exc
        except httpx.HTTPError as exc:
            raise FetchFailed(f"{url} failed: {type(exc).__name__}: {exc}", url=url) from exc
