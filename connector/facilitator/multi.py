"""One facilitator serving many networks: routes each request to the network it names, lists
every (version, scheme, network) it serves, and watches the signer's gas on every chain.

Each network is a :class:`LocalFacilitator` with its own chain client (RPC failover inside) and
its own accepted tokens; the signer key is the same everywhere, its transaction nonces are kept
per chain by each client.
"""

from __future__ import annotations

import threading
from typing import Any

from eth_account.signers.local import LocalAccount

from connector.chain.client import ChainClient
from connector.facilitator.config import FacilitatorConfig, NetworkConfig
from connector.facilitator.local import LocalFacilitator
from connector.logs import get_logger
from connector.metrics import FACILITATOR_GAS_LOW, FACILITATOR_GAS_WEI
from connector.x402 import fields as f
from connector.x402.errors import UnknownNetwork
from connector.x402.networks import to_caip2

log = get_logger(__name__)

UNSUPPORTED_NETWORK = "unsupported_network"


class MultiFacilitator:
    def __init__(
        self,
        by_network: dict[str, LocalFacilitator],
        signer: LocalAccount,
        *,
        min_gas_wei: dict[str, int] | None = None,
    ) -> None:
        self.by_network = by_network
        self.signer = signer
        self.min_gas_wei = min_gas_wei or {}
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: FacilitatorConfig, signer: LocalAccount) -> MultiFacilitator:
        by_network: dict[str, LocalFacilitator] = {}
        for net in config.networks:
            by_network[net.network] = _network_facilitator(net, signer, config)
        return cls(
            by_network,
            signer,
            min_gas_wei={n.network: n.min_gas_balance_wei for n in config.networks},
        )

    # ------------------------------------------------------------------ routing

    def _route(self, body: Any) -> tuple[LocalFacilitator | None, str, Any]:
        d = f.obj(body, "body")
        requirement = f.obj(d.get("paymentRequirements"), "paymentRequirements")
        named = f.string(requirement, "network", "paymentRequirements", max_len=64)
        payload = d.get("paymentPayload")
        payer = None
        if isinstance(payload, dict):
            inner = payload.get("payload")
            auth = inner.get("authorization") if isinstance(inner, dict) else None
            payer = auth.get("from") if isinstance(auth, dict) else None
        try:
            network = to_caip2(named)
        except UnknownNetwork:
            return None, named, payer
        return self.by_network.get(network), named, payer

    def verify(self, body: Any) -> dict[str, Any]:
        target, _, payer = self._route(body)
        if target is None:
            return {"isValid": False, "invalidReason": UNSUPPORTED_NETWORK, "payer": payer}
        return target.verify(body)

    def settle(self, body: Any) -> dict[str, Any]:
        target, named, payer = self._route(body)
        if target is None:
            return {
                "success": False,
                "errorReason": UNSUPPORTED_NETWORK,
                "payer": payer,
                "transaction": "",
                "network": named,
            }
        return target.settle(body)

    def supported(self) -> dict[str, Any]:
        kinds: list[dict[str, Any]] = []
        for facilitator in self.by_network.values():
            kinds.extend(facilitator.supported()["kinds"])
        kinds.sort(key=lambda k: (-int(k["x402Version"]), str(k["network"])))
        return {"kinds": kinds, "extensions": [], "signers": {"eip155:*": [self.signer.address]}}

    # ------------------------------------------------------------------ gas

    def check_gas(self) -> list[str]:
        """Read the signer's native balance on every network; returns the networks below their
        threshold (each logged as a warning and counted). A read failure is logged, not fatal."""
        low: list[str] = []
        for network, facilitator in self.by_network.items():
            try:
                balance = facilitator.chain.native_balance(self.signer.address)
            except Exception as exc:  # one node down must not stop the others' checks
                log.warning(
                    "facilitator gas check failed", extra={"network": network, "error": str(exc)}
                )
                continue
            FACILITATOR_GAS_WEI.labels(network=network).set(balance)
            threshold = self.min_gas_wei.get(network, 0)
            if balance < threshold:
                low.append(network)
                FACILITATOR_GAS_LOW.labels(network=network).inc()
                log.warning(
                    "facilitator.gas_low",
                    extra={
                        "event": "facilitator.gas_low",
                        "network": network,
                        "signer": self.signer.address,
                        "balance_wei": str(balance),
                        "threshold_wei": str(threshold),
                    },
                )
        return low

    def start_gas_monitor(self, interval_s: float) -> None:
        def run() -> None:
            while not self._stop.is_set():
                self.check_gas()
                self._stop.wait(interval_s)

        self._monitor = threading.Thread(target=run, name="gas-monitor", daemon=True)
        self._monitor.start()

    def close(self) -> None:
        self._stop.set()
        for facilitator in self.by_network.values():
            facilitator.chain.close()


def _network_facilitator(
    net: NetworkConfig, signer: LocalAccount, config: FacilitatorConfig
) -> LocalFacilitator:
    # Many settles at once: their RPC calls share JSON-RPC batches (fewer round trips).
    client = ChainClient(
        net.rpc_urls[0],
        fallback_urls=net.rpc_urls[1:],
        combine=net.rpc_max_batch > 1,
        max_batch=net.rpc_max_batch,
    )
    return LocalFacilitator(
        client,
        signer,
        network=net.network,
        assets=set(net.tokens or []),
        receipt_timeout_s=config.receipt_timeout_s,
        max_in_flight=config.max_in_flight,
        confirmations=net.required_confirmations,
    )


__all__ = ["UNSUPPORTED_NETWORK", "MultiFacilitator"]
