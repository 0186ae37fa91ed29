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


# ---------------------------------------------------------------- the one policy (connector.net)


def test_the_old_import_path_is_the_new_module() -> None:
    from connector.net import ssrf as net_ssrf

    assert ssrf.check_url is net_ssrf.check_url
    assert ssrf.GuardedTransport is net_ssrf.GuardedTransport


def policy(**kwargs: Any) -> Any:
    from types import SimpleNamespace

    from connector.net.ssrf import OutboundPolicy

    settings = SimpleNamespace(
        outbound_loopback_allowed=kwargs.pop("loopback", False),
        outbound_allow_hosts=kwargs.pop("hosts", ""),
    )
    return OutboundPolicy.from_settings(settings, kwargs.pop("resolver"))


def test_operator_allowed_names_and_networks_open_exactly_themselves() -> None:
    names = {
        "rpc.internal": ["10.1.2.3"],
        "node.corp.example": ["10.9.9.9"],
        "other.internal": ["10.1.2.4"],
        "imds.internal": ["169.254.169.254"],
        "lan.example": ["192.168.5.5"],
    }
    p = policy(
        hosts="rpc.internal, *.corp.example, 192.168.5.0/24",
        resolver=lambda host, port: names[host],
    )
    assert p.check_url("http://rpc.internal:8545/") == ["10.1.2.3"]
    assert p.check_url("http://node.corp.example/") == ["10.9.9.9"]
    assert p.check_url("http://lan.example/") == ["192.168.5.5"]
    assert p.check_url("http://192.168.5.7/") == ["192.168.5.7"]
    for url in ("http://other.internal/", "http://10.1.2.3/", "http://127.0.0.1/"):
        with pytest.raises(UnsafeURL):
            p.check_url(url)
    with pytest.raises(UnsafeURL):  # metadata stays refused even for an allowed name
        policy(hosts="imds.internal", resolver=lambda h, p: names[h]).check_url(
            "http://imds.internal/"
        )
    with pytest.raises(UnsafeURL):
        policy(hosts="169.254.0.0/16", resolver=stub(["1.1.1.1"])).check_url(
            "http://169.254.169.254/"
        )


def test_settings_aliases_turn_on_the_one_loopback_switch(tmp_path: Any) -> None:
    from connector.settings import Settings

    assert not Settings(data_dir=tmp_path).outbound_loopback_allowed
    for name in ("outbound_allow_loopback", "webhook_allow_loopback", "send_allow_loopback"):
        assert Settings(data_dir=tmp_path, **{name: True}).outbound_loopback_allowed


@pytest.mark.parametrize(
    "url", ["http://0177.0.0.1/", "http://2130706433/", "http://0x7f.1/", "http://127.1/"]
)
def test_non_canonical_numeric_hosts_are_refused_without_resolving(url: str) -> None:
    resolver = stub(["93.184.216.34"])
    with pytest.raises(UnsafeURL):
        policy(loopback=True, resolver=resolver).check_url(url)
    assert resolver.calls == []


def test_malformed_ports_are_an_unsafe_url_not_a_crash() -> None:
    with pytest.raises(UnsafeURL):
        policy(resolver=stub(["93.184.216.34"])).check_url("http://a.example:99999/")


def test_create_connection_refuses_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    attempts: list[Any] = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: attempts.append(a))
    with pytest.raises(UnsafeURL):
        policy(resolver=stub(["10.0.0.1"])).create_connection(("svc.example", 80), 1.0, None)
    assert attempts == []
    policy(resolver=stub(["93.184.216.34"])).create_connection(("svc.example", 80), 1.0, None)
    assert attempts == [(("93.184.216.34", 80), 1.0, None)]  # the vetted address, not the name
