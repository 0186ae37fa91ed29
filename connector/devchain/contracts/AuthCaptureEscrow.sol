// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title Dev-chain stand-ins for Base Commerce Payments' escrow stack (x402 `authCapture`).
/// @notice Our own implementation of the documented interface and semantics of
///         `AuthCaptureEscrow`, its `ERC3009PaymentCollector` and `OperatorRefundCollector`, written
///         so x402's `authCapture` scheme runs end to end on a local anvil chain. Clients sign for
///         the canonical mainnet addresses, so the dev chain places this runtime code at those
///         addresses with `anvil_setCode`; that is why nothing here depends on constructor-written
///         storage (only immutables, which live in the runtime code) and why the escrow has no
///         constructor at all. Never deploy this anywhere that holds value: it is unaudited.
///
///         Deliberate differences from the audited contracts: a storage reentrancy lock instead of a
///         transient one (the dev toolchain targets `paris`), plain CREATE2 token stores instead of
///         minimal-proxy clones, and no ERC-6492 (counterfactual smart-wallet) signature unwrapping.

/// Payment terms a payer signs for; its hash (with payer zeroed) is the ERC-3009 nonce.
struct PaymentInfo {
    address operator;
    address payer;
    address receiver;
    address token;
    uint120 maxAmount;
    uint48 preApprovalExpiry;
    uint48 authorizationExpiry;
    uint48 refundExpiry;
    uint16 minFeeBps;
    uint16 maxFeeBps;
    address feeReceiver;
    uint256 salt;
}

interface IERC20Minimal {
    function balanceOf(address owner) external view returns (uint256);
    function transfer(address to, uint256 value) external returns (bool);
    function transferFrom(address from, address to, uint256 value) external returns (bool);
}

interface IReceiveWithAuthorization {
    function receiveWithAuthorization(
        address from, address to, uint256 value, uint256 validAfter, uint256 validBefore,
        bytes32 nonce, bytes memory signature
    ) external;
}

/// Moves tokens with ERC-20s that return nothing as well as those that return a bool.
library TokenTransfers {
    error TransferFailed(address token);

    function send(address token, address to, uint256 value) internal {
        (bool ok, bytes memory ret) = token.call(abi.encodeCall(IERC20Minimal.transfer, (to, value)));
        _check(token, ok, ret);
    }

    function pull(address token, address from, address to, uint256 value) internal {
        (bool ok, bytes memory ret) =
            token.call(abi.encodeCall(IERC20Minimal.transferFrom, (from, to, value)));
        _check(token, ok, ret);
    }

    function _check(address token, bool ok, bytes memory ret) private view {
        bool accepted = ok && (ret.length == 0 ? token.code.length > 0 : abi.decode(ret, (bool)));
        if (!accepted) revert TransferFailed(token);
    }
}

/// Holds one operator's escrowed funds; only the escrow that created it may move them.
contract TokenStore {
    address public immutable authCaptureEscrow;

    error OnlyAuthCaptureEscrow();

    constructor() {
        authCaptureEscrow = msg.sender;
    }

    function sendTokens(address token, address recipient, uint256 amount) external returns (bool) {
        if (msg.sender != authCaptureEscrow) revert OnlyAuthCaptureEscrow();
        TokenTransfers.send(token, recipient, amount);
        return true;
    }
}

/// Pulls tokens into an operator's token store on the escrow's behalf.
abstract contract TokenCollector {
    enum CollectorType {
        Payment,
        Refund
    }

    /// The escrow allowed to call `collectTokens` (the canonical escrow address on the dev chain).
    address public immutable authCaptureEscrow;

    error OnlyAuthCaptureEscrow();

    constructor(address escrow) {
        authCaptureEscrow = escrow;
    }

    modifier onlyAuthCaptureEscrow() {
        if (msg.sender != authCaptureEscrow) revert OnlyAuthCaptureEscrow();
        _;
    }

    function collectorType() external view virtual returns (CollectorType);

    function collectTokens(
        PaymentInfo calldata paymentInfo,
        address tokenStore,
        uint256 amount,
        bytes calldata collectorData
    ) external virtual;

    /// The escrow's hash of `paymentInfo` with the payer zeroed: the nonce a payer signs before
    /// knowing who will submit it.
    function _payerAgnosticHash(PaymentInfo calldata paymentInfo) internal view returns (bytes32) {
        PaymentInfo memory withoutPayer = paymentInfo;
        withoutPayer.payer = address(0);
        return AuthCaptureEscrow(authCaptureEscrow).getHash(withoutPayer);
    }
}

/// Collects a payment with the payer's ERC-3009 `receiveWithAuthorization` signature over
/// `maxAmount`; anything above the requested amount goes straight back to the payer.
contract ERC3009PaymentCollector is TokenCollector {
    constructor(address escrow) TokenCollector(escrow) {}

    function collectorType() external pure override returns (CollectorType) {
        return CollectorType.Payment;
    }

    function collectTokens(
        PaymentInfo calldata paymentInfo,
        address tokenStore,
        uint256 amount,
        bytes calldata collectorData
    ) external override onlyAuthCaptureEscrow {
        address token = paymentInfo.token;
        uint256 signed = paymentInfo.maxAmount;
        IReceiveWithAuthorization(token).receiveWithAuthorization(
            paymentInfo.payer,
            address(this),
            signed,
            0,
            paymentInfo.preApprovalExpiry,
            _payerAgnosticHash(paymentInfo),
            collectorData
        );
        if (signed > amount) TokenTransfers.send(token, paymentInfo.payer, signed - amount);
        TokenTransfers.send(token, tokenStore, amount);
    }
}

/// Funds a refund from the operator's own balance (the operator approves this collector).
contract OperatorRefundCollector is TokenCollector {
    constructor(address escrow) TokenCollector(escrow) {}

    function collectorType() external pure override returns (CollectorType) {
        return CollectorType.Refund;
    }

    function collectTokens(
        PaymentInfo calldata paymentInfo,
        address tokenStore,
        uint256 amount,
        bytes calldata
    ) external override onlyAuthCaptureEscrow {
        TokenTransfers.pull(paymentInfo.token, paymentInfo.operator, tokenStore, amount);
    }
}

/// Two-phase payments: authorize (hold), capture (partial, repeated), void, reclaim after the
/// authorization expiry, refund until the refund expiry, or charge (authorize + capture at once).
contract AuthCaptureEscrow {
    struct PaymentState {
        bool hasCollectedPayment;
        uint120 capturableAmount;
        uint120 refundableAmount;
    }

    bytes32 public constant PAYMENT_INFO_TYPEHASH = keccak256(
        "PaymentInfo(address operator,address payer,address receiver,address token,uint120 maxAmount,uint48 preApprovalExpiry,uint48 authorizationExpiry,uint48 refundExpiry,uint16 minFeeBps,uint16 maxFeeBps,address feeReceiver,uint256 salt)"
    );

    uint16 internal constant _BPS_DENOMINATOR = 10_000;

    mapping(bytes32 paymentInfoHash => PaymentState state) public paymentState;

    /// 0 = free, 1 = inside an external entry point (plain storage: the escrow runs on `paris`).
    uint256 private _entered;

    event PaymentCharged(
        bytes32 indexed paymentInfoHash,
        PaymentInfo paymentInfo,
        uint256 amount,
        address tokenCollector,
        uint16 feeBps,
        address feeReceiver
    );
    event PaymentAuthorized(
        bytes32 indexed paymentInfoHash, PaymentInfo paymentInfo, uint256 amount, address tokenCollector
    );
    event PaymentCaptured(bytes32 indexed paymentInfoHash, uint256 amount, uint16 feeBps, address feeReceiver);
    event PaymentVoided(bytes32 indexed paymentInfoHash, uint256 amount);
    event PaymentReclaimed(bytes32 indexed paymentInfoHash, uint256 amount);
    event PaymentRefunded(bytes32 indexed paymentInfoHash, uint256 amount, address tokenCollector);
    event TokenStoreCreated(address indexed operator, address tokenStore);

    error InvalidSender(address sender, address expected);
    error ZeroAmount();
    error AmountOverflow(uint256 amount, uint256 limit);
    error ExceedsMaxAmount(uint256 amount, uint256 maxAmount);
    error AfterPreApprovalExpiry(uint48 timestamp, uint48 expiry);
    error InvalidExpiries(uint48 preApproval, uint48 authorization, uint48 refund);
    error FeeBpsOverflow(uint16 feeBps);
    error InvalidFeeBpsRange(uint16 minFeeBps, uint16 maxFeeBps);
    error FeeBpsOutOfRange(uint16 feeBps, uint16 minFeeBps, uint16 maxFeeBps);
    error ZeroFeeReceiver();
    error InvalidFeeReceiver(address attempted, address expected);
    error InvalidCollectorForOperation();
    error TokenCollectionFailed();
    error PaymentAlreadyCollected(bytes32 paymentInfoHash);
    error AfterAuthorizationExpiry(uint48 timestamp, uint48 expiry);
    error InsufficientAuthorization(bytes32 paymentInfoHash, uint256 authorizedAmount, uint256 requestedAmount);
    error ZeroAuthorization(bytes32 paymentInfoHash);
    error BeforeAuthorizationExpiry(uint48 timestamp, uint48 expiry);
    error AfterRefundExpiry(uint48 timestamp, uint48 expiry);
    error RefundExceedsCapture(uint256 refund, uint256 captured);
    error Reentrancy();

    modifier nonReentrant() {
        if (_entered != 0) revert Reentrancy();
        _entered = 1;
        _;
        _entered = 0;
    }

    modifier onlySender(address expected) {
        if (msg.sender != expected) revert InvalidSender(msg.sender, expected);
        _;
    }

    modifier nonZeroAmount(uint256 amount) {
        if (amount == 0) revert ZeroAmount();
        if (amount > type(uint120).max) revert AmountOverflow(amount, type(uint120).max);
        _;
    }

    // ------------------------------------------------------------------ operator entry points

    /// Collect up to `maxAmount` into escrow and hold it for capture.
    function authorize(
        PaymentInfo calldata paymentInfo,
        uint256 amount,
        address tokenCollector,
        bytes calldata collectorData
    ) external nonReentrant onlySender(paymentInfo.operator) nonZeroAmount(amount) {
        _checkTerms(paymentInfo, amount);
        bytes32 id = getHash(paymentInfo);
        if (paymentState[id].hasCollectedPayment) revert PaymentAlreadyCollected(id);
        paymentState[id] = PaymentState(true, uint120(amount), 0);
        emit PaymentAuthorized(id, paymentInfo, amount, tokenCollector);
        _collect(paymentInfo, amount, tokenCollector, collectorData, TokenCollector.CollectorType.Payment);
    }

    /// Collect and pay out in one step; the amount becomes refundable at once.
    function charge(
        PaymentInfo calldata paymentInfo,
        uint256 amount,
        address tokenCollector,
        bytes calldata collectorData,
        uint16 feeBps,
        address feeReceiver
    ) external nonReentrant onlySender(paymentInfo.operator) nonZeroAmount(amount) {
        _checkTerms(paymentInfo, amount);
        _checkFee(paymentInfo, feeBps, feeReceiver);
        bytes32 id = getHash(paymentInfo);
        if (paymentState[id].hasCollectedPayment) revert PaymentAlreadyCollected(id);
        paymentState[id] = PaymentState(true, 0, uint120(amount));
        emit PaymentCharged(id, paymentInfo, amount, tokenCollector, feeBps, feeReceiver);
        _collect(paymentInfo, amount, tokenCollector, collectorData, TokenCollector.CollectorType.Payment);
        _payOut(paymentInfo, amount, feeBps, feeReceiver);
    }

    /// Pay part (or all) of the held amount to the receiver, minus the fee; may repeat.
    function capture(PaymentInfo calldata paymentInfo, uint256 amount, uint16 feeBps, address feeReceiver)
        external
        nonReentrant
        onlySender(paymentInfo.operator)
        nonZeroAmount(amount)
    {
        _checkFee(paymentInfo, feeBps, feeReceiver);
        uint48 nowTs = uint48(block.timestamp);
        if (nowTs >= paymentInfo.authorizationExpiry) {
            revert AfterAuthorizationExpiry(nowTs, paymentInfo.authorizationExpiry);
        }
        bytes32 id = getHash(paymentInfo);
        PaymentState memory s = paymentState[id];
        if (s.capturableAmount < amount) revert InsufficientAuthorization(id, s.capturableAmount, amount);
        s.capturableAmount -= uint120(amount);
        s.refundableAmount += uint120(amount);
        paymentState[id] = s;
        emit PaymentCaptured(id, amount, feeBps, feeReceiver);
        _payOut(paymentInfo, amount, feeBps, feeReceiver);
    }

    /// Return everything still held to the payer and end the authorization.
    function void(PaymentInfo calldata paymentInfo) external nonReentrant onlySender(paymentInfo.operator) {
        bytes32 id = getHash(paymentInfo);
        uint256 held = paymentState[id].capturableAmount;
        if (held == 0) revert ZeroAuthorization(id);
        paymentState[id].capturableAmount = 0;
        emit PaymentVoided(id, held);
        _release(paymentInfo.operator, paymentInfo.token, paymentInfo.payer, held);
    }

    /// Send captured funds back to the payer, funded through a refund collector.
    function refund(
        PaymentInfo calldata paymentInfo,
        uint256 amount,
        address tokenCollector,
        bytes calldata collectorData
    ) external nonReentrant onlySender(paymentInfo.operator) nonZeroAmount(amount) {
        uint48 nowTs = uint48(block.timestamp);
        if (nowTs >= paymentInfo.refundExpiry) revert AfterRefundExpiry(nowTs, paymentInfo.refundExpiry);
        bytes32 id = getHash(paymentInfo);
        uint120 refundable = paymentState[id].refundableAmount;
        if (refundable < amount) revert RefundExceedsCapture(amount, refundable);
        paymentState[id].refundableAmount = refundable - uint120(amount);
        emit PaymentRefunded(id, amount, tokenCollector);
        _collect(paymentInfo, amount, tokenCollector, collectorData, TokenCollector.CollectorType.Refund);
        _release(paymentInfo.operator, paymentInfo.token, paymentInfo.payer, amount);
    }

    // ------------------------------------------------------------------ payer entry point

    /// After the authorization expiry the payer alone can take back what is still held.
    function reclaim(PaymentInfo calldata paymentInfo) external nonReentrant onlySender(paymentInfo.payer) {
        uint48 nowTs = uint48(block.timestamp);
        if (nowTs < paymentInfo.authorizationExpiry) {
            revert BeforeAuthorizationExpiry(nowTs, paymentInfo.authorizationExpiry);
        }
        bytes32 id = getHash(paymentInfo);
        uint256 held = paymentState[id].capturableAmount;
        if (held == 0) revert ZeroAuthorization(id);
        paymentState[id].capturableAmount = 0;
        emit PaymentReclaimed(id, held);
        _release(paymentInfo.operator, paymentInfo.token, paymentInfo.payer, held);
    }

    // ------------------------------------------------------------------ views

    /// Payment id: binds the terms to this chain and this escrow address.
    function getHash(PaymentInfo memory paymentInfo) public view returns (bytes32) {
        bytes32 termsHash = keccak256(abi.encode(PAYMENT_INFO_TYPEHASH, paymentInfo));
        return keccak256(abi.encode(block.chainid, address(this), termsHash));
    }

    /// Where an operator's escrowed funds sit (a CREATE2 address, deployed on first payout).
    function getTokenStore(address operator) public view returns (address) {
        bytes32 digest = keccak256(
            abi.encodePacked(
                bytes1(0xff), address(this), _storeSalt(operator), keccak256(type(TokenStore).creationCode)
            )
        );
        return address(uint160(uint256(digest)));
    }

    // ------------------------------------------------------------------ internals

    function _storeSalt(address operator) private pure returns (bytes32) {
        return bytes32(bytes20(operator));
    }

    function _collect(
        PaymentInfo calldata paymentInfo,
        uint256 amount,
        address tokenCollector,
        bytes calldata collectorData,
        TokenCollector.CollectorType expected
    ) private {
        if (TokenCollector(tokenCollector).collectorType() != expected) revert InvalidCollectorForOperation();
        address store = getTokenStore(paymentInfo.operator);
        uint256 before = IERC20Minimal(paymentInfo.token).balanceOf(store);
        TokenCollector(tokenCollector).collectTokens(paymentInfo, store, amount, collectorData);
        if (IERC20Minimal(paymentInfo.token).balanceOf(store) != before + amount) revert TokenCollectionFailed();
    }

    function _release(address operator, address token, address to, uint256 amount) private {
        address store = getTokenStore(operator);
        if (store.code.length == 0) {
            store = address(new TokenStore{salt: _storeSalt(operator)}());
            emit TokenStoreCreated(operator, store);
        }
        TokenStore(store).sendTokens(token, to, amount);
    }

    /// Fee = amount * feeBps / 10000 (rounded down) to the fee receiver, the rest to the receiver.
    function _payOut(PaymentInfo calldata paymentInfo, uint256 amount, uint16 feeBps, address feeReceiver) private {
        uint256 fee = amount * feeBps / _BPS_DENOMINATOR;
        if (fee > 0) _release(paymentInfo.operator, paymentInfo.token, feeReceiver, fee);
        if (amount > fee) _release(paymentInfo.operator, paymentInfo.token, paymentInfo.receiver, amount - fee);
    }

    function _checkTerms(PaymentInfo calldata paymentInfo, uint256 amount) private view {
        if (amount > paymentInfo.maxAmount) revert ExceedsMaxAmount(amount, paymentInfo.maxAmount);
        uint48 nowTs = uint48(block.timestamp);
        uint48 preApproval = paymentInfo.preApprovalExpiry;
        uint48 authorization = paymentInfo.authorizationExpiry;
        uint48 refundBy = paymentInfo.refundExpiry;
        if (nowTs >= preApproval) revert AfterPreApprovalExpiry(nowTs, preApproval);
        if (preApproval > authorization || authorization > refundBy) {
            revert InvalidExpiries(preApproval, authorization, refundBy);
        }
        if (paymentInfo.maxFeeBps > _BPS_DENOMINATOR) revert FeeBpsOverflow(paymentInfo.maxFeeBps);
        if (paymentInfo.minFeeBps > paymentInfo.maxFeeBps) {
            revert InvalidFeeBpsRange(paymentInfo.minFeeBps, paymentInfo.maxFeeBps);
        }
    }

    function _checkFee(PaymentInfo calldata paymentInfo, uint16 feeBps, address feeReceiver) private pure {
        if (feeBps < paymentInfo.minFeeBps || feeBps > paymentInfo.maxFeeBps) {
            revert FeeBpsOutOfRange(feeBps, paymentInfo.minFeeBps, paymentInfo.maxFeeBps);
        }
        if (feeReceiver == address(0) && feeBps > 0) revert ZeroFeeReceiver();
        address committed = paymentInfo.feeReceiver;
        if (committed != address(0) && committed != feeReceiver) revert InvalidFeeReceiver(feeReceiver, committed);
    }
}
