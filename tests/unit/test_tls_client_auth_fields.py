"""``tls_client_auth`` connectors: the rules of the certificate and key fields, what is stored and
shown, and the client authentication they build. Plain tests, no app and no database."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from pydantic import BaseModel, SecretStr, TypeAdapter, ValidationError

from app.connectors import schemas
from app.connectors.kinds import kind_for
from app.connectors.kinds.client_auth.tls_client_auth import (
    CERTIFICATE_PATTERN,
    METHOD,
    PRIVATE_KEY_PATTERN,
    TlsClientAuth,
)
from app.core.outbound import ClientCertificate
from app.core.outbound.certificates import build_client_ssl_context
from app.core.validation import field_errors
from tests.conftest import CANARY, canary
from tests.support.tls import LocalCA

_AUTH: TypeAdapter[Any] = TypeAdapter(schemas.AuthIn)
Pair = tuple[str, str]


def _auth(certificate: str, key: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "oauth2",
        "grant_type": "client_credentials",
        "client_id": "svc-mtls",
        "token_url": "https://idp.example.com/oauth/token",
        "client_auth_method": "tls_client_auth",
        "tls_certificate": certificate,
        "tls_private_key": key,
        **fields,
    }


def _pem(key: Any, private_format: PrivateFormat, encryption: Any = None) -> str:
    data: bytes = key.private_bytes(Encoding.PEM, private_format, encryption or NoEncryption())
    return data.decode()


def _lines(pem: str) -> list[str]:
    """The base64 lines of a PEM text (no boundaries, headers or empty lines)."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----") and ":" not in line]


def _body_lines(key: str) -> list[str]:
    """The lines of a key's PEM body, in the form sent and as PKCS #8, which is how it is stored."""
    loaded = load_pem_private_key(key.encode(), password=None)
    return _lines(key) + _lines(_pem(loaded, PrivateFormat.PKCS8))


def _refusal(raw: dict[str, Any], *, key: str | None = None, now: datetime | None = None) -> tuple[str, str]:
    """The one ``errors`` entry of the 422 problem for ``raw``; it quotes no line of ``key``."""
    with pytest.raises(ValidationError) as caught:
        _AUTH.validate_python(raw, context={"now": now} if now else None)
    [error] = field_errors(caught.value, prefix=("auth",), rules=schemas.LOCATIONS)
    text = repr(error)
    assert CANARY not in text
    for line in _body_lines(key) if key else ():
        assert line not in text
    return error["field"], error["reason"]


@pytest.fixture(scope="module")
def pair(local_ca: LocalCA) -> Pair:
    return local_ca.issue_client_certificate("svc-mtls")


@pytest.fixture(scope="module")
def other(local_ca: LocalCA) -> Pair:
    return local_ca.issue_client_certificate("someone-else")


# Accepted ----------------------------------------------------------------------------------------


def test_a_certificate_and_its_key_are_stored_canonical_with_their_facts(pair: Pair) -> None:
    certificate, key = pair
    # Text around PEM blocks (RFC 7468), as a PKCS #12 export writes it, is dropped.
    sent_key = f"Bag Attributes\n    friendlyName: {canary('bag')}\n{key}"
    auth: BaseModel = _AUTH.validate_python(
        _auth("Bag Attributes\n" + certificate.replace("\n", "\r\n"), sent_key)
    )
    public, secrets = kind_for(auth).split(auth)
    leaf = x509.load_pem_x509_certificate(certificate.encode())
    assert public["tls_certificate"] == leaf.public_bytes(Encoding.PEM).decode()
    assert public["tls_certificate_subject"] == leaf.subject.rfc4514_string()
    assert public["tls_certificate_subject"].startswith("CN=svc-mtls,")
    assert public["tls_certificate_expires_at"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert set(secrets) == {"tls_private_key"} and "tls_private_key" not in public
    stored = secrets["tls_private_key"].get_secret_value()
    assert stored.startswith("-----BEGIN PRIVATE KEY-----\n") and CANARY not in stored
    assert stored == _pem(load_pem_private_key(key.encode(), password=None), PrivateFormat.PKCS8)
    read = kind_for(auth).read_model(public, secrets)
    assert read["has_tls_private_key"] is True and "tls_private_key" not in read
    # The document's patterns take what was sent and what is stored.
    for value in (certificate, public["tls_certificate"]):
        assert re.search(CERTIFICATE_PATTERN, value)
    for value in (key, stored):
        assert re.search(PRIVATE_KEY_PATTERN, value)


def test_a_chain_with_an_intermediate_is_taken_leaf_first_only(local_ca: LocalCA) -> None:
    chain, key = local_ca.issue_client_certificate_via_intermediate("svc-mtls")
    leaf, intermediate = x509.load_pem_x509_certificates(chain.encode())
    auth: BaseModel = _AUTH.validate_python(_auth(chain, key))
    assert len(x509.load_pem_x509_certificates(getattr(auth, "tls_certificate").encode())) == 2  # noqa: B009
    reversed_chain = "".join(c.public_bytes(Encoding.PEM).decode() for c in (intermediate, leaf))
    field, reason = _refusal(_auth(reversed_chain, key), key=key)
    assert field == "auth.tls_certificate"
    assert "chain must be in order" in reason


def test_validity_is_judged_at_the_validation_contexts_now(local_ca: LocalCA) -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    end = start + timedelta(days=90)
    certificate, key = local_ca.issue_client_certificate_between("svc-mtls", start, end)
    _AUTH.validate_python(_auth(certificate, key), context={"now": start})
    _AUTH.validate_python(_auth(certificate, key), context={"now": end - timedelta(seconds=1)})
    field, reason = _refusal(_auth(certificate, key), key=key, now=end)
    assert (field, reason) == (
        "auth.tls_certificate",
        "the certificate has expired (valid until 2030-04-01T00:00:00Z)",
    )
    field, reason = _refusal(_auth(certificate, key), key=key, now=start - timedelta(seconds=1))
    assert field == "auth.tls_certificate"
    assert reason == "the certificate is not valid yet (valid from 2030-01-01T00:00:00Z)"


@pytest.mark.parametrize("shape", ["ec", "rsa", "intermediate"])
def test_what_is_taken_is_what_the_outbound_client_loads(local_ca: LocalCA, shape: str) -> None:
    if shape == "intermediate":
        certificate, key = local_ca.issue_client_certificate_via_intermediate("svc-mtls")
    elif shape == "rsa":
        leaf = trustme.CA(key_type=trustme.KeyType.RSA).issue_cert(
            "svc-mtls.clients.example.test", common_name="svc-mtls", key_type=trustme.KeyType.RSA
        )
        certificate, key = leaf.cert_chain_pems[0].bytes().decode(), leaf.private_key_pem.bytes().decode()
    else:
        certificate, key = local_ca.issue_client_certificate("svc-mtls")
    auth: BaseModel = _AUTH.validate_python(_auth(certificate, key))
    public, secrets = kind_for(auth).split(auth)
    built = METHOD.build(public, secrets)
    # OpenSSL takes the stored pair (canonical PEM, the key as PKCS #8) as the certificate and key.
    build_client_ssl_context(None, built.certificate)


# Refused -----------------------------------------------------------------------------------------


def test_an_expired_certificate_is_refused(local_ca: LocalCA) -> None:
    certificate, key = local_ca.issue_client_certificate("svc-mtls", expired=True)
    field, reason = _refusal(_auth(certificate, key), key=key)
    assert field == "auth.tls_certificate"
    assert reason.startswith("the certificate has expired (valid until ")


def test_a_certificate_not_yet_valid_is_refused(local_ca: LocalCA) -> None:
    now = datetime.now(UTC)
    certificate, key = local_ca.issue_client_certificate_between(
        "svc-mtls", now + timedelta(days=1), now + timedelta(days=30)
    )
    field, reason = _refusal(_auth(certificate, key), key=key)
    assert field == "auth.tls_certificate"
    assert reason.startswith("the certificate is not valid yet (valid from ")


def test_a_key_of_another_certificate_is_refused(pair: Pair, other: Pair) -> None:
    certificate, _ = pair
    _, key = other
    field, reason = _refusal(_auth(certificate, key), key=key)
    assert (field, reason) == (
        "auth.tls_private_key",
        "does not belong to tls_certificate: their public keys differ",
    )


@pytest.mark.parametrize(
    ("private_format", "label"),
    [
        (PrivateFormat.PKCS8, "ENCRYPTED PRIVATE KEY"),
        (PrivateFormat.TraditionalOpenSSL, "Proc-Type: 4,ENCRYPTED"),
    ],
)
def test_an_encrypted_key_is_refused(pair: Pair, private_format: PrivateFormat, label: str) -> None:
    certificate, key = pair
    loaded = load_pem_private_key(key.encode(), password=None)
    encrypted = _pem(loaded, private_format, BestAvailableEncryption(canary("pass").encode()))
    assert label in encrypted
    field, reason = _refusal(_auth(certificate, encrypted), key=key)
    assert (field, reason) == (
        "auth.tls_private_key",
        "is encrypted: send the key unencrypted (it is stored encrypted)",
    )
    for line in _lines(encrypted):
        assert line not in reason


def _damaged(pem: str) -> str:
    """``pem`` with its body cut short: still PEM in shape, no longer a valid structure."""
    lines = pem.splitlines()
    return "\n".join([lines[0], lines[1][:20], lines[-1]]) + "\n"


@pytest.mark.parametrize(
    ("which", "value", "reason"),
    [
        (
            "certificate",
            f"{CANARY}-not-pem",
            "must be PEM: a -----BEGIN CERTIFICATE----- block, the client's certificate first",
        ),
        ("certificate", "damaged", "the certificate is not a valid X.509 certificate"),
        (
            "certificate",
            "the key",
            "may hold only PEM CERTIFICATE blocks; the private key goes in tls_private_key, unencrypted",
        ),
        ("key", f"{CANARY}-not-pem", "must be one PEM private key: a -----BEGIN PRIVATE KEY----- block"),
        ("key", "damaged", "is not a valid PEM private key"),
        ("key", "the certificate", "must be one PEM private key: a -----BEGIN PRIVATE KEY----- block"),
        ("key", "two keys", "must be one PEM private key: a -----BEGIN PRIVATE KEY----- block"),
    ],
)
def test_what_is_not_pem_of_the_right_kind_is_refused(
    pair: Pair, which: str, value: str, reason: str
) -> None:
    certificate, key = pair
    values = {
        "damaged": _damaged(certificate if which == "certificate" else key),
        "the key": key,
        "the certificate": certificate,
        "two keys": key + key,
    }
    sent = values.get(value, value)
    raw = _auth(sent, key) if which == "certificate" else _auth(certificate, sent)
    assert _refusal(raw, key=key) == (
        f"auth.tls_{'certificate' if which == 'certificate' else 'private_key'}",
        reason,
    )


@pytest.mark.parametrize(
    "make",
    [
        # Too weak on purpose: it must be refused.
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505
        lambda: ec.generate_private_key(ec.SECP256K1()),
        lambda: ed25519.Ed25519PrivateKey.generate(),
    ],
    ids=["rsa-1024", "ec-secp256k1", "ed25519"],
)
def test_keys_tls_libraries_would_refuse_are_refused(pair: Pair, make: Any) -> None:
    certificate, _ = pair
    key = _pem(make(), PrivateFormat.PKCS8)
    field, reason = _refusal(_auth(certificate, key), key=key)
    assert field == "auth.tls_private_key"
    assert reason == "must be an RSA key of 2048 to 4096 bits or an EC key on P-256, P-384 or P-521"


def test_a_client_secret_is_not_taken_with_a_certificate(pair: Pair) -> None:
    certificate, key = pair
    field, reason = _refusal(_auth(certificate, key, client_secret=canary("secret")), key=key)
    assert (field, reason) == ("auth.*", "unknown field")


# The client authentication -----------------------------------------------------------------------


def test_the_token_request_names_the_client_and_the_connection_presents_the_certificate(pair: Pair) -> None:
    certificate, key = pair
    auth: BaseModel = _AUTH.validate_python(_auth(certificate, key))
    public, secrets = kind_for(auth).split(auth)
    built = METHOD.build(public, secrets)
    assert isinstance(built, TlsClientAuth) and built.method == "tls_client_auth"
    assert built.certificate == ClientCertificate(public["tls_certificate"], secrets["tls_private_key"])
    form: dict[str, str] = {"grant_type": "client_credentials"}
    headers: dict[str, str] = {"Accept": "application/json"}
    built.apply(
        client_id="svc-mtls", token_url="https://idp.example.com/oauth/token", form=form, headers=headers
    )
    assert form == {"grant_type": "client_credentials", "client_id": "svc-mtls"}
    assert headers == {"Accept": "application/json"}
    assert not any(line in repr(built) for line in _body_lines(key))
    assert isinstance(built.certificate.private_key_pem, SecretStr)
