"""Strict readers for untrusted JSON fields: each failure names the field it found wrong."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from eth_utils.address import to_checksum_address

from connector.x402.errors import MalformedPayment

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_UINT = re.compile(r"^[0-9]{1,78}$")
_BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
_HEX = re.compile(r"^0x(?:[0-9a-fA-F]{2})+$")


def obj(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise MalformedPayment(f"{where} must be a JSON object", field=where)
    return data


def string(data: dict[str, Any], key: str, where: str, *, max_len: int = 2048) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedPayment(f"{where}.{key} must be a non-empty string", field=f"{where}.{key}")
    if len(value) > max_len:
        raise MalformedPayment(f"{where}.{key} is too long", field=f"{where}.{key}")
    return value


def optional_string(
    data: dict[str, Any], key: str, where: str, *, max_len: int = 2048
) -> str | None:
    if data.get(key) is None:
        return None
    value = data[key]
    if not isinstance(value, str) or len(value) > max_len:
        raise MalformedPayment(f"{where}.{key} must be a string", field=f"{where}.{key}")
    return value


def uint_string(data: dict[str, Any], key: str, where: str) -> int:
    """Amounts and timestamps travel as decimal strings; plain JSON integers are tolerated."""
    value = data.get(key)
    if isinstance(value, bool):
        raise MalformedPayment(f"{where}.{key} must be a decimal string", field=f"{where}.{key}")
    if isinstance(value, int) and value >= 0:
        if value >= 2**256:
            raise MalformedPayment(f"{where}.{key} exceeds uint256", field=f"{where}.{key}")
        return value
    if not isinstance(value, str) or not _UINT.match(value):
        raise MalformedPayment(
            f"{where}.{key} must be a non-negative integer as a decimal string",
            field=f"{where}.{key}",
        )
    number = int(value)
    if number >= 2**256:
        raise MalformedPayment(f"{where}.{key} exceeds uint256", field=f"{where}.{key}")
    return number


def positive_int(data: dict[str, Any], key: str, where: str, *, default: int | None = None) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 10**7:
        raise MalformedPayment(f"{where}.{key} must be a positive integer", field=f"{where}.{key}")
    return value


@lru_cache(maxsize=4096)
def checksum(value: str) -> str:
    """EIP-55 form of an address. Cached: a handful of addresses (wallets, payees, tokens) recur
    on every payment, and each checksum costs a Keccak hash plus eth_utils' validation."""
    return str(to_checksum_address(value))


def address(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not _ADDRESS.match(value):
        raise MalformedPayment(f"{where}.{key} must be a 0x-address", field=f"{where}.{key}")
    return checksum(value)


def bytes32(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not _BYTES32.match(value):
        raise MalformedPayment(f"{where}.{key} must be 32 bytes of hex", field=f"{where}.{key}")
    return value.lower()


def hex_bytes(data: dict[str, Any], key: str, where: str, *, max_bytes: int = 4096) -> bytes:
    value = data.get(key)
    if not isinstance(value, str) or not _HEX.match(value) or len(value) > 2 + 2 * max_bytes:
        raise MalformedPayment(f"{where}.{key} must be 0x-hex bytes", field=f"{where}.{key}")
    return bytes.fromhex(value[2:])


def optional_obj(data: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = data.get(key)
    if value is None:
        return None
    return obj(value, f"{where}.{key}")
