"""The composition root: settings, database engine, vault and cached outbound clients.

The API process and every worker process build one :class:`Runtime` and hand it to the services.
Services never read globals, so tests build a Runtime over their own database and chain.

``dispatch`` is how the domain asks for background work without importing Celery: the worker and
API layers install a function that enqueues a named task; the default runs nothing.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy.engine import Engine

from connector.facilitator.auth import CdpJwtAuth, FacilitatorCredentials
from connector.facilitator.client import FacilitatorClient
from connector.net.ssrf import OutboundPolicy, Resolver
from connector.settings import Settings, get_settings
from connector.storage.db import make_engine

Dispatch = Callable[[str, tuple[Any, ...]], None]


def _no_dispatch(task: str, args: tuple[Any, ...]) -> None:
    return None


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    dispatch: Dispatch = _no_dispatch
    #: Host resolution for the SSRF guard (None: the system resolver); tests install a stub.
    resolver: Resolver | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _cache: dict[tuple[str, ...], Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, engine: Engine | None = None
    ) -> Runtime:
        settings = settings or get_settings()
        return cls(settings=settings, engine=engine or make_engine(settings.resolved_database_url))

    def _cached(self, key: tuple[str, ...], build: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._cache:
                self._cache[key] = build()
            return self._cache[key]

    @property
    def vault(self) -> Any:
        from connector.vault import Vault

        return self._cached(("vault",), lambda: Vault.from_settings(self.settings))

    def outbound(self) -> OutboundPolicy:
        """The SSRF policy every client of a customer-controlled URL connects through."""
        return OutboundPolicy.from_settings(self.settings, self.resolver)

    def chain(self, rpc_url: str) -> Any:
        """A chain client for a connection's ``rpc_url`` (SSRF-guarded), shared by every thread
        of this process."""
        from connector.chain import ChainClient

        return self._cached(
            ("chain", rpc_url),
            lambda: ChainClient(
                rpc_url,
                timeout_s=self.settings.rpc_timeout_s,
                poll_interval_s=self.settings.receipt_poll_interval_s,
                max_log_range=self.settings.rpc_max_log_range,
                transport=self.outbound().transport(
                    limits=httpx.Limits(max_connections=64, max_keepalive_connections=32)
                ),
            ),
        )

    def payment_state_reader(self, rpc_url: str) -> Any:
        """What a payment's verification reads from the chain (nonce used, payer's balance),
        through a pooled ``http.client`` reader where the URL allows, else the chain client
        (:mod:`connector.chain.reads`); SSRF-guarded either way."""
        from connector.chain.reads import PaymentStateReader, lightweight

        key = ("payment-state-reader", rpc_url)
        found = self._cache.get(key)  # decided once: reading the proxy settings is not free
        if found is not None:
            return found
        if not lightweight(rpc_url):
            chain = self.chain(rpc_url)
            return self._cached(key, lambda: chain)
        return self._cached(
            key,
            lambda: PaymentStateReader(
                rpc_url, timeout_s=self.settings.rpc_timeout_s, guard=self.outbound()
            ),
        )

    def facilitator(self, base_url: str, api_key: FacilitatorCredentials) -> FacilitatorClient:
        # Keyed by a hash of the credentials so the cache key itself holds no secret.
        if isinstance(api_key, CdpJwtAuth):
            digest = api_key.fingerprint
        else:
            digest = hashlib.sha256((api_key or "").encode()).hexdigest()[:16]
        client: FacilitatorClient = self._cached(
            ("facilitator", base_url, digest),
            lambda: FacilitatorClient(
                base_url,
                api_key=api_key,
                timeout_s=self.settings.facilitator_timeout_s,
                max_attempts=self.settings.external_max_retries,
                guard=self.outbound(),
            ),
        )
        return client

    def close(self) -> None:
        with self._lock:
            for value in self._cache.values():
                close = getattr(value, "close", None)
                if callable(close):
                    close()
            self._cache.clear()
        self.engine.dispose()
