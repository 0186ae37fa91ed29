"""The SSRF guard refuses private targets before any connection is attempted.

Resolution is stubbed; the only network traffic in this file is none at all: the recording
backend below proves that no TCP connect was even tried.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from connector.errors import UnsafeURL
from connector.webhooks import ssrf

PRIVATE = [
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "127.0.0.1",
    "127.8.9.10",
    "169.254.169.254",
    "169.254.1.1",
    "::1",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:127.0.0.1",
]


def stub(*answers: list[str]) -> Any:
    calls: list[str] = []
    queue = list(answers)

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return queue.pop(0) if len(queue) > 1 else queue[0]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


@pytest.mark.parametrize("address", PRIVATE)
def test_private_addresses_are_refused(address: str) -> None:
    with pytest.raises(UnsafeURL):
        ssrf.check_url("https://hooks.example.com/x", resolver=stub([address]))


@pytest.mark.parametrize("address", ["10.0.0.1", "[::1]", "[fc00::5]", "169.254.169.254"])
def test_literal_private_hosts_are_refused_without_resolving(address: str) -> None:
    resolver = stub(["93.184.216.34"])
    with pytest.raises(UnsafeURL):
        ssrf.check_url(f"http://{address}/x", resolver=resolver)
    assert resolver.calls == []


def test_public_address_passes_and_loopback_only_when_allowed() -> None:
    assert ssrf.check_url("https://a.example/", resolver=stub(["93.184.216.34"])) == [
        "93.184.216.34"
    ]
    ssrf.check_url("http://localhost:9/", allow_loopback=True, resolver=stub(["127.0.0.1"]))
    with pytest.raises(UnsafeURL):  # loopback allowance does not open private ranges
        ssrf.check_url("http://x.example/", allow_loopback=True, resolver=stub(["10.0.0.1"]))


def test_one_private_answer_among_public_ones_is_refused() -> None:
    with pytest.raises(UnsafeURL):
        ssrf.check_url("https://a.example/", resolver=stub(["93.184.216.34", "10.0.0.7"]))


@pytest.mark.parametrize(
    "url", ["ftp://a.example/", "http://user:pw@a.example/", "file:///etc/passwd"]
)
def test_bad_schemes_and_credentials_are_refused(url: str) -> None:
    with pytest.raises(UnsafeURL):
        ssrf.check_url(url, resolver=stub(["93.184.216.34"]))


class Recording(ssrf._GuardedBackend):
    def __init__(self, resolver: Any) -> None:
        super().__init__(False, resolver)
        self.connects: list[tuple[str, int]] = []

        class Inner:
            def connect_tcp(inner_self, host: str, port: int, *a: Any, **k: Any) -> Any:
                self.connects.append((host, port))
                raise OSError("test backend never connects")

        self._inner = Inner()  # type: ignore[assignment]


def test_dns_rebinding_is_caught_at_connect_time_before_connecting() -> None:
    # First answer (guard) is public, second (connect) is private: the rebinding attack.
    resolver = stub(["93.184.216.34"], ["10.0.0.1"])
    ssrf.check_url("http://rebind.example/", resolver=resolver)
    backend = Recording(resolver)
    with pytest.raises(UnsafeURL):
        backend.connect_tcp("rebind.example", 80)
    assert backend.connects == []


def test_transport_connects_to_the_checked_address_only() -> None:
    backend = Recording(stub(["93.184.216.34"]))
    with pytest.raises(OSError):
        backend.connect_tcp("public.example", 443)
    assert backend.connects == [("93.184.216.34", 443)]


def test_guarded_transport_refuses_private_hosts_through_httpx() -> None:
    backend = Recording(stub(["192.168.0.10"]))
    transport = ssrf.GuardedTransport(backend=backend)
    with httpx.Client(transport=transport) as client, pytest.raises(UnsafeURL):
        client.get("http://printer.example/")
    assert backend.connects == []
