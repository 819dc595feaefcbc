from __future__ import annotations

import base64
import os
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.config import ConfigError, Settings
from app.core.crypto import DecryptionError, KeyRing, secret_aad

ORG = "org-1"
CONNECTOR = uuid.UUID("5b0c6f0e-3f0a-4a8e-9d1e-3b9a2f0c1d2e")
AAD = secret_aad(ORG, CONNECTOR, "client_secret")
KEY_1 = bytes(range(32))
KEY_2 = bytes(range(32, 64))
CANARY = "canary-7f3a9e-do-not-leak"


def b64(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing([("k1", KEY_1)])


def test_round_trip(ring: KeyRing) -> None:
    token = ring.encrypt("s3cret", aad=AAD)
    assert ring.decrypt(token, aad=AAD) == "s3cret"


def test_empty_plaintext_round_trips(ring: KeyRing) -> None:
    assert ring.decrypt(ring.encrypt("", aad=AAD), aad=AAD) == ""


def test_token_is_ascii_and_names_version_and_key(ring: KeyRing) -> None:
    token = ring.encrypt("s3cret", aad=AAD)
    assert token.isascii()
    version, key_id, body = token.split(":")
    assert (version, key_id) == ("v1", "k1")
    # 12-byte nonce + 6-byte ciphertext + 16-byte tag, base64url without padding.
    assert len(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) == 12 + 6 + 16
    assert ring.key_id_of(token) == "k1"


def test_each_encryption_uses_a_fresh_nonce(ring: KeyRing) -> None:
    assert ring.encrypt("same", aad=AAD) != ring.encrypt("same", aad=AAD)


def test_canary_plaintext_never_appears_in_the_token(ring: KeyRing) -> None:
    token = ring.encrypt(CANARY, aad=AAD)
    body = token.split(":")[2]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert CANARY not in token
    assert CANARY.encode() not in raw


def _altered(char: str) -> str:
    return "B" if char != "B" else "C"


def test_changing_any_character_of_the_token_fails(ring: KeyRing) -> None:
    # Two encryptions so that both a short and a long final base64 group are covered.
    for plaintext in ("s3cret", "s3cret!"):
        token = ring.encrypt(plaintext, aad=AAD)
        for index, char in enumerate(token):
            tampered = token[:index] + _altered(char) + token[index + 1 :]
            with pytest.raises(DecryptionError):
                ring.decrypt(tampered, aad=AAD)


def test_non_canonical_base64_is_refused(ring: KeyRing) -> None:
    token = ring.encrypt("s3cret", aad=AAD)
    prefix, body = token.rsplit(":", 1)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # Same decoded bytes, other spelling: flip only the unused low bits of the last character.
    last = alphabet.index(body[-1])
    unused_bits = {2: 0b1111, 3: 0b11}.get(len(body) % 4, 0)
    assert unused_bits, "the body should end in a partial group"
    respelled = body[:-1] + alphabet[last ^ 1]
    with pytest.raises(DecryptionError):
        ring.decrypt(f"{prefix}:{respelled}", aad=AAD)
    for bad in (body + "=", body + "==", body[:-1] + "+", body + "A", "*" + body[1:]):
        with pytest.raises(DecryptionError):
            ring.decrypt(f"{prefix}:{bad}", aad=AAD)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "v1",
        "v1:k1",
        "v1:k1:",
        "v1:k1:AAAA",
        "v2:k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "V1:k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "v1::AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "v1:k 1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "s3cret",
    ],
)
def test_malformed_tokens_are_refused(ring: KeyRing, token: str) -> None:
    with pytest.raises(DecryptionError):
        ring.decrypt(token, aad=AAD)


def test_truncated_and_extended_ciphertexts_are_refused(ring: KeyRing) -> None:
    token = ring.encrypt("s3cret", aad=AAD)
    prefix, body = token.rsplit(":", 1)
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    for changed in (raw[:-1], raw[:28], raw[:12], raw + b"\x00"):
        with pytest.raises(DecryptionError):
            ring.decrypt(f"{prefix}:{b64(changed)}", aad=AAD)


@pytest.mark.parametrize(
    "aad",
    [
        secret_aad("org-2", CONNECTOR, "client_secret"),
        secret_aad(ORG, uuid.uuid4(), "client_secret"),
        secret_aad(ORG, CONNECTOR, "password"),
        b"",
    ],
    ids=["other-organization", "other-connector", "other-field", "no-aad"],
)
def test_a_secret_does_not_decrypt_in_another_place(ring: KeyRing, aad: bytes) -> None:
    token = ring.encrypt("s3cret", aad=AAD)
    with pytest.raises(DecryptionError):
        ring.decrypt(token, aad=aad)


def test_connector_id_spellings_give_the_same_associated_data() -> None:
    assert secret_aad(ORG, CONNECTOR, "password") == secret_aad(ORG, str(CONNECTOR), "password")
    assert secret_aad(ORG, CONNECTOR, "password") == secret_aad(ORG, str(CONNECTOR).upper(), "password")


def test_associated_data_is_unambiguous() -> None:
    assert secret_aad("a", "bc", "d") != secret_aad("ab", "c", "d")
    assert secret_aad("a", "b", "cd") != secret_aad("a", "bc", "d")
    assert secret_aad("a:b", "c", "d") != secret_aad("a", "b:c", "d")


def test_editing_the_key_id_fails_even_under_the_same_key() -> None:
    # The same key under two ids: only the authenticated key id tells them apart.
    ring = KeyRing([("a", KEY_1), ("b", KEY_1)])
    token = ring.encrypt("s3cret", aad=AAD)
    assert token.startswith("v1:a:")
    with pytest.raises(DecryptionError):
        ring.decrypt("v1:b:" + token.removeprefix("v1:a:"), aad=AAD)


def test_rotation_old_key_decrypts_new_key_encrypts() -> None:
    old_ring = KeyRing([("k1", KEY_1)])
    old_token = old_ring.encrypt("s3cret", aad=AAD)

    rotated = KeyRing([("k2", KEY_2), ("k1", KEY_1)])
    assert rotated.primary_key_id == "k2"
    assert rotated.key_ids == ("k2", "k1")
    assert rotated.decrypt(old_token, aad=AAD) == "s3cret"
    assert rotated.key_id_of(old_token) == "k1"

    new_token = rotated.encrypt("s3cret", aad=AAD)
    assert rotated.key_id_of(new_token) == "k2"
    assert rotated.decrypt(new_token, aad=AAD) == "s3cret"
    with pytest.raises(DecryptionError):
        old_ring.decrypt(new_token, aad=AAD)


def test_unknown_key_id_is_named_but_no_key_material_or_plaintext_leaks() -> None:
    token = KeyRing([("k1", KEY_1)]).encrypt(CANARY, aad=AAD)
    only_new = KeyRing([("k2", KEY_2)])
    assert only_new.key_id_of(token) == "k1"
    with pytest.raises(DecryptionError) as caught:
        only_new.decrypt(token, aad=AAD)
    message = str(caught.value)
    assert "'k1'" in message
    for leak in (CANARY, b64(KEY_1), b64(KEY_2), KEY_1.hex(), KEY_2.hex()):
        assert leak not in message


def test_wrong_place_error_does_not_leak(ring: KeyRing) -> None:
    token = ring.encrypt(CANARY, aad=AAD)
    with pytest.raises(DecryptionError) as caught:
        ring.decrypt(token, aad=secret_aad(ORG, CONNECTOR, "password"))
    assert CANARY not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_key_id_of_refuses_unknown_formats(ring: KeyRing) -> None:
    for token in ("plain", "v9:k1:AAAA", "v1:k1", "v1::AAAA"):
        with pytest.raises(DecryptionError):
            ring.key_id_of(token)


def test_repr_shows_ids_not_keys() -> None:
    ring = KeyRing([("k2", KEY_2), ("k1", KEY_1)])
    assert repr(ring) == "KeyRing(key_ids=('k2', 'k1'))"


def test_plaintext_that_is_not_unicode_text_is_refused_without_echo(ring: KeyRing) -> None:
    with pytest.raises(ValueError, match="not valid Unicode") as caught:
        ring.encrypt(CANARY + "\ud800", aad=AAD)
    assert CANARY not in str(caught.value)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([], "at least one key"),
        ([("k1", b"short")], "32 bytes"),
        ([("k1", KEY_1), ("k1", KEY_2)], "appears twice"),
        ([("", KEY_1)], "key ids"),
        ([("a:b", KEY_1)], "key ids"),
        ([("a b", KEY_1)], "key ids"),
        ([("k" * 33, KEY_1)], "key ids"),
        ([("schlüssel", KEY_1)], "key ids"),
    ],
)
def test_key_ring_checks_its_keys(keys: list[tuple[str, bytes]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeyRing(keys)


def test_from_settings_uses_the_configured_ring() -> None:
    settings = Settings(encryption_keys=f"k2:{b64(KEY_2)},k1:{b64(KEY_1)}")
    ring = KeyRing.from_settings(settings)
    assert ring.primary_key_id == "k2"
    assert ring.decrypt(KeyRing([("k1", KEY_1)]).encrypt("x", aad=AAD), aad=AAD) == "x"


def test_from_settings_without_keys_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        KeyRing.from_settings(Settings(encryption_keys=None))


def test_from_settings_refuses_a_key_id_the_token_format_cannot_carry() -> None:
    settings = Settings(encryption_keys=f"key one:{b64(KEY_1)}")
    with pytest.raises(ConfigError, match="CONNECTORS_ENCRYPTION_KEYS"):
        KeyRing.from_settings(settings)


@settings(max_examples=200, deadline=None)
@given(plaintext=st.text(), organization=st.text(min_size=1), field=st.text(min_size=1))
def test_round_trip_of_any_text(plaintext: str, organization: str, field: str) -> None:
    ring = KeyRing([("k2", KEY_2), ("k1", KEY_1)])
    aad = secret_aad(organization, CONNECTOR, field)
    token = ring.encrypt(plaintext, aad=aad)
    assert token.isascii()
    assert ring.decrypt(token, aad=aad) == plaintext


def test_random_keys_round_trip() -> None:
    ring = KeyRing([("r", os.urandom(32))])
    assert ring.decrypt(ring.encrypt("é∑🙂", aad=AAD), aad=AAD) == "é∑🙂"
