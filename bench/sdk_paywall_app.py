"""The baseline server of ``bench_paywall.py``: one route protected by the official SDK's FastAPI
``payment_middleware``, configured from environment variables (uvicorn imports it by name)."""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from x402 import x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.http.middleware.fastapi import payment_middleware
from x402.mechanisms.evm.exact import register_exact_evm_server


def create() -> FastAPI:
    env = os.environ
    network = env["SDK_NETWORK"]
    facilitator = HTTPFacilitatorClient(FacilitatorConfig(url=env["SDK_FACILITATOR"]))
    server = x402ResourceServer(facilitator)
    register_exact_evm_server(server, network)
    routes = {
        "GET /paid": {
            "accepts": {
                "scheme": "exact",
                "payTo": env["SDK_PAY_TO"],
                "price": {
                    "amount": env["SDK_AMOUNT"],
                    "asset": env["SDK_ASSET"],
                    "extra": {"name": env["SDK_TOKEN_NAME"], "version": env["SDK_TOKEN_VERSION"]},
                },
                "network": network,
            },
            "description": "bench resource",
        }
    }
    app = FastAPI()
    middleware = payment_middleware(routes, server)

    @app.middleware("http")
    async def x402(request: Request, call_next: Any) -> Response:
        return await middleware(request, call_next)

    @app.get("/paid")
    def paid() -> dict[str, int]:
        return {"secret": 1}

    return app


app = create()
