"""Escrow calls for ``authCapture``: read payment state, simulate, submit, decode reverts.

Thin on purpose: calldata and reason codes come from :mod:`connector.x402.auth_capture`; this
adds the chain round trips (one ``eth_call`` per read or simulation, one transaction per
operation) through :class:`~connector.chain.client.ChainClient`, which already carries timeouts
and bounded retries.
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


@dataclass(frozen=True)
class EscrowSnapshot:
    """One payment in the escrow as of one block: its ``paymentState`` and its events."""

    block: int
    state: ac.EscrowState
    events: list[ac.EscrowEvent]


def _decoded(logs: Any) -> list[ac.EscrowEvent]:
    events = [e for e in (ac.decode_escrow_log(log) for log in logs or []) if e is not None]
    return sorted(events, key=lambda e: (e.block_number, e.log_index))


#: Payments read per JSON-RPC batch by :func:`snapshots` (two calls each).
SNAPSHOT_CHUNK = 50


def snapshots(
    client: ChainClient,
    requests: list[tuple[EscrowClient, ac.PaymentInfo, int]],
) -> list[EscrowSnapshot]:
    """Snapshots of many payments (``(escrow, terms, from_block)`` each), all at the same block:
    one ``eth_blockNumber`` and one JSON-RPC batch per :data:`SNAPSHOT_CHUNK` payments, so a
    reconcile pass costs a few round trips rather than two per payment."""
    if not requests:
        return []
    head = client.block_number()
    out: list[EscrowSnapshot] = []
    for start in range(0, len(requests), SNAPSHOT_CHUNK):
        chunk = requests[start : start + SNAPSHOT_CHUNK]
        calls = [
            call
            for escrow, info, from_block in chunk
            for call in escrow.snapshot_calls(info, from_block=from_block, head=head)
        ]
        results = client.rpc_batch(calls)
        for i in range(len(chunk)):
            state_hex, logs = results[2 * i], results[2 * i + 1]
            out.append(
                EscrowSnapshot(head, ac.decode_payment_state(str(state_hex)), _decoded(logs))
            )
    return out


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

    def history(self, info: ac.PaymentInfo, *, from_block: int = 0) -> list[ac.EscrowEvent]:
        """Every escrow event of this payment, in chain order — including operations done
        outside the connector (a payer's ``reclaim``, another operator client's capture)."""
        logs = self.client.rpc("eth_getLogs", [self._filter(info, from_block, "latest")])
        return _decoded(logs)

    def snapshot(self, info: ac.PaymentInfo, *, from_block: int = 0) -> EscrowSnapshot:
        """``paymentState`` and the event history read at ONE block (the head when asked), so
        that replaying the events must give the state: a difference is a real disagreement
        (a missed or reorganized event), never an operation that landed between two reads."""
        return snapshots(self.client, [(self, info, from_block)])[0]

    def snapshot_calls(
        self, info: ac.PaymentInfo, *, from_block: int, head: int
    ) -> list[tuple[str, list[Any]]]:
        """The two reads of :meth:`snapshot` at block ``head`` (for a JSON-RPC batch)."""
        at = hex(head)
        data = ac.payment_state_data(self.payment_hash(info))
        return [
            ("eth_call", [{"to": self.escrow, "data": data}, at]),
            ("eth_getLogs", [self._filter(info, min(from_block, head), at)]),
        ]

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

    def _filter(self, info: ac.PaymentInfo, from_block: int, to_block: str) -> dict[str, Any]:
        return {
            "address": self.escrow,
            "fromBlock": hex(from_block),
            "toBlock": to_block,
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
