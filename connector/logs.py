"""Structured logging that cannot leak secrets.

Every record passes a redaction filter before any handler sees it: private keys (32-byte hex),
webhook secrets (``whsec_…``), admin/API keys (``x402c_sk_…``) and any value registered with
:func:`register_secret` are masked. Redaction runs on the rendered message and on structured
``extra`` fields, so a careless ``log.info("%s", key)`` is still safe.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any

_PATTERNS = [
    re.compile(r"0x[0-9a-fA-F]{64}(?![0-9a-fA-F])"),  # private keys / 32-byte secrets
    re.compile(r"whsec_[A-Za-z0-9+/=_-]{8,}"),
    re.compile(r"x402c_(?:sk|ak)_[A-Za-z0-9_-]{8,}"),
]
_known: set[str] = set()
_known_lock = threading.Lock()
_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def register_secret(value: str) -> None:
    """Mask ``value`` wherever it would appear in a log line from now on."""
    if len(value) >= 8:
        with _known_lock:
            _known.add(value)


def redact(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub("[REDACTED]", text)
    if _known:
        with _known_lock:
            known = list(_known)
        for value in known:
            if value in text:
                text = text.replace(value, "[REDACTED]")
    return text


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """Renders the message once, redacts it, and drops the raw args."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not kill logging
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        for key, val in list(vars(record).items()):
            if key not in _STD_ATTRS:
                setattr(record, key, _clean(val))
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, val in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                doc[key] = val
        if record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, default=str)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}"
            for k, v in vars(record).items()
            if k not in _STD_ATTRS and not k.startswith("_")
        )
        line = f"{record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += f" [{extras}]"
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


def configure_logging(fmt: str = "console", level: str = "INFO") -> None:
    """Install one redacting handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_x402c", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    handler.addFilter(RedactingFilter())
    handler._x402c = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(RedactingFilter())
    return logger
