"""Send one signed webhook and classify the answer.

Retry on timeouts, connection errors, 3xx (redirects are never followed), 5xx, 429 (honouring
``Retry-After``) and 408/409/425; give up at once on other 4xx; 410 Gone disables the endpoint.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import httpx

from connector.webhooks.signing import headers_for

#: Seconds to wait before attempt n+1 (index n), ~3 days in all, like Standard Webhooks'
#: schedule stretched with two more attempts: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 20 h.
RETRY_SCHEDULE_S: tuple[int, ...] = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 72000)
MAX_ATTEMPTS = len(RETRY_SCHEDULE_S) + 1
RETRY_STATUSES = frozenset({408, 409, 425, 429})
MAX_RETRY_AFTER = timedelta(hours=24)


@dataclass(frozen=True)
class Outcome:
    kind: str  # delivered | retry | failed | gone
    status_code: int | None
    latency_ms: int
    error: str | None
    excerpt: str | None
    retry_after: timedelta | None = None


def next_delay(attempt: int, retry_after: timedelta | None = None) -> timedelta | None:
    """Delay before the next try after ``attempt`` tries (None = no more tries: dead)."""
    if attempt >= MAX_ATTEMPTS:
        return None
    base = RETRY_SCHEDULE_S[attempt - 1]
    delay = timedelta(seconds=base * random.uniform(0.9, 1.1))
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


def _retry_after(value: str | None, now: datetime) -> timedelta | None:
    if not value:
        return None
    if value.strip().isdigit():
        return timedelta(seconds=int(value.strip()))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(timedelta(0), when - now)


def send(
    client: httpx.Client,
    url: str,
    *,
    event_id: str,
    body: bytes,
    secrets: list[str],
    max_response_bytes: int,
    now: datetime,
) -> Outcome:
    stamp = int(now.timestamp())
    headers = {
        **headers_for(secrets, event_id, stamp, body),
        "content-type": "application/json",
        "user-agent": "x402-connector-webhooks/1",
    }
    start = time.perf_counter()
    try:
        with client.stream("POST", url, content=body, headers=headers) as response:
            chunk = b""
            for part in response.iter_bytes():
                chunk += part
                if len(chunk) >= max_response_bytes:
                    break
            status = response.status_code
            retry_after = _retry_after(response.headers.get("retry-after"), now)
    except httpx.TimeoutException as exc:
        return Outcome("retry", None, _ms(start), f"timeout: {type(exc).__name__}", None)
    except httpx.HTTPError as exc:
        return Outcome("retry", None, _ms(start), f"{type(exc).__name__}: {exc}"[:500], None)
    except Exception as exc:  # SSRF refusal at connect time and the like
        detail = getattr(exc, "detail", str(exc))
        return Outcome("failed", None, _ms(start), f"{type(exc).__name__}: {detail}"[:500], None)
    excerpt = chunk[:512].decode("utf-8", "replace")
    latency = _ms(start)
    if 200 <= status < 300:
        return Outcome("delivered", status, latency, None, excerpt)
    if status == 410:
        return Outcome("gone", status, latency, "endpoint answered 410 Gone", excerpt)
    if 300 <= status < 400 or status >= 500 or status in RETRY_STATUSES:
        return Outcome("retry", status, latency, f"HTTP {status}", excerpt, retry_after)
    return Outcome("failed", status, latency, f"HTTP {status}", excerpt)


def _ms(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)
