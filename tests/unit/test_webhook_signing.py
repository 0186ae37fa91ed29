"""Our Standard Webhooks signatures verify with the `standardwebhooks` package, and only then."""

from __future__ import annotations

import json
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from connector.webhooks.signing import SignatureInvalid, generate_secret, headers_for, verify

BODY = json.dumps({"id": "evt_1", "type": "payment.settled", "data": {"amount": "10"}}).encode()


def test_package_verifies_what_we_sign() -> None:
    secret = generate_secret()
    headers = headers_for([secret], "evt_1", int(time.time()), BODY)
    assert Webhook(secret).verify(BODY, headers)["type"] == "payment.settled"
    verify(secret, headers, BODY, now=int(time.time()))


@pytest.mark.parametrize("attack", ["tampered body", "old timestamp", "wrong secret", "wrong id"])
def test_attacks_fail_in_the_package_and_in_ours(attack: str) -> None:
    secret, other = generate_secret(), generate_secret()
    now = int(time.time())
    stamp = now - 3600 if attack == "old timestamp" else now
    headers = headers_for([secret], "evt_1", stamp, BODY)
    body = BODY.replace(b"10", b"99") if attack == "tampered body" else BODY
    if attack == "wrong id":
        headers["webhook-id"] = "evt_2"
    key = other if attack == "wrong secret" else secret
    with pytest.raises(WebhookVerificationError):
        Webhook(key).verify(body, headers)
    with pytest.raises(SignatureInvalid):
        verify(key, headers, body, now=now)


def test_rotation_sends_both_signatures_and_either_secret_verifies() -> None:
    new, old = generate_secret(), generate_secret()
    headers = headers_for([new, old], "evt_9", int(time.time()), BODY)
    assert len(headers["webhook-signature"].split()) == 2
    Webhook(new).verify(BODY, headers)
    Webhook(old).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(BODY, headers)
