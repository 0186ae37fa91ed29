"""Typed protocol errors. All are :class:`~connector.errors.ValidationFailed` (HTTP 400/422
depending on the edge), so malformed input can never become an unhandled exception."""

from __future__ import annotations

from connector.errors import ValidationFailed


class ProtocolError(ValidationFailed):
    code = "x402_protocol_error"
    title = "x402 protocol error"


class MalformedPayment(ProtocolError):
    code = "x402_malformed"
    title = "Malformed x402 message"


class UnsupportedScheme(ProtocolError):
    code = "x402_unsupported_scheme"
    title = "Unsupported x402 scheme"


class UnknownNetwork(ProtocolError):
    code = "x402_unknown_network"
    title = "Unknown network"


class NoAcceptableOffer(ProtocolError):
    code = "x402_no_acceptable_offer"
    title = "No acceptable payment option"
