"""Escrow calls for ``authCapture``: read payment state, simulate, submit, decode reverts.

Thin on purpose: calldata and reason codes come from :mod:`connector.x402.auth_capture`; this
adds the chain round trips (one ``eth_call`` per read or simulation, one transaction per
operation) through :class:`~connector.chain.client.ChainClient`, which already carries timeouts
and bounded retries.

Event history is read the way public providers allow it: ``eth_getLogs`` over bounded block
ranges (``ChainClient.max_log_range`` blocks each, walking forward from a lower bound the caller
gives), never from genesis to ``latest``, which Base's public RPC, Alchemy or Infura refuse once
a chain is a few thousand blocks long.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_abi.abi import encode
from eth_account.signers.local import LocalAccount

from connector.chain.client import ChainClient, Receipt
from connector.x402 import auth_capture as ac

#: Gas for one escrow operation (authorize/charge with a first token-store deployment is the
#: heaviest, ~300k on anvil); the simulation runs first, so an over-cap call never broadcasts.
ESCROW_GAS = 600_000

#: Most ``eth_getLogs`` ranges one read of one payment walks: a payment far behind (a connector
#: that was down for days, an old record) catches up over several reads, each of them bounded.
MAX_RANGES_PER_READ = 25
#: Calls per JSON-RPC batch of a history read (providers cap batch sizes too).
BATCH_CALLS = 100


@dataclass(frozen=True)
class EscrowSnapshot:
    """One payment in the escrow: its ``paymentState`` as of block ``block``, and its events
    found in the logs of blocks ``start`` through ``scanned_to``.

    ``block`` is the newest block deep enough to count (``head - confirmations + 1``): events
    after it are mined but not confirmed yet (:attr:`unconfirmed`), and the state is read there
    so that it must equal a replay of the confirmed events. ``scanned_to`` is ``head`` unless
    the range was too long for one read (:data:`MAX_RANGES_PER_READ`)."""

    block: int
    state: ac.EscrowState
    events: list[ac.EscrowEvent]
    head: int
    start: int
    scanned_to: int

    @property
    def confirmed(self) -> list[ac.EscrowEvent]:
        return [e for e in self.events if e.block_number <= self.block]

    @property
    def unconfirmed(self) -> list[ac.EscrowEvent]:
        return [e for e in self.events if e.block_number > self.block]

    @property
    def complete(self) -> bool:
        """The logs were read through the head: an operation absent from them did not happen
        (as of ``head``)."""
        return self.scanned_to >= self.head


def _decoded(logs: Any) -> list[ac.EscrowEvent]:
    events = [e for e in (ac.decode_escrow_log(log) for log in logs or []) if e is not None]
    return sorted(events, key=lambda e: (e.block_number, e.log_index))


def log_ranges(
    start: int, end: int, max_range: int, *, limit: int | None = MAX_RANGES_PER_READ
) -> list[tuple[int, int]]:
    """``start..end`` (inclusive) cut into ranges of at most ``max_range`` blocks, walking
    forward, at most ``limit`` of them (None: all). Empty when ``start > end``."""
    out: list[tuple[int, int]] = []
    low = max(0, start)
    while low <= end and (limit is None or len(out) < limit):
        high = min(end, low + max_range - 1)
        out.append((low, high))
        low = high + 1
    return out


def _batched(client: ChainClient, calls: list[tuple[str, list[Any]]]) -> list[Any]:
    results: list[Any] = []
    for start in range(0, len(calls), BATCH_CALLS):
        results.extend(client.rpc_batch(calls[start : start + BATCH_CALLS]))
    return results


def snapshots(
    client: ChainClient,
    requests: list[tuple[EscrowClient, ac.PaymentInfo, int]],
    *,
    confirmations: int = 1,
) -> list[EscrowSnapshot]:
    """Snapshots of many payments (``(escrow, terms, from_block)`` each), all as of the same
    block: one ``eth_blockNumber``, then per payment one ``eth_call`` and one ``eth_getLogs``
    per range of at most ``client.max_log_range`` blocks from ``from_block`` to the head, in
    JSON-RPC batches of :data:`BATCH_CALLS` calls — a reconcile pass costs a few round trips
    rather than several per payment, and never asks a provider for a range it refuses."""
    if not requests:
        return []
    head = client.block_number()
    block = max(0, head - max(1, confirmations) + 1)
    calls: list[tuple[str, list[Any]]] = []
    plans: list[tuple[int, int, list[tuple[int, int]]]] = []
    for escrow, info, from_block in requests:
        ranges = log_ranges(from_block, head, client.max_log_range)
        plans.append((len(calls), from_block, ranges))
        calls.append(escrow.state_call(info, block))
        calls.extend(("eth_getLogs", [escrow.log_filter(info, low, high)]) for low, high in ranges)
    results = _batched(client, calls)
    out: list[EscrowSnapshot] = []
    for index, from_block, ranges in plans:
        logs = [
            log for found in results[index + 1 : index + 1 + len(ranges)] for log in found or []
        ]
        scanned_to = ranges[-1][1] if ranges else from_block - 1  # nothing new to read
        out.append(
            EscrowSnapshot(
                block=block,
                state=ac.decode_payment_state(str(results[index])),
                events=_decoded(logs),
                head=head,
                start=from_block,
                scanned_to=scanned_to,
            )
        )
    return out


def block_before(client: ChainClient, timestamp: int) -> int:
    """The newest block whose timestamp is at most ``timestamp`` (0 when none is), by bisection:
    about log2(head) block reads. For records that carry no lower bound for their history."""
    low, high = 0, client.block_number()
    while low < high:
        middle = (low + high + 1) // 2
        block = client.rpc("eth_getBlockByNumber", [hex(middle), False])
        if block is not None and int(block["timestamp"], 16) <= timestamp:
            low = middle
        else:
            high = middle - 1
    return low


@dataclass(frozen=True)
class Simulation:
    ok: bool
    error: str | None  # the escrow's custom error name when decoded
    reason: str | None  # the spec's stable reason code when not ok


class EscrowClient:
    def __init__(self, client: ChainClient, deployment: ac.Deployment = ac.DEFAULT_DEPLOYMENT):
        self.client = client
        self.deployment = deployment

    @property
    def escrow(self) -> str:
        return self.deployment.escrow

    def payment_hash(self, info: ac.PaymentInfo) -> bytes:
        return ac.payment_info_hash(info, chain_id=self.client.chain_id(), escrow=self.escrow)

    def contract_hash(self, info: ac.PaymentInfo) -> bytes:
        """The escrow's own ``getHash`` (to cross-check the local computation)."""
        return bytes.fromhex(self.client.eth_call(self.escrow, ac.get_hash_data(info))[2:])

    def state(self, info: ac.PaymentInfo) -> ac.EscrowState:
        data = ac.payment_state_data(self.payment_hash(info))
        return ac.decode_payment_state(self.client.eth_call(self.escrow, data))

    def token_store(self, operator: str) -> str:
        raw = self.client.eth_call(
            self.escrow, "0x" + (ac.SEL_GET_TOKEN_STORE + encode(["address"], [operator])).hex()
        )
        return "0x" + raw[-40:]

    def history(self, info: ac.PaymentInfo, *, from_block: int) -> list[ac.EscrowEvent]:
        """Every escrow event of this payment from ``from_block`` (the payment's lower bound) to
        the head, in chain order — including operations done outside the connector (a payer's
        ``reclaim``, another operator client's capture) — read in ranges the provider accepts."""
        head = self.client.block_number()
        ranges = log_ranges(from_block, head, self.client.max_log_range, limit=None)
        calls = [("eth_getLogs", [self.log_filter(info, low, high)]) for low, high in ranges]
        return _decoded([log for found in _batched(self.client, calls) for log in found or []])

    def snapshot(
        self, info: ac.PaymentInfo, *, from_block: int, confirmations: int = 1
    ) -> EscrowSnapshot:
        """``paymentState`` and the event history as of ONE block (the newest deep enough to
        count), so that replaying the confirmed events must give the state: a difference is a
        real disagreement (a missed or reorganized event), never an operation that landed
        between two reads."""
        return snapshots(self.client, [(self, info, from_block)], confirmations=confirmations)[0]

    def state_call(self, info: ac.PaymentInfo, block: int) -> tuple[str, list[Any]]:
        """The ``paymentState`` read as of ``block`` (for a JSON-RPC batch)."""
        data = ac.payment_state_data(self.payment_hash(info))
        return ("eth_call", [{"to": self.escrow, "data": data}, hex(block)])

    def events_in(self, receipt: Receipt, info: ac.PaymentInfo) -> list[ac.EscrowEvent]:
        """The escrow events of this payment that one transaction emitted (its receipt's logs)."""
        topic = "0x" + self.payment_hash(info).hex()
        mine = [
            log
            for log in receipt.logs
            if str(log.get("address", "")).lower() == self.escrow.lower()
            and len(log.get("topics") or []) > 1
            and str(log["topics"][1]).lower() == topic
        ]
        return _decoded(mine)

    def log_filter(self, info: ac.PaymentInfo, from_block: int, to_block: int) -> dict[str, Any]:
        """The ``eth_getLogs`` filter of this payment's events in ``from_block..to_block``
        (always a bounded range: never ``latest``, never from genesis by default)."""
        return {
            "address": self.escrow,
            "fromBlock": hex(from_block),
            "toBlock": hex(to_block),
            "topics": [list(ac.EVENT_TOPICS), "0x" + self.payment_hash(info).hex()],
        }

    def simulate(self, sender: str, data: str) -> Simulation:
        ok, returned = self.client.try_call(self.escrow, data, sender=sender)
        if ok:
            return Simulation(True, None, None)
        name, reason = ac.decode_revert(returned)
        return Simulation(False, name, reason)

    def submit(self, signer: LocalAccount, data: str, *, gas: int = ESCROW_GAS) -> str:
        return self.client.send_transaction(signer, self.escrow, data, gas=gas)

    def execute(self, signer: LocalAccount, data: str, *, timeout_s: float = 60.0) -> Receipt:
        """Submit and wait for the receipt (status 0 is returned, not raised: callers decide)."""
        return self.client.wait_for_receipt(self.submit(signer, data), timeout_s=timeout_s)
