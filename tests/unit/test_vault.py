import base64

import pytest

from connector.settings import Settings
from connector.vault import DecryptionFailed, MasterKeyError, MasterKeyRing, Vault


def ring(*kids: str) -> MasterKeyRing:
    return MasterKeyRing.parse(",".join(MasterKeyRing.generate_spec(k) for k in kids))


def test_round_trip_and_ciphertext_is_not_the_secret() -> None:
    vault = Vault(ring("k1"))
    token = vault.encrypt("sk_live_abcdef123456", owner="conn_1", field="api_key")
    assert "sk_live" not in token and "abcdef" not in token
    assert vault.decrypt(token, owner="conn_1", field="api_key") == "sk_live_abcdef123456"
    assert Vault.key_id_of(token) == "k1"


@pytest.mark.parametrize(("owner", "field"), [("conn_2", "api_key"), ("conn_1", "wallet_key")])
def test_token_moved_to_another_row_or_field_fails(owner: str, field: str) -> None:
    vault = Vault(ring("k1"))
    token = vault.encrypt("secret-value-123", owner="conn_1", field="api_key")
    with pytest.raises(DecryptionFailed) as info:
        vault.decrypt(token, owner=owner, field=field)
    assert owner in info.value.detail and field in info.value.detail


def test_tampered_ciphertext_fails() -> None:
    vault = Vault(ring("k1"))
    token = vault.encrypt("secret-value-123", owner="o", field="f")
    head, body = token.rsplit(".", 1)
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[0] ^= 1
    forged = head + "." + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    with pytest.raises(DecryptionFailed):
        vault.decrypt(forged, owner="o", field="f")


def test_wrong_or_missing_master_key_fails_clearly() -> None:
    token = Vault(ring("k1")).encrypt("secret-value-123", owner="o", field="f")
    with pytest.raises(DecryptionFailed, match="not configured"):
        Vault(ring("k2")).decrypt(token, owner="o", field="f")
    other_k1 = Vault(ring("k1"))  # same id, different key material
    with pytest.raises(DecryptionFailed):
        other_k1.decrypt(token, owner="o", field="f")


def test_rotation_new_writes_use_new_key_and_old_tokens_still_decrypt() -> None:
    old = ring("k1")
    spec_old = ",".join(f"{k.kid}:{base64.b64encode(k.key).decode()}" for k in [old.active])
    token = Vault(old).encrypt("secret-value-123", owner="o", field="f")
    both = MasterKeyRing.parse(MasterKeyRing.generate_spec("k2") + "," + spec_old)
    vault = Vault(both)
    assert vault.decrypt(token, owner="o", field="f") == "secret-value-123"
    assert Vault.key_id_of(vault.encrypt("x" * 12, owner="o", field="f")) == "k2"
    rewrapped = vault.rewrap(token, owner="o", field="f")
    assert Vault.key_id_of(rewrapped) == "k2"
    only_new = MasterKeyRing.parse(MasterKeyRing.generate_spec("k3"))
    assert Vault(both).decrypt(rewrapped, owner="o", field="f") == "secret-value-123"
    with pytest.raises(DecryptionFailed):
        Vault(only_new).decrypt(rewrapped, owner="o", field="f")


@pytest.mark.parametrize(
    "spec",
    ["", "nokey", "k1:notbase64!!", "k1:" + base64.b64encode(b"short").decode(), "k1:AA==,k1:AA=="],
)
def test_malformed_master_keys_are_refused(spec: str) -> None:
    with pytest.raises(MasterKeyError):
        MasterKeyRing.parse(spec)


def test_production_without_key_file_refuses_to_start(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(
        mode="production", database_url="sqlite://", master_key_file=tmp_path / "nope"
    )
    with pytest.raises(MasterKeyError):
        Vault.from_settings(settings)


def test_dev_mode_generates_a_private_key_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=tmp_path)
    vault = Vault.from_settings(settings)
    path = tmp_path / "master.keys"
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    token = vault.encrypt("secret-value-123", owner="o", field="f")
    assert Vault.from_settings(settings).decrypt(token, owner="o", field="f") == "secret-value-123"
