"""A local x402 facilitator for the dev chain: ``/verify``, ``/settle``, ``/supported``.

It verifies with our own exact-EVM verifier and settles by submitting
``transferWithAuthorization`` from a gas key. Settlement is idempotent per authorization
``(asset, payer, nonce)``: concurrent or repeated settles of the same authorization share one
transaction, and a nonce already used on-chain is reported before anything is sent. Many threads
may settle at once; the chain client hands out the gas key's transaction nonces.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from eth_account.signers.local import LocalAccount

from connector.chain.client import ChainClient, Receipt, RpcError
from connector.facilitator.auth_capture import AuthCaptureFacilitator
from connector.logs import get_logger
from connector.x402 import exact_evm as exact
from connector.x402 import fields as f
from connector.x402.codec import parse_payment_payload
from connector.x402.errors import MalformedPayment
from connector.x402.networks import to_v1_name
from connector.x402.requirement import requirement_from_wire

log = get_logger(__name__)

REQUIREMENTS_MISMATCH = "invalid_payment_requirements"
TRANSACTION_FAILED = "transaction_failed"
SETTLEMENT_PENDING = "settlement_pending"
UNSUPPORTED_ASSET = "invalid_exact_evm_asset_mismatch"


@dataclass
class _Settlement:
    fingerprint: tuple[Any, ...]  # the payload and requirement this entry answers for
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    tx_hash: str | None = None
    recovering: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class _Parsed:
    version: int
    payment: Any
    requirement: Any


class LocalFacilitator:
    def __init__(
        self,
        chain: ChainClient,
        gas_key: LocalAccount,
        *,
        network: str,
        assets: set[str] | None = None,
        receipt_timeout_s: float = 10.0,
        remember: int = 100_000,
        max_in_flight: int = 64,
        confirmations: int = 1,
    ) -> None:
        self.chain = chain
        self.gas_key = gas_key
        self.network = network
        self.assets = {a.lower() for a in assets} if assets else None
        self.receipt_timeout_s = receipt_timeout_s
        self._remember = remember
        self._lock = threading.Lock()
        self._settlements: OrderedDict[tuple[str, str, str], _Settlement] = OrderedDict()
        # Bounds the transactions submitted and not yet confirmed: beyond it a settle waits for
        # a slot instead of piling more pending transactions on the node.
        self._in_flight = threading.BoundedSemaphore(max_in_flight)
        # Blocks a receipt needs (its own included) before a settle answers success; until then
        # the answer is settlement_pending with the transaction hash.
        self.confirmations = max(1, confirmations)
        # Further schemes by name (handlers with kinds()/verify()/settle()); authCapture by default.
        self.scheme_handlers: dict[str, Any] = {}
        # The escrow operations wait for their receipt as long as transfers do: past it the
        # answer is settlement_pending with the transaction hash (an unknown outcome).
        self.register_scheme(
            AuthCaptureFacilitator(
                chain,
                gas_key,
                network=network,
                assets=assets,
                receipt_timeout_s=receipt_timeout_s,
                confirmations=self.confirmations,
            )
        )

    def register_scheme(self, handler: Any) -> None:
        """Route requests whose requirements name one of ``handler.schemes`` to ``handler``."""
        for name in handler.schemes:
            self.scheme_handlers[name] = handler

    def _handler_for(self, body: Any) -> Any:
        requirements = body.get("paymentRequirements") if isinstance(body, dict) else None
        scheme = requirements.get("scheme") if isinstance(requirements, dict) else None
        return self.scheme_handlers.get(scheme) if isinstance(scheme, str) else None

    # ------------------------------------------------------------------ parsing

    def _parse(self, body: Any) -> _Parsed:
        d = f.obj(body, "body")
        payment = parse_payment_payload(d.get("paymentPayload"), "paymentPayload")
        requirement = requirement_from_wire(
            d.get("paymentRequirements"), payment.version, "paymentRequirements"
        )
        return _Parsed(payment.version, payment, requirement)

    def supported(self) -> dict[str, Any]:
        extra_kinds = [k for h in dict.fromkeys(self.scheme_handlers.values()) for k in h.kinds()]
        return {
            "kinds": [
                {"x402Version": 2, "scheme": "exact", "network": self.network},
                {"x402Version": 1, "scheme": "exact", "network": to_v1_name(self.network)},
                *extra_kinds,
            ],
            "extensions": [],
            "signers": {"eip155:*": [self.gas_key.address]},
        }

    # ------------------------------------------------------------------ verify

    def _verify_parsed(self, parsed: _Parsed, now: int | None = None) -> exact.VerificationResult:
        payment, requirement = parsed.payment, parsed.requirement
        payer = payment.payer
        if payment.accepted is not None and not payment.accepted.same_offer(requirement):
            return exact.VerificationResult(False, REQUIREMENTS_MISMATCH, payer)
        if requirement.network != self.network:
            return exact.VerificationResult(False, exact.NETWORK_MISMATCH, payer)
        if self.assets is not None and requirement.asset.lower() not in self.assets:
            return exact.VerificationResult(False, UNSUPPORTED_ASSET, payer)
        return exact.verify_exact(
            payment.payload,
            requirement,
            self.chain,
            scheme=payment.scheme,
            network=payment.network,
            now=now,
        )

    def verify(self, body: Any) -> dict[str, Any]:
        """Raises :class:`MalformedPayment` for a malformed request (HTTP 400)."""
        handler = self._handler_for(body)
        if handler is not None:
            return dict(handler.verify(body))
        return self._verify_parsed(self._parse(body)).to_wire()

    # ------------------------------------------------------------------ settle

    @staticmethod
    def _fingerprint(parsed: _Parsed) -> tuple[Any, ...]:
        """What a cached answer is valid for: the exact authorization and signature, and the
        requirement's money fields (scheme, network, asset, amount, payee)."""
        payload, req = parsed.payment.payload, parsed.requirement
        a = payload.authorization
        return (
            payload.signature,
            a.from_.lower(),
            a.to.lower(),
            a.value,
            a.valid_after,
            a.valid_before,
            a.nonce,
            req.scheme,
            req.network,
            req.asset.lower(),
            req.amount,
            req.pay_to.lower(),
        )

    def settle(self, body: Any) -> dict[str, Any]:
        handler = self._handler_for(body)
        if handler is not None:
            return dict(handler.settle(body))
        parsed = self._parse(body)
        auth = parsed.payment.payload.authorization
        key = (parsed.requirement.asset.lower(), auth.from_.lower(), auth.nonce)
        fingerprint = self._fingerprint(parsed)
        with self._lock:
            cached = self._settlements.get(key)
        if cached is not None and cached.fingerprint != fingerprint:
            # Another request for an authorization we settled or are settling: the cached
            # answer is not its answer. Verify it on its own: another payee or amount fails
            # here, and so does the nonce once the first transaction is mined. (A variant that
            # still verifies carries the same transfer and shares the entry below.)
            verdict = self._verify_parsed(parsed)
            if not verdict.is_valid:
                return self._failure(parsed, verdict.reason or "invalid")
        with self._lock:
            entry = self._settlements.get(key)
            owner = entry is None
            if entry is None:
                entry = _Settlement(fingerprint)
                self._settlements[key] = entry
                while len(self._settlements) > self._remember:
                    self._settlements.popitem(last=False)
        if not owner:
            entry.done.wait(self.receipt_timeout_s + 5)
            if entry.result is not None and entry.result.get("errorReason") != SETTLEMENT_PENDING:
                done = entry.result.get("transaction")
                if entry.result.get("success") and done and self.chain.get_receipt(done) is None:
                    # The remembered settlement's receipt vanished (a reorg): recover it like a
                    # dropped transaction instead of repeating a success that no longer holds.
                    entry.result = None
                    return self._recover(parsed, entry, done)
                return entry.result
            if entry.tx_hash:
                # A repeated settle of a pending one: look again, and recover it if the
                # transaction was dropped or replaced meanwhile.
                return self._finish(parsed, entry, entry.tx_hash)
            return self._failure(parsed, SETTLEMENT_PENDING)
        try:
            entry.result = self._settle_once(parsed, entry)
        except Exception:
            with self._lock:  # let a later attempt try again from scratch
                self._settlements.pop(key, None)
            raise
        finally:
            entry.done.set()
        if not entry.result.get("success") and entry.tx_hash is None:
            with self._lock:  # nothing was sent: a corrected retry may settle later
                self._settlements.pop(key, None)
        return entry.result

    def _failure(self, parsed: _Parsed, reason: str, tx: str = "") -> dict[str, Any]:
        return {
            "success": False,
            "errorReason": reason,
            "payer": parsed.payment.payer,
            "transaction": tx,
            "network": self._wire_network(parsed),
        }

    def _wire_network(self, parsed: _Parsed) -> str:
        return to_v1_name(self.network) if parsed.version == 1 else self.network

    def _settle_once(self, parsed: _Parsed, entry: _Settlement) -> dict[str, Any]:
        verdict = self._verify_parsed(parsed)
        if not verdict.is_valid:
            return self._failure(parsed, verdict.reason or "invalid")
        with self._in_flight:
            return self._submit(parsed, entry)

    def _submit(self, parsed: _Parsed, entry: _Settlement) -> dict[str, Any]:
        entry.tx_hash = self._send(parsed)
        return self._finish(parsed, entry, entry.tx_hash)

    def _send(self, parsed: _Parsed) -> str:
        auth = parsed.payment.payload.authorization
        return self.chain.send_transfer_with_authorization(
            parsed.requirement.asset,
            from_=auth.from_,
            to=auth.to,
            value=auth.value,
            valid_after=auth.valid_after,
            valid_before=auth.valid_before,
            nonce=auth.nonce,
            signature=parsed.payment.payload.signature,
            gas_key=self.gas_key,
        )

    def _finish(
        self, parsed: _Parsed, entry: _Settlement, tx_hash: str, *, recover: bool = True
    ) -> dict[str, Any]:
        try:
            receipt = self.chain.wait_for_receipt(tx_hash, timeout_s=self.receipt_timeout_s)
        except RpcError:
            if recover:
                return self._recover(parsed, entry, tx_hash)
            log.warning("settlement pending", extra={"tx_hash": tx_hash})
            return self._failure(parsed, SETTLEMENT_PENDING, tx_hash)
        return self._outcome(parsed, entry, receipt)

    def _outcome(self, parsed: _Parsed, entry: _Settlement, receipt: Receipt) -> dict[str, Any]:
        if receipt.status != 1:
            return self._failure(parsed, TRANSACTION_FAILED, receipt.tx_hash)
        if not self._confirmed(receipt):
            return self._failure(parsed, SETTLEMENT_PENDING, receipt.tx_hash)
        result = {
            "success": True,
            "payer": parsed.payment.payer,
            "transaction": receipt.tx_hash,
            "network": self._wire_network(parsed),
        }
        entry.result = result
        return result

    def _confirmed(self, receipt: Receipt) -> bool:
        """Wait (up to the receipt timeout) for the configured confirmations."""
        return self.chain.wait_for_confirmations(
            receipt, self.confirmations, timeout_s=self.receipt_timeout_s
        )

    def _recover(self, parsed: _Parsed, entry: _Settlement, tx_hash: str) -> dict[str, Any]:
        """No receipt in time. Still in the node's pool: pending (the outcome is unknown, never
        a failure). Replaced (the authorization was used by another transaction, ours or
        anyone's): that transaction is the settlement. Dropped (the node has forgotten it and
        the authorization is unused): resynchronize the gas key's nonces from the node and
        submit again; EIP-3009 lets the authorization move money once, so even a resubmission
        racing a late original cannot pay twice."""
        auth = parsed.payment.payload.authorization
        asset = parsed.requirement.asset
        with entry.recovering:
            if entry.tx_hash != tx_hash and entry.tx_hash is not None:  # already resubmitted
                return self._finish(parsed, entry, entry.tx_hash, recover=False)
            receipt = self.chain.get_receipt(tx_hash)
            if receipt is not None:
                return self._outcome(parsed, entry, receipt)
            if self.chain.authorization_state(asset, auth.from_, auth.nonce):
                other = self.chain.find_authorization_tx(asset, auth.from_, auth.nonce)
                receipt = self.chain.get_receipt(other) if other else None
                if receipt is not None:
                    log.warning(
                        "settlement replaced", extra={"tx_hash": tx_hash, "by": receipt.tx_hash}
                    )
                    entry.tx_hash = receipt.tx_hash
                    return self._outcome(parsed, entry, receipt)
                return self._failure(parsed, SETTLEMENT_PENDING, tx_hash)
            if self.chain.rpc("eth_getTransactionByHash", [tx_hash]) is not None:
                # Perhaps queued behind an earlier dropped nonce: the next send resynchronizes
                # from the node's count and fills such a gap.
                self.chain.forget_nonces()
                log.warning("settlement pending", extra={"tx_hash": tx_hash})
                return self._failure(parsed, SETTLEMENT_PENDING, tx_hash)
            # Dropped: the gas key's later nonces may be stuck behind the gap; the node's count
            # is the truth again.
            self.chain.forget_nonces()
            verdict = self._verify_parsed(parsed)
            if not verdict.is_valid:  # e.g. expired meanwhile: nothing moved, definitely
                return self._failure(parsed, verdict.reason or "invalid")
            log.warning("settlement dropped; resubmitting", extra={"tx_hash": tx_hash})
            with self._in_flight:
                entry.tx_hash = self._send(parsed)
            return self._finish(parsed, entry, entry.tx_hash, recover=False)


__all__ = ["LocalFacilitator", "MalformedPayment"]
