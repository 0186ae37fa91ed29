"""HTTP client for any spec-conforming x402 facilitator (``/verify``, ``/settle``, ``/supported``).

Transport failures (connection refused, timeouts) are retried with backoff; answers are not: a
4xx or 5xx is reported at once as a :class:`FacilitatorError` with the status. Error messages
never carry the remote body (they reach API callers, and a URL pointed at an internal service
must not turn the connector into a reader of it); a bounded excerpt goes to the log instead.

With a ``guard`` (:class:`~connector.net.ssrf.OutboundPolicy`; the runtime always passes one for
a connection's facilitator URL) every TCP connection is vetted and pinned at connect time,
whatever authentication the request carries.

Retrying ``/settle`` after a timeout is safe because a settlement is bound to the EIP-3009
nonce: a facilitator either returns the first transaction or the chain refuses the reused nonce;
money cannot move twice.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from connector.errors import ExternalServiceError
from connector.facilitator.auth import CdpJwtAuth, FacilitatorCredentials
from connector.facilitator.transport import Answer, KeepAliveClient, TransportFailure, proxied
from connector.logs import get_logger
from connector.net.ssrf import OutboundPolicy
from connector.retry import call_with_retries

log = get_logger("facilitator.client")

_EXCERPT = 500
_MAX_ANSWER = 1 << 20  # a facilitator's answers are a few hundred bytes


class FacilitatorError(ExternalServiceError):
    code = "facilitator_error"
    title = "Facilitator error"


class FacilitatorClient:
    """Synchronous client; one instance per facilitator URL and API key, safe across threads."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: FacilitatorCredentials = None,
        timeout_s: float = 15.0,
        max_attempts: int = 3,
        transport: httpx.BaseTransport | None = None,
        guard: OutboundPolicy | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._guard = guard
        headers = {"accept": "application/json", "user-agent": "x402-connector"}
        # Bearer: one static header. JWT (CDP-style): a fresh signed token per request.
        self._jwt = api_key if isinstance(api_key, CdpJwtAuth) else None
        if isinstance(api_key, str) and api_key:
            headers["authorization"] = f"Bearer {api_key}"
        connect_s = min(5.0, timeout_s)
        # The pooled http.client transport unless a test injects an httpx transport or the
        # environment sends this URL through a proxy (which only httpx implements here).
        self._fast: KeepAliveClient | None = None
        self._http: httpx.Client | None = None
        if transport is None and not proxied(self.base_url):
            self._fast = KeepAliveClient(
                self.base_url,
                headers=headers,
                timeout_s=timeout_s,
                connect_timeout_s=connect_s,
                max_body_bytes=_MAX_ANSWER,
                create_connection=guard.create_connection if guard is not None else None,
            )
        else:
            if transport is None and guard is not None:
                transport = guard.transport()
            self._http = httpx.Client(
                base_url=self.base_url,
                headers=headers,
                timeout=httpx.Timeout(timeout_s, connect=connect_s),
                transport=transport,
                follow_redirects=False,
            )
        self._attempts = max_attempts

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> FacilitatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _once(self, method: str, path: str, body: dict[str, Any] | None) -> Answer:
        auth = self._jwt.headers(method, self.base_url + path) if self._jwt else None
        if self._fast is not None:
            data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
            return self._fast.request(method, path, data, auth)
        assert self._http is not None
        if self._guard is not None:
            # A proxy from the environment opens the connection itself (the transport's
            # connect-time check does not see it): check the URL before every request.
            self._guard.check_url(self.base_url + path)
        response = self._http.request(method, path, json=body, headers=auth)
        return Answer(response.status_code, response.content[:_MAX_ANSWER])

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            answer = call_with_retries(
                lambda: self._once(method, path, body),
                retry_on=(httpx.TransportError, TransportFailure),
                attempts=self._attempts,
            )
        except (httpx.TransportError, TransportFailure) as exc:
            raise FacilitatorError(
                f"facilitator {self.base_url}{path} unreachable after {self._attempts} attempts: "
                f"{type(exc).__name__}",
                url=self.base_url + path,
            ) from exc
        if answer.status >= 400:
            self._log_excerpt(path, answer)
            raise FacilitatorError(
                f"facilitator {path} answered HTTP {answer.status}",
                status_code=answer.status,
                retryable=answer.status >= 500 or answer.status == 429,
            )
        if not answer.complete:
            raise FacilitatorError(f"facilitator {path} answer exceeds {_MAX_ANSWER} bytes")
        try:
            return json.loads(answer.body)
        except ValueError as exc:
            self._log_excerpt(path, answer)
            raise FacilitatorError(f"facilitator {path} answered non-JSON") from exc

    def _log_excerpt(self, path: str, answer: Answer) -> None:
        """The operator may need the body to debug; the log gets a bounded, escaped excerpt."""
        log.warning(
            "facilitator error answer",
            extra={
                "path": path,
                "status": answer.status,
                "excerpt": repr(answer.body[:_EXCERPT])[: _EXCERPT + 50],
            },
        )

    @staticmethod
    def _body(payload: dict[str, Any], requirements: dict[str, Any]) -> dict[str, Any]:
        return {
            "x402Version": int(payload.get("x402Version", 1)),
            "paymentPayload": payload,
            "paymentRequirements": requirements,
        }

    def supported(self) -> dict[str, Any]:
        result = self._request("GET", "/supported")
        if not isinstance(result, dict) or not isinstance(result.get("kinds"), list):
            raise FacilitatorError("facilitator /supported answer has no 'kinds' list")
        return result

    def verify(self, payload: dict[str, Any], requirements: dict[str, Any]) -> dict[str, Any]:
        """Wire-format payload and requirements in; ``{isValid, invalidReason?, payer?}`` out."""
        result = self._request("POST", "/verify", self._body(payload, requirements))
        if not isinstance(result, dict) or not isinstance(result.get("isValid"), bool):
            raise FacilitatorError("facilitator /verify answer has no boolean 'isValid'")
        return result

    def settle(self, payload: dict[str, Any], requirements: dict[str, Any]) -> dict[str, Any]:
        """``{success, errorReason?, transaction, network, payer?}``; safe to call again."""
        result = self._request("POST", "/settle", self._body(payload, requirements))
        if not isinstance(result, dict) or not isinstance(result.get("success"), bool):
            raise FacilitatorError("facilitator /settle answer has no boolean 'success'")
        return result
