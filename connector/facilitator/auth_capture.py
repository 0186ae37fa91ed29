"""The facilitator side of ``authCapture``: ``/verify`` and ``/settle`` for the five operations.

The facilitator's gas key is the escrow operator (``extra.captureAuthorizer``): the escrow lets only
that address authorize, charge, capture, void and refund. Verification follows the spec's steps in
order (first failure wins, each with the spec's reason code), then checks the operation against the
escrow's on-chain ``paymentState`` and simulates the exact escrow call with ``eth_call`` from the
gas key; a simulation revert is decoded from the escrow's custom error into a stable reason. Only a
call that simulated cleanly is broadcast, so an invalid request never moves money or spends gas.

Operations on one payment are serialized (one lock per payment id), so two captures racing for
the last held amount cannot both pass verification and then fight on-chain. A transaction whose
receipt does not arrive in time is reported as ``settlement_pending`` with its hash: an unknown
outcome, never a failure.

Not implemented (reported as such): the Permit2 transfer method, EIP-6492 wrapped signatures,
forwarding to smart-contract operators.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from eth_abi.abi import encode
from eth_abi.exceptions import DecodingError
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address

from connector.chain.auth_capture import EscrowClient
from connector.chain.client import ChainClient, RpcError
from connector.logs import get_logger
from connector.x402 import auth_capture as ac
from connector.x402 import exact_evm
from connector.x402.errors import ProtocolError
from connector.x402.networks import chain_id_of
from connector.x402.requirement import Requirement, requirement_from_wire

log = get_logger(__name__)

SETTLEMENT_PENDING = "settlement_pending"
#: Not a spec code: the canonical contracts are not on this chain.
ESCROW_NOT_DEPLOYED = "escrow_not_deployed"
_EIP1271_MAGIC = bytes.fromhex("1626ba7e")
_IS_VALID_SIGNATURE = bytes.fromhex("1626ba7e")  # isValidSignature(bytes32,bytes)


@dataclass(frozen=True)
class Operation:
    """A verified request: what to call on the escrow, from the gas key."""

    type: str
    requirement: Requirement
    extra: ac.AuthCaptureExtra
    info: ac.PaymentInfo
    amount: int  # authorize/charge/capture/refund amount; void: what is held
    calldata: str


class Invalid(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


def _int(value: Any, bits: int, what: str) -> int:
    if isinstance(value, bool):
        raise Invalid(ac.INVALID_PAYLOAD_FORMAT, f"{what} must be an integer")
    if isinstance(value, str) and value.isdigit() and len(value) <= 78:
        value = int(value)
    if not isinstance(value, int) or not 0 <= value < 2**bits:
        raise Invalid(ac.INVALID_PAYLOAD_FORMAT, f"{what} must be a uint{bits}")
    return value


def _address(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) != 42 or not value.startswith("0x"):
        raise Invalid(ac.INVALID_PAYLOAD_FORMAT, f"{what} must be an address")
    try:
        return str(to_checksum_address(value))
    except ValueError:
        raise Invalid(ac.INVALID_PAYLOAD_FORMAT, f"{what} must be an address") from None


class AuthCaptureFacilitator:
    """Registered on :class:`~connector.facilitator.local.LocalFacilitator` for the
    ``authCapture`` scheme; usable alone too."""

    schemes = ac.SCHEME_ALIASES

    def __init__(
        self,
        chain: ChainClient,
        gas_key: LocalAccount,
        *,
        network: str,
        assets: set[str] | None = None,
        receipt_timeout_s: float = 60.0,
        confirmations: int = 1,
    ) -> None:
        self.chain = chain
        # As for ``exact`` transfers: success only once the operation's block is this deep;
        # until then settlement_pending with the transaction hash (the caller looks again).
        self.confirmations = max(1, confirmations)
        self.gas_key = gas_key
        self.network = network
        self.assets = {a.lower() for a in assets} if assets else None
        self.receipt_timeout_s = receipt_timeout_s
        self._locks_guard = threading.Lock()
        self._locks: dict[bytes, threading.Lock] = {}
        self._deployed: set[str] = set()
        self._looked_at = float("-inf")

    def _escrow_deployed(self, deployment: ac.Deployment) -> bool:
        """Code at the escrow and its collectors (a positive answer is cached: contracts stay)."""
        if deployment.escrow in self._deployed:
            return True
        for address in (
            deployment.escrow,
            deployment.eip3009_collector,
            deployment.operator_refund_collector,
        ):
            if len(self.chain.rpc("eth_getCode", [address, "latest"]) or "0x") <= 2:
                return False
        self._deployed.add(deployment.escrow)
        return True

    def kinds(self) -> list[dict[str, Any]]:
        """Advertised only where a known escrow deployment has code: the canonical addresses are
        the same everywhere, but the contracts are not on every chain. A failed or negative look
        is repeated at most once a minute (``/supported`` must stay cheap and never fail)."""
        now = time.monotonic()
        if not self._deployed and now - self._looked_at < 60.0:
            return []
        self._looked_at = now
        try:
            present = any(self._escrow_deployed(d) for d in ac.DEPLOYMENTS)
        except Exception as exc:  # an unreachable node: just do not advertise this time
            log.warning("authCapture escrow check failed", extra={"error": str(exc)[:200]})
            present = False
        return [{"x402Version": 2, "scheme": ac.SCHEME, "network": self.network}] if present else []

    # ------------------------------------------------------------------ parsing

    @staticmethod
    def _split(body: Any) -> tuple[dict[str, Any], dict[str, Any], Requirement, Requirement]:
        """(payment payload, its ``payload``, requirements, accepted). Structural problems of
        the envelope are HTTP 400; problems inside ``payload`` are verification reasons."""
        if not isinstance(body, dict):
            raise ProtocolError("body must be a JSON object", field="body")
        payment = body.get("paymentPayload")
        if not isinstance(payment, dict):
            raise ProtocolError("paymentPayload must be a JSON object", field="paymentPayload")
        if payment.get("x402Version") != 2:
            raise ProtocolError(
                "authCapture needs x402Version 2", field="paymentPayload.x402Version"
            )
        requirement = requirement_from_wire(body.get("paymentRequirements"), 2, "requirements")
        accepted = requirement_from_wire(payment.get("accepted"), 2, "paymentPayload.accepted")
        inner = payment.get("payload")
        if not isinstance(inner, dict):
            raise ProtocolError(
                "paymentPayload.payload must be a JSON object", field="paymentPayload.payload"
            )
        return payment, inner, requirement, accepted

    # ------------------------------------------------------------------ verify

    def verify(self, body: Any, *, now: int | None = None) -> dict[str, Any]:
        _, inner, requirement, accepted = self._split(body)
        return self._verdict(inner, requirement, accepted, now).to_wire()

    def _verdict(
        self,
        inner: dict[str, Any],
        requirement: Requirement,
        accepted: Requirement,
        now: int | None,
    ) -> exact_evm.VerificationResult:
        try:
            op = self._check(inner, requirement, accepted, now)
        except Invalid as bad:
            return exact_evm.VerificationResult(False, bad.reason, self._payer_of(inner))
        return exact_evm.VerificationResult(True, None, op.info.payer)

    @staticmethod
    def _payer_of(inner: dict[str, Any]) -> str | None:
        for source in (inner.get("authorization"), inner.get("paymentInfo")):
            if isinstance(source, dict):
                value = source.get("from", source.get("payer"))
                if isinstance(value, str) and len(value) == 42:
                    try:
                        return str(to_checksum_address(value))
                    except ValueError:
                        return None
        return None

    def _check(
        self, inner: dict[str, Any], req: Requirement, accepted: Requirement, now: int | None
    ) -> Operation:
        now = int(time.time()) if now is None else now
        inner = _with_default_type(inner, req)
        # 1. type guard and the fields each type needs
        op_type = inner.get("type")
        if op_type not in ac.OPERATIONS:
            raise Invalid(ac.INVALID_OPERATION_TYPE, f"type {op_type!r}")
        collects = op_type in ("authorize", "charge")
        if collects:
            missing = [k for k in ("signature", "salt") if k not in inner]
            if "authorization" not in inner and "permit2Authorization" not in inner:
                missing.append("authorization")
        else:
            missing = [k for k in ("paymentInfo",) if k not in inner]
        if op_type == "charge" and not isinstance(inner.get("capture"), dict):
            missing.append("capture")
        if op_type in ("capture", "refund") and "amount" not in inner:
            missing.append("amount")
        if missing:
            raise Invalid(ac.INVALID_PAYLOAD_FORMAT, f"missing {', '.join(missing)}")
        # 2. scheme
        if req.scheme not in ac.SCHEME_ALIASES or accepted.scheme not in ac.SCHEME_ALIASES:
            raise Invalid(ac.UNSUPPORTED_SCHEME)
        # 3. network
        if not req.network.startswith("eip155:"):
            raise Invalid(ac.INVALID_NETWORK)
        try:
            chain_id = chain_id_of(req.network)
        except ProtocolError:
            raise Invalid(ac.INVALID_NETWORK) from None
        if accepted.network != req.network or req.network != self.network:
            raise Invalid(ac.NETWORK_MISMATCH)
        if not accepted.same_offer(req):
            raise Invalid(ac.PAYMENT_INFO_MISMATCH, "accepted differs from the requirements")
        if self.assets is not None and req.asset.lower() not in self.assets:
            raise Invalid(ac.TOKEN_MISMATCH, "asset not accepted by this facilitator")
        # 4. extra
        try:
            extra = ac.parse_extra(req.extra)
        except ac.AuthCaptureInvalid as exc:
            raise Invalid(exc.reason, exc.detail) from None
        deployment = extra.deployment
        # 5. PaymentInfo against the requirements (rebuilt when a collect omits it)
        client: ac.ClientPayload | None = None
        if collects and "authorization" in inner:
            try:
                client = ac.parse_client_payload(inner)
            except ac.AuthCaptureInvalid as exc:
                raise Invalid(exc.reason, exc.detail) from None
        info = self._payment_info(inner, req, extra, client)
        expected = ac.terms_for(req, extra, payer=info.payer, salt=info.salt, pre_approval_expiry=0)
        if info.payer == ac.ZERO_ADDRESS or replace_expiry(info, 0) != expected:
            raise Invalid(ac.PAYMENT_INFO_MISMATCH)
        if client is not None and (
            info.pre_approval_expiry != client.authorization.valid_before
            or info.salt != client.salt
            or info.payer != client.authorization.from_
        ):
            raise Invalid(ac.PAYMENT_INFO_MISMATCH)
        payment_nonce = ac.payer_agnostic_nonce(info, chain_id=chain_id, escrow=deployment.escrow)
        # 6. server authorization
        if extra.server_authorization_required:
            self._check_server_authorization(inner, req, payment_nonce, chain_id, deployment)
        # 7. method routing
        if collects:
            if extra.asset_transfer_method == "permit2":
                if "permit2Authorization" not in inner:
                    raise Invalid(ac.PAYLOAD_METHOD_MISMATCH)
                raise Invalid(ac.UNSUPPORTED_METHOD, "permit2 is not implemented here")
            if client is None:
                raise Invalid(ac.PAYLOAD_METHOD_MISMATCH)
        # 8. deadline ordering
        if extra.refund_deadline < extra.capture_deadline:
            raise Invalid(ac.INVALID_DEADLINE_ORDERING)
        capturing = op_type in ("authorize", "charge", "capture")
        if capturing and extra.capture_deadline <= now + ac.SETTLEMENT_MARGIN_S:
            raise Invalid(ac.CAPTURE_DEADLINE_EXPIRED)
        if op_type == "refund" and extra.refund_deadline <= now + ac.SETTLEMENT_MARGIN_S:
            raise Invalid("refund_deadline_expired")
        if client is not None:
            auth = client.authorization
            if auth.valid_before > extra.capture_deadline:
                raise Invalid(ac.INVALID_DEADLINE_ORDERING)
            # 9. time window
            if auth.valid_before <= now + ac.SETTLEMENT_MARGIN_S:
                raise Invalid(ac.AUTHORIZATION_EXPIRED)
            if auth.valid_after > now:
                raise Invalid(ac.AUTHORIZATION_NOT_YET_VALID)
            # 10. collector
            if auth.to != deployment.eip3009_collector:
                raise Invalid(ac.TOKEN_COLLECTOR_MISMATCH)
            # 12. signature (11, the Permit2 token match, does not apply to EIP-3009)
            digest = ac.receive_digest(
                auth,
                token_name=extra.name,
                token_version=extra.version,
                chain_id=chain_id,
                asset=req.asset,
            )
            if exact_evm.recover_signer(digest, client.signature) != info.payer:
                raise Invalid(ac.INVALID_SIGNATURE)
            # 13. amount
            if auth.value != req.amount:
                raise Invalid(ac.AMOUNT_MISMATCH)
            # 14. nonce
            if auth.nonce.lower() != payment_nonce.lower():
                raise Invalid(ac.NONCE_MISMATCH)
        op = self._operation(op_type, inner, req, extra, info, client)
        # Without code at the escrow address every call "succeeds" doing nothing: never report that.
        if not self._escrow_deployed(deployment):
            raise Invalid(ESCROW_NOT_DEPLOYED, f"no escrow code at {deployment.escrow}")
        # 15. operation against the on-chain state
        escrow = EscrowClient(self.chain, deployment)
        state = escrow.state(info)
        if collects:
            if state.has_collected_payment:
                raise Invalid(ac.INVALID_OPERATION_STATE, "payment already collected")
            try:
                balance = self.chain.token_balance(req.asset, info.payer)
            except DecodingError:  # no ERC-20 answers at that address
                raise Invalid(ac.TOKEN_MISMATCH, "asset is not a token") from None
            if balance < req.amount:
                raise Invalid(ac.INSUFFICIENT_BALANCE)
        elif op_type == "capture" and state.capturable_amount < op.amount:
            raise Invalid(ac.INVALID_OPERATION_STATE, "not enough held to capture")
        elif op_type == "void" and state.capturable_amount == 0:
            raise Invalid(ac.INVALID_OPERATION_STATE, "nothing held to void")
        elif op_type == "refund" and state.refundable_amount < op.amount:
            raise Invalid(ac.INVALID_OPERATION_STATE, "refund exceeds what was captured")
        if op_type == "void":
            op = Operation(op.type, req, extra, info, state.capturable_amount, op.calldata)
        # 16. simulate the exact call from the gas key
        sim = escrow.simulate(self.gas_key.address, op.calldata)
        if not sim.ok:
            raise Invalid(sim.reason or ac.SIMULATION_FAILED, sim.error or "")
        return op

    @staticmethod
    def _payment_info(
        inner: dict[str, Any],
        req: Requirement,
        extra: ac.AuthCaptureExtra,
        client: ac.ClientPayload | None,
    ) -> ac.PaymentInfo:
        raw = inner.get("paymentInfo")
        if raw is not None:
            try:
                return ac.payment_info_from_wire(raw)
            except ac.AuthCaptureInvalid as exc:
                raise Invalid(exc.reason, exc.detail) from None
        if client is None:
            raise Invalid(ac.INVALID_PAYLOAD_FORMAT, "paymentInfo is required")
        return ac.terms_for(
            req,
            extra,
            payer=client.authorization.from_,
            salt=client.salt,
            pre_approval_expiry=client.authorization.valid_before,
        )

    def _operation(
        self,
        op_type: str,
        inner: dict[str, Any],
        req: Requirement,
        extra: ac.AuthCaptureExtra,
        info: ac.PaymentInfo,
        client: ac.ClientPayload | None,
    ) -> Operation:
        dep = extra.deployment
        if op_type == "authorize":
            assert client is not None
            data = ac.authorize_data(info, req.amount, dep.eip3009_collector, client.signature)
            return Operation(op_type, req, extra, info, req.amount, data)
        if op_type == "charge":
            assert client is not None
            cap = inner["capture"]
            amount = _int(cap.get("amount"), 120, "capture.amount")
            fee_bps = _int(cap.get("feeBps", 0), 16, "capture.feeBps")
            fee_to = _address(cap.get("feeRecipient", ac.ZERO_ADDRESS), "capture.feeRecipient")
            data = ac.charge_data(
                info, amount, dep.eip3009_collector, client.signature, fee_bps, fee_to
            )
            return Operation(op_type, req, extra, info, amount, data)
        if op_type == "capture":
            amount = _int(inner.get("amount"), 120, "amount")
            fee_bps = _int(inner.get("feeBps", 0), 16, "feeBps")
            fee_to = _address(inner.get("feeRecipient", ac.ZERO_ADDRESS), "feeRecipient")
            return Operation(
                op_type, req, extra, info, amount, ac.capture_data(info, amount, fee_bps, fee_to)
            )
        if op_type == "void":
            return Operation(op_type, req, extra, info, 0, ac.void_data(info))
        amount = _int(inner.get("amount"), 120, "amount")
        data = ac.refund_data(info, amount, dep.operator_refund_collector)
        return Operation(op_type, req, extra, info, amount, data)

    def _check_server_authorization(
        self,
        inner: dict[str, Any],
        req: Requirement,
        nonce: str,
        chain_id: int,
        deployment: ac.Deployment,
    ) -> None:
        proof = inner.get("serverAuthorization")
        if proof is None:
            raise Invalid(ac.MISSING_SERVER_AUTHORIZATION)
        sig_hex = proof.get("signature") if isinstance(proof, dict) else None
        if not isinstance(sig_hex, str) or not sig_hex.startswith("0x") or len(sig_hex) > 4096:
            raise Invalid(ac.INVALID_SERVER_AUTHORIZATION)
        try:
            signature = bytes.fromhex(sig_hex[2:])
        except ValueError:
            raise Invalid(ac.INVALID_SERVER_AUTHORIZATION) from None
        digest = ac.server_authorization_digest(nonce, chain_id=chain_id, escrow=deployment.escrow)
        if exact_evm.recover_signer(digest, signature) == req.pay_to:
            return
        # a contract payTo answers for itself (EIP-1271)
        if len(self.chain.rpc("eth_getCode", [req.pay_to, "latest"]) or "0x") > 2:
            data = (
                "0x"
                + (_IS_VALID_SIGNATURE + encode(["bytes32", "bytes"], [digest, signature])).hex()
            )
            ok, returned = self.chain.try_call(req.pay_to, data)
            if ok and returned[:4] == _EIP1271_MAGIC:
                return
        raise Invalid(ac.INVALID_SERVER_AUTHORIZATION)

    # ------------------------------------------------------------------ settle

    def _lock_for(self, key: bytes) -> threading.Lock:
        with self._locks_guard:
            lock = self._locks.get(key)
            if lock is None:
                if len(self._locks) > 100_000:
                    self._locks.clear()  # bounded; a dropped lock only loses serialization
                lock = self._locks[key] = threading.Lock()
            return lock

    def settle(self, body: Any, *, now: int | None = None) -> dict[str, Any]:
        _, inner, requirement, accepted = self._split(body)
        key = self._payment_key(inner, requirement)
        with self._lock_for(key):
            return self._settle_locked(inner, requirement, accepted, now)

    def _payment_key(self, inner: dict[str, Any], req: Requirement) -> bytes:
        """Serialization key: the payment's nonce when derivable, else the raw payload."""
        try:
            extra = ac.parse_extra(req.extra)
            client = ac.parse_client_payload(inner) if "authorization" in inner else None
            info = self._payment_info(inner, req, extra, client)
            return ac.payment_info_hash(
                info.without_payer(),
                chain_id=chain_id_of(req.network),
                escrow=extra.deployment.escrow,
            )
        except (Invalid, ProtocolError):
            return b"unparsed"

    def _failure(self, reason: str, payer: str | None, tx: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {
            "success": False,
            "errorReason": reason,
            "transaction": tx,
            "network": self.network,
        }
        if payer:
            out["payer"] = payer
        return out

    def _settle_locked(
        self, inner: dict[str, Any], req: Requirement, accepted: Requirement, now: int | None
    ) -> dict[str, Any]:
        try:
            op = self._check(inner, req, accepted, now)
        except Invalid as bad:
            return self._failure(bad.reason, self._payer_of(inner))
        escrow = EscrowClient(self.chain, op.extra.deployment)
        tx_hash = escrow.submit(self.gas_key, op.calldata)
        try:
            receipt = self.chain.wait_for_receipt(tx_hash, timeout_s=self.receipt_timeout_s)
        except RpcError:
            self.chain.forget_nonces()
            log.warning("authCapture settlement pending", extra={"tx_hash": tx_hash})
            return self._failure(SETTLEMENT_PENDING, op.info.payer, tx_hash)
        if receipt.status != 1:
            return self._failure(ac.TRANSACTION_REVERTED, op.info.payer, tx_hash)
        if not self.chain.wait_for_confirmations(
            receipt, self.confirmations, timeout_s=self.receipt_timeout_s
        ):
            log.info("authCapture settlement mined, not confirmed yet", extra={"tx_hash": tx_hash})
            return self._failure(SETTLEMENT_PENDING, op.info.payer, tx_hash)
        return {
            "success": True,
            "payer": op.info.payer,
            "transaction": tx_hash,
            "network": self.network,
            "amount": str(op.amount),
            "operation": op.type,
            "paymentInfo": op.info.to_wire(),
        }


def _with_default_type(inner: dict[str, Any], req: Requirement) -> dict[str, Any]:
    """A payload without ``type`` (the spec's earlier form, and what a client sends) is a
    collection: ``charge`` when ``extra.autoCapture`` is true (full amount, the minimum fee to the
    committed fee recipient), else ``authorize``."""
    if "type" in inner or ("authorization" not in inner and "permit2Authorization" not in inner):
        return inner
    if req.extra.get("autoCapture") is not True:
        return {**inner, "type": "authorize"}
    capture = {
        "amount": str(req.amount),
        "feeBps": req.extra.get("minFeeBps", 0),
        "feeRecipient": req.extra.get("feeRecipient", ac.ZERO_ADDRESS),
    }
    return {**inner, "type": "charge", "capture": capture}


def replace_expiry(info: ac.PaymentInfo, pre_approval_expiry: int) -> ac.PaymentInfo:
    """``info`` with ``preApprovalExpiry`` set (it is client-derived, compared separately)."""
    return ac.PaymentInfo(**{**info.__dict__, "pre_approval_expiry": pre_approval_expiry})
