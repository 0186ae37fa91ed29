"""The two chain reads that verify an EIP-3009 payment, over the standard library's HTTP client.

A paywall checks every automatically captured payment itself (decision 0012): is the
authorization's nonce unused, does the payer hold the amount. That is one JSON-RPC batch of two
``eth_call`` per paid request, so its client's CPU is paid on every payment: httpx spends about
twice what pooled ``http.client`` does per small JSON request here (the facilitator client made
the same choice, :mod:`connector.facilitator.transport`). This reader does only that batch; the
general :class:`~connector.chain.client.ChainClient` (failover, retries, receipts, nonces) is
untouched. Where the shortcut does not apply (an HTTP proxy in the environment, credentials in
the URL) :func:`reader_for` hands out the general client instead.

Every connection goes through the outbound guard (:class:`~connector.net.ssrf.OutboundPolicy`),
vetted and pinned at connect time. Any failure raises :class:`~connector.chain.client.RpcError`;
the caller decides (the paywall then asks the facilitator's ``/verify``).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from connector.chain import abi
from connector.chain.client import RpcError
from connector.facilitator.transport import KeepAliveClient, TransportFailure, proxied
from connector.net.ssrf import OutboundPolicy

_MAX_ANSWER = 64 * 1024  # two eth_call results are a few hundred bytes
# The calls' data, ABI-encoded by hand: both take static arguments only (an address, a bytes32),
# each one 32-byte word, so encoding is padding hex (eth_abi's codec cost more than the call).
_SELECT_STATE = "0x" + abi.AUTHORIZATION_STATE.hex()
_SELECT_BALANCE = "0x" + abi.BALANCE_OF.hex()
_HEX = frozenset("0123456789abcdef")


def _word(value: str, digits: int) -> str:
    """``value`` (0x-hex of ``digits`` digits: an address, a bytes32) as one ABI word."""
    raw = value.removeprefix("0x").lower()
    if len(raw) != digits or not _HEX.issuperset(raw):
        raise ValueError(f"expected {digits} hex digits")
    return raw.rjust(64, "0")


def _uint(result: str) -> int:
    """A one-word ``eth_call`` result (uint256 or bool). Anything else (no contract at the
    address answers ``0x``) is not an answer to rely on."""
    raw = result.removeprefix("0x")
    if len(raw) != 64 or not _HEX.issuperset(raw.lower()):
        raise RpcError("RPC eth_call answered an unexpected value", rpc_method="eth_call")
    return int(raw, 16)


class PaymentStateReader:
    """``authorizationState`` and ``balanceOf`` of one payer in one round trip; thread-safe."""

    def __init__(self, rpc_url: str, *, timeout_s: float, guard: OutboundPolicy | None) -> None:
        parts = urlsplit(rpc_url)
        # KeepAliveClient sends to the URL's path without its trailing slash, plus what we add.
        self._target = "/" if parts.path.endswith("/") or not parts.path else ""
        if parts.query:
            self._target += "?" + parts.query
        self.rpc_url = rpc_url
        self._http = KeepAliveClient(
            rpc_url,
            headers={"accept": "application/json", "user-agent": "x402-connector"},
            timeout_s=timeout_s,
            connect_timeout_s=min(3.0, timeout_s),
            max_body_bytes=_MAX_ANSWER,
            create_connection=guard.create_connection if guard is not None else None,
        )

    def close(self) -> None:
        self._http.close()

    def authorization_and_balance(
        self, asset: str, authorizer: str, nonce: str
    ) -> tuple[bool, int]:
        """Whether ``nonce`` of ``authorizer`` is used on ``asset``, and its balance there."""
        owner = _word(authorizer, 40)
        state = _SELECT_STATE + owner + _word(nonce, 64)
        used, amount = self._calls(asset, [state, _SELECT_BALANCE + owner])
        return _uint(used) != 0, _uint(amount)

    # The verifier's TokenStateReader protocol.
    def authorization_used(self, asset: str, authorizer: str, nonce: str) -> bool:
        return self.authorization_and_balance(asset, authorizer, nonce)[0]

    def balance_of(self, asset: str, owner: str) -> int:
        return _uint(self._calls(asset, [_SELECT_BALANCE + _word(owner, 40)])[0])

    def _calls(self, asset: str, data: list[str]) -> list[Any]:
        """``eth_call`` each of ``data`` on ``asset`` at the latest block, as one batch."""
        to = "0x" + _word(asset, 40)[24:]
        calls = [
            {"jsonrpc": "2.0", "id": i, "method": "eth_call",
             "params": [{"to": to, "data": d}, "latest"]}
            for i, d in enumerate(data)
        ]  # fmt: skip
        try:
            answer = self._http.request(
                "POST", self._target, json.dumps(calls, separators=(",", ":")).encode()
            )
        except TransportFailure as exc:
            raise RpcError(f"RPC eth_call unreachable: {exc}", rpc_method="eth_call") from exc
        if answer.status != 200 or not answer.complete:
            raise RpcError(f"RPC eth_call answered HTTP {answer.status}", rpc_method="eth_call")
        try:
            items = json.loads(answer.body)
        except ValueError as exc:
            raise RpcError("RPC eth_call answered non-JSON", rpc_method="eth_call") from exc
        if not isinstance(items, list):
            raise RpcError("RPC eth_call batch answered a non-list", rpc_method="eth_call")
        by_id = {item.get("id"): item for item in items if isinstance(item, dict)}
        results = []
        for call in calls:
            item = by_id.get(call["id"]) or {}
            if item.get("error") or not isinstance(item.get("result"), str):
                # The node's message is not quoted: the caller only needs to know it failed.
                raise RpcError("RPC eth_call failed", rpc_method="eth_call", retryable=False)
            results.append(item["result"])
        return results


def lightweight(rpc_url: str) -> bool:
    """Whether :class:`PaymentStateReader` can serve ``rpc_url``: plain http(s), no credentials
    in the URL, no proxy configured for it."""
    parts = urlsplit(rpc_url)
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and parts.username is None
        and not proxied(rpc_url)
    )
