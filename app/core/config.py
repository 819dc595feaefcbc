"""Settings: the only place that reads the environment.

Every setting is an environment variable prefixed ``CONNECTORS_``. ``load_settings`` turns a bad
value into one ``ConfigError`` line naming the variable, never echoing its value;
``unknown_variables`` names the prefixed variables nothing reads (a misspelling is otherwise
silently ignored). The one exception: the standard ``OTEL_*`` variables of tracing, which the
OpenTelemetry SDK reads itself (``app.core.tracing``).
"""

from __future__ import annotations

import base64
import difflib
import ipaddress
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from app.core.urls import is_loopback_host, web_origin
from app.core.validation import error_message

DEFAULT_DATA_DIR = Path("data")
DEV_KEY_FILE = "dev-keys.json"
PREFIX = "CONNECTORS_"
# Prefixed variables the project reads outside Settings: the test suite's PostgreSQL and Redis.
OTHER_VARIABLES = ("CONNECTORS_TEST_POSTGRES_URL", "CONNECTORS_TEST_REDIS_URL")


def _is_dns_server(server: str) -> bool:
    """``ip``, ``ipv4:port``, ``[ipv6]`` or ``[ipv6]:port``, as c-ares takes a server."""
    host, port = server, "53"
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                return False
            port = rest[1:]
    elif server.count(":") == 1:
        host, port = server.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return port.isascii() and port.isdigit() and 0 < int(port) < 65536


class ConfigError(Exception):
    """A setting is missing or malformed; the message is one line, safe to print."""


def _parse_key_ring(raw: str) -> list[tuple[str, bytes]]:
    """Parse ``id:base64key[,id:base64key...]``; the first key is the newest and encrypts."""
    ring: list[tuple[str, bytes]] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        key_id, sep, encoded = part.partition(":")
        if not sep or not key_id or len(key_id) > 32 or not key_id.isascii():
            raise ValueError("each key must be written as id:base64key")
        try:
            key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except (ValueError, TypeError):
            raise ValueError(f"key {key_id!r} is not valid base64") from None
        if len(key) != 32:
            raise ValueError(f"key {key_id!r} must decode to 32 bytes (AES-256)")
        if any(existing == key_id for existing, _ in ring):
            raise ValueError(f"key id {key_id!r} appears twice")
        ring.append((key_id, key))
    if not ring:
        raise ValueError("at least one key is required")
    return ring


def _sqlite_directory(url: str) -> Path | None:
    """The absolute directory of a SQLite URL's file (relative to the working directory, as SQLite
    reads it); None for an in-memory or ``file:`` URI database."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError("is not a valid database URL") from None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:") or "uri" in parsed.query:
        return None
    return Path(os.path.abspath(database)).parent


class Settings(BaseSettings):
    """The service's configuration; build it explicitly in tests."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str = ""
    database_pool_size: int = Field(default=10, ge=1, le=200)
    # A PostgreSQL statement taking longer is abandoned and answered as database_unavailable.
    database_statement_timeout_seconds: float = Field(default=15.0, gt=0, le=600)
    redis_url: SecretStr | None = None

    # Connections `serve` accepts (app.core.serving): a request's headers must arrive within
    # this long; at most this many connections are open at a time; an idle kept-alive connection
    # is closed after this long.
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    keep_alive_seconds: int = Field(default=5, ge=1, le=3600)
    # Processes `serve` runs on its port (each with its own memory, caches and change follower).
    workers: int = Field(default=1, ge=1, le=64)

    max_connectors_per_org: int = Field(default=5, ge=1, le=10_000)

    # What each process holds in memory for authorize (least recently used entries go first).
    connector_cache_size: int = Field(default=100_000, ge=1, le=10_000_000)
    # A starting process loads connectors into memory (those called lately first, then by last
    # change, up to connector_cache_size) while it already serves (app.connectors.preload).
    preload_connectors: bool = True
    # With preload on, /readyz answers 503 `starting` until the connectors called lately are
    # held, for at most this long (0: ready at once; the rest is loaded while serving either way).
    preload_ready_wait_seconds: float = Field(default=30.0, ge=0, le=3600)
    # Python's full garbage collection runs this often instead of by its allocation counts
    # (app.core.collector); 0 leaves Python's own schedule.
    full_gc_interval_seconds: float = Field(default=600.0, ge=0, le=86_400)
    token_cache_size: int = Field(default=100_000, ge=1, le=10_000_000)
    caller_token_cache_size: int = Field(default=100_000, ge=1, le=10_000_000)
    # How often each process reads the changes made elsewhere (at once when told over Redis).
    change_poll_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    # How long after it last heard from the database a process still serves what it holds.
    max_staleness_seconds: float = Field(default=300.0, ge=0, le=86_400)
    # POST /validate makes at most one live check per connector version per this many seconds.
    validate_interval_seconds: float = Field(default=10.0, gt=0, le=86_400)

    # Caller identity. HS256 with a shared secret, or RS256/ES256 with a PEM public key or JWKS URL.
    jwt_secret: SecretStr | None = None
    jwt_public_key: str | None = None
    jwks_url: str | None = None
    jwt_issuer: str = "connectors"
    jwt_audience: str = "connectors"
    jwt_org_claim: str = "org_id"
    jwt_leeway_seconds: int = Field(default=30, ge=0, le=600)

    # Secrets at rest: "id:base64key,..." with the newest key first.
    encryption_keys: Annotated[SecretStr | None, NoDecode] = None
    # Generate (or reuse) development keys under data_dir when the two above are unset.
    dev_keys: bool = False

    # Outbound calls to token and validation endpoints.
    ca_bundle: Path | None = None
    allow_private_destinations: bool = False
    outbound_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    outbound_max_response_bytes: int = Field(default=256 * 1024, ge=1024, le=16 * 1024 * 1024)
    default_token_lifetime_seconds: int = Field(default=3600, ge=1, le=86_400 * 30)
    # At most this many client certificates (tls_client_auth) keep a connection pool of their own.
    outbound_max_client_certificates: int = Field(default=256, ge=1, le=100_000)

    # Name resolution for outbound calls (app.core.outbound.lookups): c-ares, with these DNS
    # servers ("ip" or "ip:port", comma-separated) instead of /etc/resolv.conf's when set.
    dns_servers: Annotated[tuple[str, ...], NoDecode] = ()
    # A lookup ends after this long (never later than the outbound deadline).
    dns_timeout_seconds: float = Field(default=2.0, gt=0, le=30)
    # A name that failed to resolve fails at once for this long.
    dns_negative_ttl_seconds: float = Field(default=5.0, ge=0, le=300)
    # Lookups in flight started on behalf of one organization; more fail at once.
    dns_max_lookups_per_organization: int = Field(default=8, ge=1, le=1000)

    # Webhooks (app.webhooks). Subscriptions an organization may have.
    webhooks_per_organization: int = Field(default=10, ge=1, le=1000)
    # After a secret rotation, the old secret keeps signing alongside the new one this long.
    webhook_secret_overlap_seconds: float = Field(default=86_400.0, ge=0, le=30 * 86_400)
    # Each replica looks for due deliveries this often (a change made here wakes it at once).
    webhook_poll_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    # Deadline of one delivery attempt; the lease a replica takes on a delivery is longer.
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # Delivered and abandoned events are kept this long for GET /webhooks/{id}/deliveries.
    webhook_retention_seconds: float = Field(default=7 * 86_400.0, ge=3600, le=90 * 86_400)

    # The admin console at /console/ (app.console), and the OpenID Connect provider its admins
    # sign in with (its issuer URL, and the console's client there).
    console: bool = True
    console_oidc_issuer: str = ""
    console_oidc_client_id: str = ""
    console_oidc_client_secret: SecretStr | None = None

    # Authorization code connectors. The URL users' browsers reach the service at (a proxy's, when
    # one is in front): the consent callback is {public_url}/oauth/callback. Empty: the address
    # the service listens at. Plain http only for a loopback host.
    public_url: str = ""
    # Origins ("https://host[:port]") a consent's return_url may have, comma-separated; the
    # service's own origin is always allowed.
    consent_return_origins: Annotated[tuple[str, ...], NoDecode] = ()

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        if not value:
            return value
        problem = _public_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value.rstrip("/")

    @field_validator("consent_return_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        origins = tuple(part.strip().rstrip("/") for part in value.split(",") if part.strip())
        for origin in origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("https", "http") or not parts.hostname or parts.path or parts.query:
                raise ValueError(
                    'each origin is "https://host" or "https://host:port", with nothing after it'
                )
            if parts.scheme == "http" and not is_loopback_host(parts.hostname):
                raise ValueError("an http:// origin must be a loopback host")
        return tuple(web_origin(origin) for origin in origins)

    @property
    def callback_url(self) -> str:
        """The one redirect URI of the service, to register at each provider."""
        return f"{self.effective_public_url}/oauth/callback"

    @property
    def effective_public_url(self) -> str:
        if self.public_url:
            return self.public_url
        # Listening on every address: the browser on this machine reaches it at loopback.
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)  # noqa: S104
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @field_validator("dns_servers", mode="before")
    @classmethod
    def _split_dns_servers(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        servers = tuple(part.strip() for part in value.split(",") if part.strip())
        for server in servers:
            if not _is_dns_server(server):
                raise ValueError('each DNS server is an IP address, with an optional port ("[ip6]:53")')
        return servers

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if value and not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        if value.startswith("sqlite+aiosqlite://"):
            # An explicit file goes where it is told and nowhere else: no directory is made for it.
            directory = _sqlite_directory(value)
            if directory is not None and not directory.is_dir():
                raise ValueError(f"the directory {directory} does not exist")
        return value

    @field_validator("encryption_keys")
    @classmethod
    def _check_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _parse_key_ring(value.get_secret_value())
        return value

    @field_validator("jwks_url")
    @classmethod
    def _check_jwks_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("https://"):
            raise ValueError("must be an https:// URL")
        return value

    @field_validator("ca_bundle")
    @classmethod
    def _check_ca_bundle(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("must name a readable PEM file")
        return value

    @model_validator(mode="after")
    def _one_verification_method(self) -> Settings:
        methods = [self.jwt_secret, self.jwt_public_key, self.jwks_url]
        if sum(m is not None for m in methods) > 1:
            raise ValueError(
                "set only one of CONNECTORS_JWT_SECRET, CONNECTORS_JWT_PUBLIC_KEY, CONNECTORS_JWKS_URL"
            )
        return self

    @model_validator(mode="after")
    def _staleness_above_the_poll_interval(self) -> Settings:
        if self.max_staleness_seconds <= 2 * self.change_poll_interval_seconds:
            raise ValueError(
                "CONNECTORS_MAX_STALENESS_SECONDS must exceed twice CONNECTORS_CHANGE_POLL_INTERVAL_SECONDS"
            )
        return self

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'connectors.db'}"

    def key_ring(self) -> list[tuple[str, bytes]]:
        """The encryption keys, newest first."""
        if self.encryption_keys is None:
            raise ConfigError("CONNECTORS_ENCRYPTION_KEYS is not set")
        return _parse_key_ring(self.encryption_keys.get_secret_value())


def _public_url_problem(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return "must be an absolute http(s) URL"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be an absolute http(s) URL"
    if parts.query or parts.fragment or parts.username or parts.password:
        return "may not have a query, a fragment or credentials"
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        return "must be https:// unless its host is a loopback address"
    return None


def _generate_dev_keys(path: Path) -> dict[str, str]:
    key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    keys = {
        "CONNECTORS_JWT_SECRET": secrets.token_urlsafe(48),
        "CONNECTORS_ENCRYPTION_KEYS": f"dev1:{key}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(keys, handle, indent=2)
    return keys


def dev_key_file(settings: Settings) -> Path:
    """Where development keys are kept: absolute, since a relative data dir follows the working directory."""
    return Path(os.path.abspath(settings.data_dir / DEV_KEY_FILE))


def _read_dev_keys(path: Path) -> dict[str, str]:
    try:
        keys = json.loads(path.read_text())
    except (OSError, ValueError):
        keys = None
    names = ("CONNECTORS_JWT_SECRET", "CONNECTORS_ENCRYPTION_KEYS")
    if not isinstance(keys, dict) or not all(isinstance(keys.get(name), str) for name in names):
        raise ConfigError(f"{path}: unreadable development key file")
    return {name: keys[name] for name in names}


def unknown_variables(environ: Mapping[str, str] | None = None) -> str | None:
    """One warning line naming the ``CONNECTORS_*`` variables nothing reads, or None.

    Names only, never values; each with the known name it most resembles, if one is close.
    """
    environ = os.environ if environ is None else environ
    known = [f"{PREFIX}{name.upper()}" for name in Settings.model_fields] + list(OTHER_VARIABLES)
    unknown = sorted(
        name for name in environ if name.upper().startswith(PREFIX) and name.upper() not in known
    )
    if not unknown:
        return None
    # Compared without the common prefix, which would make every pair look alike.
    suffixes = {name.removeprefix(PREFIX): name for name in known}
    described = []
    for name in unknown:
        close = difflib.get_close_matches(name.upper().removeprefix(PREFIX), suffixes, n=1)
        described.append(f"{name} (did you mean {suffixes[close[0]]}?)" if close else name)
    return "unknown settings ignored: " + ", ".join(described)


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    location = "_".join(str(part) for part in first["loc"]).upper()
    name = f"CONNECTORS_{location}" if location else "settings"
    return f"{name}: {error_message(first)}"


def parse_settings(**overrides: object) -> Settings:
    """Read settings without requiring keys (for commands that need none, like ``migrate``)."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def load_settings(**overrides: object) -> tuple[Settings, str | None]:
    """Read settings from the environment; returns them and a note when dev keys were created.

    Raises ``ConfigError`` with one printable line when a setting is missing or malformed.
    """
    settings = parse_settings(**overrides)
    note: str | None = None
    if settings.dev_keys and (settings.encryption_keys is None or _no_jwt_key(settings)):
        path = dev_key_file(settings)
        if path.exists():
            keys = _read_dev_keys(path)
        else:
            keys = _generate_dev_keys(path)
            note = f"generated development keys in {path}"
        extra: dict[str, object] = {}
        if settings.encryption_keys is None:
            extra["encryption_keys"] = keys["CONNECTORS_ENCRYPTION_KEYS"]
        if _no_jwt_key(settings):
            extra["jwt_secret"] = keys["CONNECTORS_JWT_SECRET"]
        settings = parse_settings(**{**overrides, **extra})
    if settings.encryption_keys is None:
        raise ConfigError(
            "CONNECTORS_ENCRYPTION_KEYS is not set (or set CONNECTORS_DEV_KEYS=true for development)"
        )
    if _no_jwt_key(settings):
        raise ConfigError(
            "set one of CONNECTORS_JWT_SECRET, CONNECTORS_JWT_PUBLIC_KEY or CONNECTORS_JWKS_URL"
            " (or CONNECTORS_DEV_KEYS=true for development)"
        )
    return settings, note


def load_token_settings(**overrides: object) -> tuple[Settings, Path | None]:
    """Settings for minting a caller token, and the development key file its secret came from.

    Only the caller-token settings are required: no encryption key. The HS256 secret is
    CONNECTORS_JWT_SECRET or, with CONNECTORS_DEV_KEYS=true, the one in an existing development key
    file; nothing is generated or written, since a secret made here would match no server.
    """
    settings = parse_settings(**overrides)
    if settings.jwt_secret is not None:
        return settings, None
    if not _no_jwt_key(settings):
        raise ConfigError(
            "`token` signs with CONNECTORS_JWT_SECRET (HS256); with CONNECTORS_JWT_PUBLIC_KEY or"
            " CONNECTORS_JWKS_URL set, caller tokens come from the identity provider"
        )
    path = dev_key_file(settings)
    if not settings.dev_keys:
        raise ConfigError(
            "`token` signs with CONNECTORS_JWT_SECRET, which is not set (or set CONNECTORS_DEV_KEYS=true"
            f" to read the development secret from {path})"
        )
    if not path.exists():
        raise ConfigError(
            "`token` signs with CONNECTORS_JWT_SECRET, which is not set, and there is no development key"
            f" file at {path} (set CONNECTORS_DATA_DIR to the data directory of the server started with"
            " CONNECTORS_DEV_KEYS=true)"
        )
    secret = _read_dev_keys(path)["CONNECTORS_JWT_SECRET"]
    return parse_settings(**{**overrides, "jwt_secret": secret}), path


def _no_jwt_key(settings: Settings) -> bool:
    return settings.jwt_secret is None and settings.jwt_public_key is None and settings.jwks_url is None
