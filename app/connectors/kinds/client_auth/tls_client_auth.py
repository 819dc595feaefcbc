"""``tls_client_auth``: the client proves who it is with a certificate in the TLS handshake
(RFC 8705 §2.1, mutual TLS with a PKI certificate).

The token request carries ``client_id`` in its form and no secret (RFC 8705 §2); the connection
to the token endpoint presents ``tls_certificate`` (the client's certificate first, then any
intermediates) with ``tls_private_key``. The certificate is public: it is stored in clear and
shown in reads. The key is a secret like any other, and no message about it quotes it.

Everything a TLS library would refuse later is refused on save instead, with a reason naming the
field (the check of an RSA key's numbers, the one slow part, in a worker process once the save
has passed everything cheaper: ``app.core.keychecks``): text that is not PEM, a certificate out
of its validity period, one signed with MD5 or SHA-1 or carrying a weak key, a chain out of
order, a certificate whose extended key usage does not allow client authentication, an encrypted
key, a key of another type than RSA (2048 to 4096 bits) or EC (P-256, P-384, P-521), and a key
that does not belong to the certificate. Both are stored as canonical PEM (the certificates
re-encoded, the key as unencrypted PKCS #8): text around the PEM blocks, which RFC 7468 allows
(``Bag Attributes`` from a PKCS #12 export), is dropped, so nothing but the certificates is ever
shown.

Validity is judged against the ``now`` of the validation context when one is given (a
``datetime``), else against the system clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from typing import Annotated, Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    SecretStr,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from app.connectors.fields import Strict, utf8
from app.connectors.kinds.client_auth.base import ClientAuthMethod
from app.connectors.kinds.example import BodyExample
from app.core.outbound import ClientCertificate

__all__ = [
    "METHOD",
    "CertificatePEM",
    "PrivateKeyPEM",
    "TlsClientAuth",
    "TlsClientAuthFields",
    "TlsClientAuthOut",
]

MAX_CERTIFICATE_CHARS: Final = 32 * 1024
MAX_PRIVATE_KEY_CHARS: Final = 16 * 1024
MAX_CHAIN_LENGTH: Final = 10
MIN_RSA_BITS: Final = 2048
# Larger keys make the check of the key on save, and every handshake, cost seconds of CPU.
MAX_RSA_BITS: Final = 4096

# What the document says of the two fields; the validators below decide.
CERTIFICATE_PATTERN: Final = "^[^\\x00]*-----BEGIN CERTIFICATE-----[^\\x00]*$"
PRIVATE_KEY_PATTERN: Final = "^[^\\x00]*-----BEGIN (RSA |EC )?PRIVATE KEY-----[^\\x00]*$"

# A PEM block (RFC 7468). Base64 has no '-', so the body stops at the first one: matching stays
# linear in the length of the text, whatever it holds. (Blocks with RFC 1421 headers, which may
# hold '-', are not matched: only encrypted keys have them, and those are refused anyway.)
_PEM_BLOCK: Final = re.compile(r"-----BEGIN ([A-Z0-9 ]{1,64})-----([^-]*)-----END \1-----")
_KEY_LABELS: Final = frozenset({"PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"})
_ENCRYPTED_HEADER: Final = re.compile(r"^Proc-Type: *4, *ENCRYPTED", re.MULTILINE)
_EC_CURVES: Final = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_KEY_TYPES: Final = (
    f"an RSA key of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits or an EC key on P-256, P-384 or P-521"
)
_ENCRYPTED: Final = "is encrypted: send the key unencrypted (it is stored encrypted)"


# Field types -----------------------------------------------------------------------------------


def _no_nul(value: str) -> str:
    if "\x00" in value or not utf8(value):
        raise ValueError("may not contain NUL or unpaired surrogates")
    return value


def _private_key_text(value: SecretStr) -> SecretStr:
    raw = value.get_secret_value()
    if not 1 <= len(raw) <= MAX_PRIVATE_KEY_CHARS:
        raise ValueError(f"must be 1-{MAX_PRIVATE_KEY_CHARS} characters")
    _no_nul(raw)
    return value


CertificatePEM = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_CERTIFICATE_CHARS),
    AfterValidator(_no_nul),
    Field(
        description=(
            "The client's certificate in PEM, then any intermediate certificates, each issued by the next; "
            "valid now, signed with neither MD5 nor SHA-1, and allowed for client authentication. Stored "
            "and shown re-encoded, without any text around the PEM blocks"
        ),
        json_schema_extra={"pattern": CERTIFICATE_PATTERN},
    ),
]
PrivateKeyPEM = Annotated[
    SecretStr,
    AfterValidator(_private_key_text),
    Field(
        description=(
            f"Write-only: the certificate's private key in PEM, unencrypted: {_KEY_TYPES}. Stored "
            "encrypted; reads say `has_tls_private_key: true` instead"
        ),
        json_schema_extra={
            "writeOnly": True,
            "minLength": 1,
            "maxLength": MAX_PRIVATE_KEY_CHARS,
            "pattern": PRIVATE_KEY_PATTERN,
        },
    ),
]


# Parsing ---------------------------------------------------------------------------------------


def _blocks(text: str) -> list[tuple[str, str]]:
    """The PEM blocks of ``text``: label and whole block, whatever text lies around them."""
    return [(match.group(1), match.group(0)) for match in _PEM_BLOCK.finditer(text)]


def _parse_chain(text: str) -> list[x509.Certificate]:
    """The certificates of a PEM chain, in order; ``ValueError`` with a reason quoting nothing."""
    blocks = _blocks(text)
    if not blocks:
        raise ValueError("must be PEM: a -----BEGIN CERTIFICATE----- block, the client's certificate first")
    if any(label != "CERTIFICATE" for label, _ in blocks):
        raise ValueError(
            "may hold only PEM CERTIFICATE blocks; the private key goes in tls_private_key, unencrypted"
        )
    if len(blocks) > MAX_CHAIN_LENGTH:
        raise ValueError(f"may hold at most {MAX_CHAIN_LENGTH} certificates")
    chain: list[x509.Certificate] = []
    for number, (_, block) in enumerate(blocks, start=1):
        certificate = _load_certificate(block)
        if certificate is None:
            raise ValueError(f"{_which(number)} is not a valid X.509 certificate")
        chain.append(certificate)
    return chain


def _load_certificate(block: str) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(block.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm):
        return None


def _parse_private_key(text: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """The one unencrypted private key of a PEM text; ``ValueError`` with a reason quoting nothing."""
    # ``openssl ecparam -genkey`` writes the curve's parameters ahead of the key.
    blocks = [(label, block) for label, block in _blocks(text) if label != "EC PARAMETERS"]
    # RFC 1421 headers say a traditional key is encrypted; PKCS #8 says so in its label.
    if _ENCRYPTED_HEADER.search(text) or any(label == "ENCRYPTED PRIVATE KEY" for label, _ in blocks):
        raise ValueError(_ENCRYPTED)
    if len(blocks) != 1 or blocks[0][0] not in _KEY_LABELS:
        raise ValueError("must be one PEM private key: a -----BEGIN PRIVATE KEY----- block")
    data = blocks[0][1].encode("ascii")
    problem: str | None = None
    key: object = None
    try:
        # The numbers of an RSA key are checked later, off the event loop (``private_key_fields``).
        key = load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)
    except TypeError:
        problem = _ENCRYPTED
    except (ValueError, UnsupportedAlgorithm):
        problem = "is not a valid PEM private key"
    # Raised outside the handlers, so no parser error rides along as the context.
    if problem is not None:
        raise ValueError(problem)
    if isinstance(key, rsa.RSAPrivateKey) and MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, _EC_CURVES):
        return key
    raise ValueError(f"must be {_KEY_TYPES}")


def _which(number: int) -> str:
    return "the certificate" if number == 1 else f"certificate {number} of the chain"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now(info: ValidationInfo) -> datetime:
    context = info.context
    now = context.get("now") if isinstance(context, Mapping) else None
    return now if isinstance(now, datetime) else datetime.now(UTC)


def _strong_key(certificate: x509.Certificate) -> bool:
    """Whether TLS libraries at their default security level accept the certificate's key."""
    try:
        key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return False
    if isinstance(key, rsa.RSAPublicKey):
        return key.key_size >= 2048
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.curve.key_size >= 256
    return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)


def _weak_signature(certificate: x509.Certificate) -> bool:
    # A self-signed certificate's own signature is not judged: it is trusted as it is, or not.
    if certificate.issuer == certificate.subject:
        return False
    try:
        algorithm = certificate.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return False
    return isinstance(algorithm, hashes.MD5 | hashes.SHA1)


def _for_client_auth(certificate: x509.Certificate) -> bool:
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usage


def _check_chain(chain: list[x509.Certificate], now: datetime) -> None:
    """What a TLS library would refuse about the chain, as ``ValueError`` quoting nothing."""
    for number, certificate in enumerate(chain, start=1):
        if certificate.not_valid_before_utc > now:
            raise ValueError(
                f"{_which(number)} is not valid yet (valid from {_iso(certificate.not_valid_before_utc)})"
            )
        if certificate.not_valid_after_utc <= now:
            raise ValueError(
                f"{_which(number)} has expired (valid until {_iso(certificate.not_valid_after_utc)})"
            )
        if _weak_signature(certificate):
            raise ValueError(f"{_which(number)} is signed with MD5 or SHA-1, which TLS libraries refuse")
        if not _strong_key(certificate):
            raise ValueError(f"{_which(number)} has a key that TLS libraries refuse as too weak")
    if not _for_client_auth(chain[0]):
        raise ValueError("the certificate's extended key usage does not allow client authentication")
    for number, (certificate, issuer) in enumerate(pairwise(chain), start=1):
        try:
            certificate.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            # Said without the names: they are the caller's input, shown nowhere but in reads.
            raise ValueError(
                f"{_which(number)} is not issued by the certificate after it: the chain must be in order, "
                "the client's certificate first"
            ) from None


def _public_key_der(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | x509.Certificate) -> bytes:
    public = key.public_key() if isinstance(key, x509.Certificate) else key
    return public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


# The method -----------------------------------------------------------------------------------


class TlsClientAuthFields(Strict):
    tls_certificate: CertificatePEM
    tls_private_key: PrivateKeyPEM

    @field_validator("tls_certificate")
    @classmethod
    def _check_certificate(cls, value: str, info: ValidationInfo) -> str:
        chain = _parse_chain(value)
        _check_chain(chain, _now(info))
        return "".join(certificate.public_bytes(Encoding.PEM).decode("ascii") for certificate in chain)

    @field_validator("tls_private_key")
    @classmethod
    def _check_private_key(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        key = _parse_private_key(value.get_secret_value())
        # Absent when the certificate was refused: that error is the one to fix first.
        certificate = info.data.get("tls_certificate")
        if isinstance(certificate, str):
            leaf = x509.load_pem_x509_certificates(certificate.encode("ascii"))[0]
            if _public_key_der(key.public_key()) != _public_key_der(leaf):
                raise ValueError("does not belong to tls_certificate: their public keys differ")
        canonical = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        return SecretStr(canonical.decode("ascii"))


class TlsClientAuthOut(BaseModel):
    tls_certificate: str
    has_tls_private_key: bool
    tls_certificate_subject: str = Field(description="The certificate's subject (RFC 4514)")
    tls_certificate_expires_at: datetime = Field(description="The end of the certificate's validity")


@dataclass(frozen=True, slots=True)
class TlsClientAuth:
    certificate: ClientCertificate = field(repr=False)
    method = "tls_client_auth"

    def apply(
        self,
        *,
        client_id: str,
        token_url: str,
        form: MutableMapping[str, str],
        headers: MutableMapping[str, str],
    ) -> None:
        # The certificate authenticates; the form says which client it is (RFC 8705 §2).
        form["client_id"] = client_id


# Key material made for the example only (the certificate is valid until 2126).
_EXAMPLE_KEY = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgZBScmlzp7TzTK4GX\n"
    "JSA8vzpWk2gxBznSMrBuCOZY9a6hRANCAAS/mK12rU+1DuC2bR92mwiXl2MsloXw\n"
    "NE8NFuCTP2fojnU6Yb3sF6mCqyIwRTISzbdu4kZTJg2XvW6branEGH2I\n"
    "-----END PRIVATE KEY-----\n"
)
_EXAMPLE_CERTIFICATE = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBZzCCAQygAwIBAgIUCoGl0xGnOsYzoFd4Gf0KiOzUpdkwCgYIKoZIzj0EAwIw\n"
    "MjEeMBwGA1UEAwwVY29udGFjdC1jZW50ZXItY2xpZW50MRAwDgYDVQQKDAdFeGFt\n"
    "cGxlMCAXDTI2MDEwMTAwMDAwMFoYDzIxMjYwMTAxMDAwMDAwWjAyMR4wHAYDVQQD\n"
    "DBVjb250YWN0LWNlbnRlci1jbGllbnQxEDAOBgNVBAoMB0V4YW1wbGUwWTATBgcq\n"
    "hkjOPQIBBggqhkjOPQMBBwNCAAS/mK12rU+1DuC2bR92mwiXl2MsloXwNE8NFuCT\n"
    "P2fojnU6Yb3sF6mCqyIwRTISzbdu4kZTJg2XvW6branEGH2IMAoGCCqGSM49BAMC\n"
    "A0kAMEYCIQC63Fx6Gd+5m36Pb27XpRhS2QS0wYYcHEUsnvuuG55G+wIhAP5g0Gc0\n"
    "3Z3hcu1xIoCWw/DZsDwPWhH32ZGj5uMd4h16\n"
    "-----END CERTIFICATE-----\n"
)


class _Method(ClientAuthMethod):
    name = "tls_client_auth"
    fields = TlsClientAuthFields
    out_fields = TlsClientAuthOut
    schema_suffix = "TlsClientAuth"
    example = BodyExample(
        "oauth2TlsClientAuth",
        "OAuth 2.0, the client presenting a certificate (tls_client_auth, mutual TLS)",
        {
            "name": "Payments",
            "resource_domain_url": "https://payments.example.com",
            "auth": {
                "type": "oauth2",
                "grant_type": "client_credentials",
                "client_id": "abc",
                "token_url": "https://mtls.idp.example.com/oauth/token",
                "client_auth_method": "tls_client_auth",
                "tls_certificate": _EXAMPLE_CERTIFICATE,
                "tls_private_key": _EXAMPLE_KEY,
            },
        },
    )
    private_key_fields = ("tls_private_key",)

    def build(self, public: Mapping[str, Any], secrets: Mapping[str, SecretStr]) -> TlsClientAuth:
        return TlsClientAuth(
            ClientCertificate(
                certificate_pem=public["tls_certificate"], private_key_pem=secrets["tls_private_key"]
            )
        )

    def facts(self, auth: BaseModel) -> dict[str, Any]:
        chain: str = getattr(auth, "tls_certificate")  # noqa: B009
        leaf = x509.load_pem_x509_certificates(chain.encode("ascii"))[0]
        return {
            "tls_certificate_subject": leaf.subject.rfc4514_string(),
            "tls_certificate_expires_at": _iso(leaf.not_valid_after_utc),
        }


METHOD = _Method()
