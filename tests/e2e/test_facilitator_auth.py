"""Remote facilitator auth modes: none, bearer, and a per-request signed JWT (CDP-style), each
against a facilitator on loopback that checks what it is sent. The JWT checker below verifies the
signature with the public key, the header (alg, kid, nonce) and claims (sub, iss, nbf/exp, the
request's method + host + path in ``uris``) and refuses a replayed nonce."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from eth_account import Account
from fastapi import Request
from fastapi.responses import JSONResponse

from api.facilitator_app import create_facilitator_app
from api.stack import Stack
from connector.chain import ChainClient
from connector.facilitator.auth import CdpJwtAuth
from connector.facilitator.local import LocalFacilitator
from tests.fixtures.servers import LiveServer, free_port
from tests.fixtures.stack import Agent, make_agent

pytestmark = [pytest.mark.chain, pytest.mark.xdist_group("stack")]

KEY_ID = "organizations/org-1/apiKeys/key-1"


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class JwtChecker:
    public_key: Any
    key_id: str
    seen_nonces: set[str] = field(default_factory=set)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def check(self, token: str, method: str, host: str, path: str) -> str | None:
        """None if valid, else why not."""
        try:
            head_b64, claims_b64, sig_b64 = token.split(".")
            header, claims = json.loads(_unb64(head_b64)), json.loads(_unb64(claims_b64))
        except ValueError:
            return "not a JWT"
        signing_input, signature = f"{head_b64}.{claims_b64}".encode(), _unb64(sig_b64)
        try:
            if header.get("alg") == "ES256":
                r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
                self.public_key.verify(
                    encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256())
                )
            elif header.get("alg") == "EdDSA":
                self.public_key.verify(signature, signing_input)
            else:
                return "bad alg"
        except Exception:
            return "bad signature"
        now = int(time.time())
        if header.get("kid") != self.key_id or claims.get("sub") != self.key_id:
            return "wrong key id"
        if claims.get("iss") != "cdp" or header.get("typ") != "JWT":
            return "wrong issuer or type"
        if not (claims["nbf"] <= now + 5 and now < claims["exp"] <= claims["nbf"] + 120):
            return "outside its lifetime"
        if claims.get("uris") != [f"{method} {host}{path}"]:
            return f"bound to {claims.get('uris')}, not {method} {host}{path}"
        nonce = header.get("nonce")
        if not isinstance(nonce, str) or len(nonce) != 16 or nonce in self.seen_nonces:
            return "missing or replayed nonce"
        self.seen_nonces.add(nonce)
        self.accepted.append(claims)
        return None


@dataclass
class GuardedFacilitator:
    url: str
    checker: JwtChecker | None
    bearer: str | None
    hits: list[str] = field(default_factory=list)


@contextmanager
def _serve(
    stack: Stack, checker: JwtChecker | None = None, bearer: str | None = None
) -> Iterator[GuardedFacilitator]:
    gas = Account.create()
    chain = ChainClient(stack.chain.rpc_url)
    chain.rpc("anvil_setBalance", [gas.address, hex(10**20)])
    local = LocalFacilitator(chain, gas, network=stack.chain.network, assets={stack.chain.token})
    app = create_facilitator_app(local)
    port = free_port()
    guarded = GuardedFacilitator(f"http://127.0.0.1:{port}", checker, bearer)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        guarded.hits.append(request.url.path)
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
        why = None
        if checker is not None:
            host = request.headers.get("host", "")
            why = (
                "no token"
                if token is None
                else checker.check(token, request.method, host, request.url.path)
            )
        elif bearer is not None and token != bearer:
            why = "wrong bearer"
        elif bearer is None and header:
            why = "unexpected credentials"
        if why:
            if checker is not None:
                checker.refused.append(why)
            return JSONResponse({"error": why}, status_code=401)
        return await call_next(request)

    try:
        with LiveServer(app, port):
            yield guarded
    finally:
        chain.close()


def _ec_key() -> tuple[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    return pem, key.public_key()


def _ed_key() -> tuple[str, Any]:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(seed + public).decode(), key.public_key()


@pytest.fixture(scope="module")
def buyer(stack: Stack) -> Agent:
    return make_agent(stack, stack.accounts[8])


def _seller(stack: Stack, buyer: Agent, url: str, **auth: str) -> Agent:
    response = buyer.http.post(
        "/v1/admin/connections",
        json={
            "name": "seller behind an authenticated facilitator",
            "network": stack.chain.network,
            "rpc_url": stack.chain.rpc_url,
            "facilitator_url": url,
            "asset": stack.chain.token,
            "pay_to": Account.create().address,
            **auth,
        },
    )
    assert response.status_code == 201, response.text
    return Agent(stack, buyer.http, response.json()["id"], Account.create())


def _sell_and_pay(seller: Agent, buyer: Agent) -> dict[str, Any]:
    request = seller.run("receive", {"amount": "321"})["payment_request"]
    result: dict[str, Any] = buyer.run("send", {"url": request["url"]})
    return result


@pytest.mark.parametrize("make_key", [_ec_key, _ed_key], ids=["ES256", "EdDSA"])
def test_per_request_jwt_auth_is_accepted_by_a_checking_facilitator(
    stack: Stack, buyer: Agent, make_key: Any
) -> None:
    secret, public = make_key()
    checker = JwtChecker(public, KEY_ID)
    with _serve(stack, checker=checker) as guarded:
        seller = _seller(stack, buyer, guarded.url, api_key=secret, api_key_id=KEY_ID)
        view = buyer.http.get(f"/v1/admin/connections/{seller.connection_id}").json()
        assert view["facilitator_auth"] == "jwt" and view["api_key_id"] == KEY_ID
        assert secret not in json.dumps(view)
        paid = _sell_and_pay(seller, buyer)
        assert paid["payment"]["state"] == "settled", paid
        # An automatically captured exact payment: the paywall verifies it itself and asks
        # only /settle (decision 0012).
        assert guarded.hits[-1:] == ["/settle"] and "/verify" not in guarded.hits
        assert checker.refused == []
        # a token per request, bound to its own path
        uris = [c["uris"][0].split(" ", 1)[0] + " " + c["uris"][0].rsplit("/", 1)[1]
                for c in checker.accepted]  # fmt: skip
        assert uris == ["POST settle"]


def test_a_wrong_jwt_secret_is_refused_by_the_facilitator(stack: Stack) -> None:
    from connector.facilitator.client import FacilitatorClient, FacilitatorError

    secret, public = _ec_key()
    other_secret, _ = _ec_key()
    checker = JwtChecker(public, KEY_ID)
    with _serve(stack, checker=checker) as guarded:
        wrong = FacilitatorClient(guarded.url, api_key=CdpJwtAuth(KEY_ID, other_secret))
        with wrong, pytest.raises(FacilitatorError) as refused:
            wrong.supported()
        assert refused.value.context["status_code"] == 401
        assert checker.refused == ["bad signature"]
        with FacilitatorClient(guarded.url, api_key=CdpJwtAuth(KEY_ID, secret)) as client:
            assert client.supported()["kinds"]
            assert client.supported()["kinds"]  # a second request: a second, fresh token
        assert len(checker.accepted) == 2 and checker.refused == ["bad signature"]


@pytest.mark.parametrize("mode", ["bearer", "none"])
def test_bearer_and_no_auth(stack: Stack, buyer: Agent, mode: str) -> None:
    bearer = "bearer-secret-0123456789" if mode == "bearer" else None
    with _serve(stack, bearer=bearer) as guarded:
        auth = {"api_key": bearer} if bearer else {}
        seller = _seller(stack, buyer, guarded.url, **auth)
        view = buyer.http.get(f"/v1/admin/connections/{seller.connection_id}").json()
        assert view["facilitator_auth"] == mode
        assert _sell_and_pay(seller, buyer)["payment"]["state"] == "settled"
        assert guarded.hits[-1:] == ["/settle"]  # no /verify: decision 0012


def test_jwt_tokens_are_bound_to_method_and_url_and_unique() -> None:
    secret, public = _ec_key()
    auth = CdpJwtAuth(KEY_ID, secret)
    checker = JwtChecker(public, KEY_ID)
    url = "https://api.cdp.coinbase.com/platform/v2/x402/settle"
    token = auth.token("post", url)
    assert checker.check(token, "POST", "api.cdp.coinbase.com", "/platform/v2/x402/settle") is None
    assert checker.check(token, "POST", "api.cdp.coinbase.com", "/platform/v2/x402/settle")
    other = auth.token("POST", url)
    assert checker.check(other, "POST", "api.cdp.coinbase.com", "/platform/v2/x402/verify")
    assert KEY_ID in repr(auth) and secret not in repr(auth)
    with pytest.raises(Exception, match=r"PEM|base64"):
        CdpJwtAuth(KEY_ID, "not a key")
