"""A small, fast, thread-safe JSON-RPC chain client.

Why not web3.py on the hot path: building a contract call through web3 costs far more CPU than
the RPC itself on a local node, and web3 polls receipts every 100 ms by default, which caps a
facilitator at a handful of settles per second. This client encodes the few calls we need with
``eth_abi``, keeps one pooled HTTP connection per node, polls receipts every few milliseconds,
and allocates transaction nonces locally so many threads can send from one gas key at once.

Transport failures are retried with backoff (bounded); JSON-RPC errors are not, and surface as
:class:`RpcError` with the node's message.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address

from connector.chain import abi
from connector.errors import ExternalServiceError
from connector.logs import get_logger
from connector.retry import call_with_retries

log = get_logger(__name__)


def _node_message(message: object) -> str:
    """A JSON-RPC error's ``message`` (revert reasons are what operators need), bounded and
    printable; nothing else of a node's answer is ever quoted."""
    if not isinstance(message, str):
        return "error"
    return "".join(c if c.isprintable() else "?" for c in message[:200])


class RpcError(ExternalServiceError):
    code = "rpc_error"
    title = "Chain RPC error"


class TransactionReverted(ExternalServiceError):
    code = "transaction_reverted"
    title = "Transaction reverted"

    def __init__(self, detail: str, **context: Any) -> None:
        super().__init__(detail, retryable=False, **context)


@dataclass(frozen=True)
class Transfer:
    token: str
    from_: str
    to: str
    value: int
    log_index: int


@dataclass(frozen=True)
class Receipt:
    tx_hash: str
    status: int
    block_number: int
    logs: list[dict[str, Any]]
    gas_used: int


class _NonceAllocator:
    """Hands out consecutive nonces per sender; resynchronizes from the node after an error."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: dict[str, int] = {}

    def take(self, sender: str, fetch: Any) -> int:
        with self._lock:
            if sender not in self._next:
                self._next[sender] = int(fetch(sender))
            nonce = self._next[sender]
            self._next[sender] = nonce + 1
            return nonce

    def reset(self, sender: str) -> None:
        with self._lock:
            self._next.pop(sender, None)

    def reset_all(self) -> None:
        with self._lock:
            self._next.clear()


@dataclass
class _Waiter:
    done: threading.Event = field(default_factory=threading.Event)
    receipt: Receipt | None = None


class _ReceiptWatcher:
    """One daemon thread per client polling all pending receipts in one batch per tick."""

    def __init__(self, client: ChainClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._pending: dict[str, _Waiter] = {}
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="receipt-watcher", daemon=True).start()

    def watch(self, tx_hash: str) -> _Waiter:
        with self._lock:
            waiter = self._pending.setdefault(tx_hash, _Waiter())
        self._wake.set()
        return waiter

    def forget(self, tx_hash: str) -> None:
        with self._lock:
            self._pending.pop(tx_hash, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                hashes = list(self._pending)
            if not hashes:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                results = self._client.rpc_batch(
                    [("eth_getTransactionReceipt", [h]) for h in hashes]
                )
            except Exception:  # transient: the waiters time out on their own if it persists
                time.sleep(self._client.poll_interval_s * 10)
                continue
            for tx_hash, raw in zip(hashes, results, strict=True):
                if raw is None:
                    continue
                with self._lock:
                    waiter = self._pending.pop(tx_hash, None)
                if waiter is not None:
                    waiter.receipt = ChainClient._parse_receipt(tx_hash, raw)
                    waiter.done.set()
            time.sleep(self._client.poll_interval_s)


#: One JSON-RPC answer: (True, result) or (False, the node's bounded error message).
Answer = tuple[bool, Any]


@dataclass
class _Group:
    """Calls that must travel together (one :meth:`ChainClient.rpc_batch`), and their answers."""

    calls: list[tuple[str, list[Any]]]
    done: threading.Event = field(default_factory=threading.Event)
    answers: list[Answer] | None = None
    failure: RpcError | None = None  # the round trip itself failed (unreachable, HTTP error)
    lead: list[_Group] | None = None  # handed to this caller: the next round trip to make


class _Combiner:
    """Concurrent JSON-RPC calls share HTTP round trips (flat combining, no timer).

    A caller that finds no round trip in flight sends its call at once, exactly as without the
    combiner. Callers that arrive while one is in flight queue up; when it returns, the first of
    them sends everything queued as one JSON-RPC batch (up to ``max_calls``) and the others wait
    for their answers. A lone caller never waits; under load, N concurrent calls cost a few HTTP
    requests instead of N, on both sides of the connection.
    """

    def __init__(self, client: ChainClient, max_calls: int) -> None:
        self._client = client
        self._max_calls = max(1, max_calls)
        self._lock = threading.Lock()
        self._queue: list[_Group] = []
        self._busy = False
        self.round_trips = 0
        self.calls = 0

    @property
    def queued(self) -> int:
        """Calls waiting for the round trip in flight to return."""
        with self._lock:
            return sum(len(g.calls) for g in self._queue)

    def submit(self, calls: list[tuple[str, list[Any]]]) -> list[Answer]:
        group = _Group(calls)
        with self._lock:
            if self._busy:
                self._queue.append(group)
                mine = None
            else:
                self._busy = True
                mine = [group]
        if mine is None:
            group.done.wait()
            mine = group.lead
        if mine is not None:
            self._round_trip(mine)
        if group.failure is not None:
            raise RpcError(group.failure.detail, **group.failure.context) from group.failure
        assert group.answers is not None
        return group.answers

    def _round_trip(self, groups: list[_Group]) -> None:
        try:
            flat = [call for g in groups for call in g.calls]
            answers = self._client._exchange(flat)
            self.round_trips += 1
            self.calls += len(flat)
            start = 0
            for g in groups:
                g.answers = answers[start : start + len(g.calls)]
                start += len(g.calls)
        except RpcError as exc:
            for g in groups:
                g.failure = exc
        except BaseException as exc:  # never leave a waiter hanging
            for g in groups:
                g.failure = RpcError(f"RPC batch failed: {type(exc).__name__}")
            raise
        finally:
            with self._lock:
                following = self._take()
                if not following:
                    self._busy = False
            for g in groups:
                g.done.set()
            if following:
                following[0].lead = following
                following[0].done.set()

    def _take(self) -> list[_Group]:
        """The queued groups for the next round trip (always at least one, if any wait)."""
        taken: list[_Group] = []
        count = 0
        while self._queue and (not taken or count + len(self._queue[0].calls) <= self._max_calls):
            group = self._queue.pop(0)
            taken.append(group)
            count += len(group.calls)
        return taken


class ChainClient:
    _instances: weakref.WeakSet[ChainClient] = weakref.WeakSet()

    @classmethod
    def forget_all_nonces(cls) -> None:
        """Drop every cached transaction nonce (after a dev-chain snapshot revert)."""
        for client in list(cls._instances):
            client.forget_nonces()

    def forget_nonces(self) -> None:
        self._nonces.reset_all()

    def __init__(
        self,
        rpc_url: str,
        *,
        timeout_s: float = 10.0,
        poll_interval_s: float = 0.005,
        max_attempts: int = 3,
        transport: httpx.BaseTransport | None = None,
        fallback_urls: Sequence[str] = (),
        combine: bool = False,
        max_batch: int = 20,
        max_log_range: int = 2_000,
    ) -> None:
        """``combine``: concurrent calls from many threads share JSON-RPC batches (see
        :class:`_Combiner`); for a server settling many payments at once (the facilitator).
        ``max_batch`` bounds such a batch (providers cap batch sizes). ``max_log_range``: the
        widest block range one ``eth_getLogs`` of a history read may span (providers refuse
        wider ones; see :mod:`connector.chain.auth_capture`)."""
        self.rpc_url = rpc_url
        self.max_log_range = max(1, max_log_range)
        # Failover: when a node stops answering (transport errors after the retries, or 5xx),
        # the next URL serves, and stays active until it fails in turn.
        self._urls = [rpc_url, *fallback_urls]
        self._active = 0
        self.poll_interval_s = poll_interval_s
        self._attempts = max_attempts
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(3.0, timeout_s)),
            transport=transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            headers={"content-type": "application/json"},
        )
        self._ids = itertools.count(1)
        self._nonces = _NonceAllocator()
        self._chain_id: int | None = None
        self._gas_price: tuple[float, int] | None = None
        self._gas_lock = threading.Lock()
        self._receipts: _ReceiptWatcher | None = None
        self._domains: dict[str, tuple[str, str]] = {}
        self.nonce_errors = 0  # node refusals of a locally chosen nonce (should stay 0)
        self.combiner = _Combiner(self, max_batch) if combine else None
        ChainClient._instances.add(self)

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ JSON-RPC

    @property
    def active_url(self) -> str:
        return self._urls[self._active]

    def _post(self, body: Any, what: str) -> httpx.Response:
        """POST to the active node with bounded retries; fail over to the next URL when it is
        unreachable or answers 5xx (only while another URL remains to try)."""
        count = len(self._urls)
        start = self._active
        failure: BaseException | None = None
        for step in range(count):
            index = (start + step) % count
            url = self._urls[index]

            def once(url: str = url) -> httpx.Response:
                return self._http.post(url, json=body)

            try:
                response = call_with_retries(
                    once,
                    retry_on=(httpx.TransportError,),
                    attempts=self._attempts,
                    base=0.1,
                    cap=1.0,
                )
            except httpx.TransportError as exc:
                failure = exc
                continue
            if response.status_code >= 500 and step < count - 1:
                failure = RpcError(f"RPC {what} answered HTTP {response.status_code}")
                continue
            if index != self._active:
                self._active = index
                log.warning("rpc failover", extra={"rpc_index": index, "rpc_method": what})
            return response
        where = f" on all {count} endpoints" if count > 1 else ""
        raise RpcError(
            f"RPC {what} unreachable after {self._attempts} attempts{where}: "
            f"{type(failure).__name__}",
            rpc_method=what,
        ) from failure

    def rpc(self, method: str, params: list[Any]) -> Any:
        ok, value = self._answers([(method, params)])[0]
        if not ok:
            raise RpcError(f"RPC {method} failed: {value}", rpc_method=method, retryable=False)
        return value

    def rpc_batch(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """Several calls in one HTTP round trip (JSON-RPC batch); results in call order."""
        if not calls:
            return []
        results = []
        for (method, _), (ok, value) in zip(calls, self._answers(calls), strict=True):
            if not ok:
                raise RpcError(f"RPC {method} failed: {value}", rpc_method=method, retryable=False)
            results.append(value)
        return results

    def _answers(self, calls: list[tuple[str, list[Any]]]) -> list[Answer]:
        if self.combiner is not None:
            return self.combiner.submit(calls)
        return self._exchange(calls)

    def _exchange(self, calls: list[tuple[str, list[Any]]]) -> list[Answer]:
        """One HTTP round trip: a plain JSON-RPC request for one call, a batch for several.
        Raises :class:`RpcError` when the round trip fails; a call's own error is its answer."""
        what = calls[0][0] if len(calls) == 1 else "batch"
        if len(calls) == 1:
            method, params = calls[0]
            body: Any = {"jsonrpc": "2.0", "id": next(self._ids), "method": method,
                         "params": params}  # fmt: skip
        else:
            body = [
                {"jsonrpc": "2.0", "id": i, "method": method, "params": params}
                for i, (method, params) in enumerate(calls)
            ]
        response = self._post(body, what)
        if response.status_code != 200:
            raise RpcError(f"RPC {what} answered HTTP {response.status_code}", rpc_method=what)
        try:
            data = response.json()
        except ValueError as exc:
            raise RpcError(f"RPC {what} answered non-JSON", rpc_method=what) from exc
        if len(calls) == 1:
            if not isinstance(data, dict):
                raise RpcError(f"RPC {what} answered a non-object", rpc_method=what)
            return [self._answer(data)]
        if not isinstance(data, list):
            raise RpcError("RPC batch answered a non-list", retryable=False)
        by_id = {item.get("id"): item for item in data if isinstance(item, dict)}
        return [self._answer(by_id.get(i) or {}) for i in range(len(calls))]

    @staticmethod
    def _answer(item: dict[str, Any]) -> Answer:
        err = item.get("error")
        if err:
            return False, _node_message(err.get("message") if isinstance(err, dict) else None)
        return True, item.get("result")

    # ------------------------------------------------------------------ reads

    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(self.rpc("eth_chainId", []), 16)
        return self._chain_id

    def block_number(self) -> int:
        return int(self.rpc("eth_blockNumber", []), 16)

    def latest_block_timestamp(self) -> int:
        block = self.rpc("eth_getBlockByNumber", ["latest", False])
        return int(block["timestamp"], 16)

    def native_balance(self, address: str) -> int:
        return int(self.rpc("eth_getBalance", [to_checksum_address(address), "latest"]), 16)

    def eth_call(self, to: str, data: str) -> str:
        result = self.rpc("eth_call", [{"to": to_checksum_address(to), "data": data}, "latest"])
        return str(result)

    def token_balance(self, asset: str, owner: str) -> int:
        data = abi.call_data(abi.BALANCE_OF, ["address"], [to_checksum_address(owner)])
        value = abi.decode_one("uint256", self.eth_call(asset, data))
        assert isinstance(value, int)
        return value

    def authorization_state(self, asset: str, authorizer: str, nonce: str) -> bool:
        data = abi.call_data(
            abi.AUTHORIZATION_STATE,
            ["address", "bytes32"],
            [to_checksum_address(authorizer), bytes.fromhex(nonce.removeprefix("0x"))],
        )
        return bool(abi.decode_one("bool", self.eth_call(asset, data)))

    def authorization_and_balance(
        self, asset: str, authorizer: str, nonce: str
    ) -> tuple[bool, int]:
        """Both verification reads in one round trip."""
        owner = to_checksum_address(authorizer)
        state = abi.call_data(
            abi.AUTHORIZATION_STATE,
            ["address", "bytes32"],
            [owner, bytes.fromhex(nonce.removeprefix("0x"))],
        )
        balance = abi.call_data(abi.BALANCE_OF, ["address"], [owner])
        to = to_checksum_address(asset)
        used, amount = self.rpc_batch(
            [
                ("eth_call", [{"to": to, "data": state}, "latest"]),
                ("eth_call", [{"to": to, "data": balance}, "latest"]),
            ]
        )
        value = abi.decode_one("uint256", str(amount))
        assert isinstance(value, int)
        return bool(abi.decode_one("bool", str(used))), value

    # The verifier's TokenStateReader protocol.
    def balance_of(self, asset: str, owner: str) -> int:
        return self.token_balance(asset, owner)

    def authorization_used(self, asset: str, authorizer: str, nonce: str) -> bool:
        return self.authorization_state(asset, authorizer, nonce)

    def cached_token_domain(self, asset: str) -> tuple[str, str] | None:
        """The domain if :meth:`token_domain` has read it before (no network call)."""
        return self._domains.get(asset.lower())

    def token_domain(self, asset: str) -> tuple[str, str]:
        """The token's EIP-712 name and version, read from the contract once and cached
        (a deployed token's domain does not change)."""
        key = asset.lower()
        cached = self._domains.get(key)
        if cached is not None:
            return cached
        name = abi.decode_one("string", self.eth_call(asset, "0x" + abi.NAME.hex()))
        version = abi.decode_one("string", self.eth_call(asset, "0x" + abi.VERSION.hex()))
        self._domains[key] = (str(name), str(version))
        return self._domains[key]

    # ------------------------------------------------------------------ transactions

    def _gas_price_now(self) -> int:
        with self._gas_lock:
            now = time.monotonic()
            if self._gas_price is None or now - self._gas_price[0] > 5.0:
                self._gas_price = (now, int(self.rpc("eth_gasPrice", []), 16))
            return self._gas_price[1]

    def send_transaction(
        self, signer: LocalAccount, to: str | None, data: str, *, gas: int = 200_000, value: int = 0
    ) -> str:
        """Sign locally and broadcast; returns the transaction hash."""
        sender = signer.address
        for attempt in range(3):
            nonce = self._nonces.take(
                sender, lambda a: int(self.rpc("eth_getTransactionCount", [a, "pending"]), 16)
            )
            tx: dict[str, Any] = {
                "nonce": nonce,
                "gas": gas,
                "gasPrice": self._gas_price_now() * 2,
                "value": value,
                "data": data,
                "chainId": self.chain_id(),
            }
            if to is not None:
                tx["to"] = to_checksum_address(to)
            raw = signer.sign_transaction(tx).raw_transaction
            try:
                return str(self.rpc("eth_sendRawTransaction", ["0x" + raw.hex()]))
            except RpcError as exc:
                lowered = exc.detail.lower()
                if "nonce" in lowered:
                    self.nonce_errors += 1  # a local allocation the node disagreed with
                if "nonce" in lowered and attempt < 2:
                    self._nonces.reset(sender)
                    continue
                raise
        raise RpcError("could not find a usable nonce", sender=sender)

    def get_receipt(self, tx_hash: str) -> Receipt | None:
        raw = self.rpc("eth_getTransactionReceipt", [tx_hash])
        if raw is None:
            return None
        return self._parse_receipt(tx_hash, raw)

    def wait_for_confirmations(
        self, receipt: Receipt, confirmations: int, *, timeout_s: float
    ) -> bool:
        """Whether ``receipt``'s block is ``confirmations`` deep (its own block counted), waiting
        up to ``timeout_s`` for it. False when it is not deep enough in time: the transaction is
        mined but its outcome may still be undone, so it is reported as pending, never final."""
        if confirmations <= 1:
            return True
        deadline = time.monotonic() + timeout_s
        while True:
            if self.block_number() - receipt.block_number + 1 >= confirmations:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.25, max(0.01, timeout_s / 20)))

    def wait_for_receipt(
        self, tx_hash: str, *, timeout_s: float = 30.0, poll_interval_s: float | None = None
    ) -> Receipt:
        """Wait for a receipt. Concurrent waiters share one poller that asks for every pending
        receipt in a single batch per tick, so N waiting threads cost one request, not N."""
        receipt = self.get_receipt(tx_hash)
        if receipt is not None:
            return receipt
        waiter = self._watcher().watch(tx_hash)
        if not waiter.done.wait(timeout_s):
            self._watcher().forget(tx_hash)
            raise RpcError(f"no receipt for {tx_hash} within {timeout_s:g}s", tx_hash=tx_hash)
        assert waiter.receipt is not None
        return waiter.receipt

    def _watcher(self) -> _ReceiptWatcher:
        with self._gas_lock:
            if self._receipts is None:
                self._receipts = _ReceiptWatcher(self)
            return self._receipts

    @staticmethod
    def _parse_receipt(tx_hash: str, raw: dict[str, Any]) -> Receipt:
        return Receipt(
            tx_hash=tx_hash,
            status=int(raw["status"], 16),
            block_number=int(raw["blockNumber"], 16),
            logs=list(raw.get("logs") or []),
            gas_used=int(raw.get("gasUsed", "0x0"), 16),
        )

    def send_transfer_with_authorization(
        self,
        asset: str,
        *,
        from_: str,
        to: str,
        value: int,
        valid_after: int,
        valid_before: int,
        nonce: str,
        signature: bytes,
        gas_key: LocalAccount,
        form: str = "bytes",
    ) -> str:
        data = abi.transfer_with_authorization_data(
            to_checksum_address(from_),
            to_checksum_address(to),
            value,
            valid_after,
            valid_before,
            bytes.fromhex(nonce.removeprefix("0x")),
            signature,
            form,
        )
        return self.send_transaction(gas_key, asset, data, gas=150_000)

    def simulate_transfer_with_authorization(
        self,
        asset: str,
        *,
        from_: str,
        to: str,
        value: int,
        valid_after: int,
        valid_before: int,
        nonce: str,
        signature: bytes,
        sender: str,
    ) -> str | None:
        """``None`` when the call would succeed, else the node's revert message."""
        data = abi.transfer_with_authorization_data(
            to_checksum_address(from_),
            to_checksum_address(to),
            value,
            valid_after,
            valid_before,
            bytes.fromhex(nonce.removeprefix("0x")),
            signature,
        )
        try:
            self.rpc(
                "eth_call",
                [{"from": to_checksum_address(sender), "to": asset, "data": data}, "latest"],
            )
        except RpcError as exc:
            return exc.detail
        return None

    def token_transfers(self, receipt: Receipt, asset: str | None = None) -> list[Transfer]:
        found = []
        for log in receipt.logs:
            topics = log.get("topics") or []
            if not topics or topics[0] != abi.TRANSFER_TOPIC or len(topics) < 3:
                continue
            token = to_checksum_address(log["address"])
            if asset is not None and token.lower() != asset.lower():
                continue
            found.append(
                Transfer(
                    token=token,
                    from_=abi.topic_address(topics[1]),
                    to=abi.topic_address(topics[2]),
                    value=int(log["data"], 16),
                    log_index=int(log["logIndex"], 16),
                )
            )
        return found

    def find_token_transfers(self, tx_hash: str, asset: str | None = None) -> list[Transfer]:
        receipt = self.get_receipt(tx_hash)
        return [] if receipt is None else self.token_transfers(receipt, asset)

    def confirmations(self, tx_hash: str) -> int:
        receipt = self.get_receipt(tx_hash)
        if receipt is None:
            return 0
        return self.block_number() - receipt.block_number + 1

    def find_authorization_tx(self, asset: str, authorizer: str, nonce: str) -> str | None:
        """The transaction that used ``nonce`` (from the ``AuthorizationUsed`` log), if any."""
        logs = self.rpc(
            "eth_getLogs",
            [
                {
                    "address": to_checksum_address(asset),
                    "fromBlock": "0x0",
                    "toBlock": "latest",
                    "topics": [
                        abi.AUTHORIZATION_USED_TOPIC,
                        abi.address_topic(authorizer),
                        "0x" + nonce.removeprefix("0x").rjust(64, "0"),
                    ],
                }
            ],
        )
        return str(logs[0]["transactionHash"]) if logs else None

    def deploy(self, signer: LocalAccount, bytecode_and_args: str, gas: int = 3_000_000) -> str:
        tx_hash = self.send_transaction(signer, None, bytecode_and_args, gas=gas)
        receipt = self.wait_for_receipt(tx_hash)
        if receipt.status != 1:
            raise TransactionReverted(f"deployment {tx_hash} reverted", tx_hash=tx_hash)
        raw = self.rpc("eth_getTransactionReceipt", [tx_hash])
        return to_checksum_address(raw["contractAddress"])

    def try_call(self, to: str, data: str, *, sender: str | None = None) -> tuple[bool, bytes]:
        """``eth_call`` that keeps a revert's data: (True, return data) or (False, revert data).

        Needed to decode custom errors (a contract's typed revert reason), which :meth:`rpc`
        reduces to a message. Transport failures still raise :class:`RpcError`."""
        call: dict[str, Any] = {"to": to_checksum_address(to), "data": data}
        if sender is not None:
            call["from"] = to_checksum_address(sender)
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": "eth_call",
                "params": [call, "latest"]}  # fmt: skip

        def once() -> httpx.Response:
            return self._http.post(self.rpc_url, json=body)

        try:
            response = call_with_retries(
                once, retry_on=(httpx.TransportError,), attempts=self._attempts, base=0.1, cap=1.0
            )
            payload = response.json()
        except (httpx.TransportError, ValueError) as exc:
            raise RpcError(
                f"RPC eth_call failed: {type(exc).__name__}", rpc_method="eth_call"
            ) from exc
        if not isinstance(payload, dict):
            raise RpcError("RPC eth_call answered a non-object", rpc_method="eth_call")
        error = payload.get("error")
        if error:
            raw = error.get("data") if isinstance(error, dict) else None
            if isinstance(raw, dict):  # some nodes nest it
                raw = raw.get("data")
            if not isinstance(raw, str) or not raw.startswith("0x"):
                message = _node_message(error.get("message") if isinstance(error, dict) else None)
                if "revert" not in message.lower():
                    raise RpcError(f"RPC eth_call failed: {message}", rpc_method="eth_call")
                return False, b""
            try:
                return False, bytes.fromhex(raw[2:])
            except ValueError:
                return False, b""
        result = payload.get("result")
        return True, bytes.fromhex(str(result or "0x")[2:])
