"""The command line: ``python -m app`` (also installed as ``connectors``).

Commands: ``serve``, ``migrate``, ``token`` (mint a development caller token), ``console-link``
(a development sign-in link to the admin console), ``rotate-keys`` and
``check`` (one verdict per part ``serve`` needs); ``--help`` on each shows its options with their
defaults, ``--version`` the version. A missing or malformed setting, or an address ``serve`` cannot
listen on, ends the command with one line on stderr and exit status 2. Every command first warns of
``CONNECTORS_*`` variables that no setting reads.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import secrets
import socket
import sys
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from app import __version__
from app.core.config import (
    ConfigError,
    Settings,
    dev_key_file,
    load_settings,
    load_token_settings,
    parse_settings,
    unknown_variables,
)

log = logging.getLogger("connectors")

# How long `check` gives each check that reaches another system (database, Redis, JWKS).
CHECK_TIMEOUT_SECONDS = 5.0


def _start(settings: Settings) -> None:
    """Configure logging, then name the ``CONNECTORS_*`` variables nothing reads (before any
    missing-setting error they may explain)."""
    from app.core.logs import configure_logging

    configure_logging(settings.log_level)
    unknown = unknown_variables()
    if unknown:
        log.warning(unknown)


def _settings() -> Settings:
    """Settings with keys; configures logging, then notes development keys it generated."""
    _start(parse_settings())
    settings, note = load_settings()
    if note:
        log.warning(note)
    return settings


def _listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for every address of ``host``, bound before the application starts.

    A failure is one ``ConfigError`` line, so a taken port never gets as far as the lifespan.
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as error:
        raise ConfigError(f"cannot listen on {where}: {_reason(error)}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # As asyncio does for a host name: IPv4 addresses get sockets of their own.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"cannot listen on {where}: {_reason(error)}") from None
    return sockets


def _reason(error: OSError) -> str:
    reason = error.strerror or type(error).__name__
    return reason[:1].lower() + reason[1:]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from app.core.serving import ServeConfig
    from app.keycheck import require_readable_secrets
    from app.main import create_app
    from app.migrations import current_revision, head_revision

    if args.workers is not None:
        # Where the workers read it too; checked with every other setting.
        os.environ["CONNECTORS_WORKERS"] = str(args.workers)
    settings = _settings()
    url = settings.effective_database_url
    current, head = asyncio.run(current_revision(url)), head_revision()
    if current != head:
        raise ConfigError(
            f"the database is at revision {current or 'none'}, the newest is {head}:"
            " run `python -m app migrate` first"
        )
    asyncio.run(require_readable_secrets(settings))
    workers = settings.workers
    config = ServeConfig(
        # One process serves the application made here; workers each make their own.
        "app.main:from_environment" if workers > 1 else create_app(settings),
        factory=workers > 1,
        workers=workers,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=30,
        timeout_keep_alive=settings.keep_alive_seconds,
        # Each request starts with empty context variables: a pipelined request's task is started
        # from the previous one's, and must not inherit its organization (outbound_tenant).
        reset_contextvars=True,
        header_timeout=settings.header_timeout_seconds,
        max_connections=settings.max_connections,
    )
    sockets = _listen(settings.host, settings.port, config.backlog)
    log.info("serving", extra={"host": settings.host, "port": settings.port, "workers": workers})
    try:
        if workers > 1:
            # Each worker accepts from the same sockets; a worker that dies is replaced, and a
            # stop (SIGTERM, Ctrl-C) stops each gracefully before this process ends.
            Multiprocess(config, sockets=sockets).run()
        else:
            uvicorn.Server(config).run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
    return 0


def _migrate(_args: argparse.Namespace) -> int:
    from app.migrations import current_revision, upgrade

    settings = parse_settings()
    _start(settings)
    url = settings.effective_database_url
    asyncio.run(upgrade(url))
    log.info("database migrated", extra={"revision": asyncio.run(current_revision(url))})
    return 0


def _token(args: argparse.Namespace) -> int:
    from app.core.auth import mint_token

    _start(parse_settings())
    settings, key_file = load_token_settings()
    if key_file is not None:
        log.warning(f"signing with the development secret in {key_file}")
    try:
        token = mint_token(
            settings,
            organization_id=args.org,
            scopes=args.scope.split(),
            ttl_seconds=args.ttl,
            subject=args.subject,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    print(token)
    return 0


def _console_link(args: argparse.Namespace) -> int:
    from app.console.router import sign_in_url
    from app.console.sessions import SessionStore
    from app.core.clock import SystemClock
    from app.core.db import Database, build_engine

    settings = _settings()
    if not settings.dev_keys:
        raise ConfigError(
            "console-link signs in without an identity provider: it needs CONNECTORS_DEV_KEYS=true"
        )

    async def create() -> str:
        db = Database(build_engine(settings.effective_database_url))
        try:
            return await SessionStore(db, SystemClock()).create_link(
                args.org, args.subject, read_only=args.read_only
            )
        finally:
            await db.dispose()

    print(sign_in_url(settings.effective_public_url, asyncio.run(create())))
    return 0


def _rotate_keys(args: argparse.Namespace) -> int:
    from app.rotation import rotate_keys

    settings = _settings()
    report = asyncio.run(rotate_keys(settings, batch_size=args.batch_size))
    log.info(
        "key rotation finished",
        extra={"rotated": report.rotated, "skipped": report.skipped, "failed": report.failed},
    )
    return 1 if report.failed else 0


def _check_settings() -> tuple[Settings, str]:
    """Settings as ``serve`` reads them, without writing anything, and a note on them.

    Where ``serve`` would generate development keys, keys made in memory stand in for them: what
    they are checked against (the stored secrets) is what the generated ones would meet.
    """
    settings = parse_settings()
    _start(settings)
    notes = [unknown_variables() or "read from the environment"]
    no_jwt_key = settings.jwt_secret is None and settings.jwt_public_key is None and settings.jwks_url is None
    path = dev_key_file(settings)
    stand_in: dict[str, object] = {}
    if settings.dev_keys and (settings.encryption_keys is None or no_jwt_key):
        if path.exists():
            notes.append(f"development keys from {path}")
        else:
            if settings.encryption_keys is None:
                key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
                stand_in["encryption_keys"] = f"dev1:{key}"
            if no_jwt_key:
                stand_in["jwt_secret"] = secrets.token_urlsafe(48)
            notes.append(
                f"no development keys at {path} yet (serve generates them):"
                " checked with keys made for this check"
            )
    settings, _ = load_settings(**stand_in)
    return settings, "; ".join(notes)


def _check(args: argparse.Namespace) -> int:
    from app.checks import run_checks

    settings, note = _check_settings()
    results = asyncio.run(run_checks(settings, seconds_per_check=args.timeout, note=note))
    failed = sum(result.status == "failed" for result in results)
    if args.json:
        summary = {"version": __version__, "ok": not failed, "checks": [r.as_dict() for r in results]}
        print(json.dumps(summary, indent=2))
    else:
        for result in results:
            print(result.line())
        print(
            "all checks passed" if not failed else f"{failed} {'check' if failed == 1 else 'checks'} failed"
        )
    return 1 if failed else 0


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 < seconds <= 600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 600 seconds")
    return seconds


def _default(name: str) -> object:
    return Settings.model_fields[name].default


_DESCRIPTION = "The connector credentials service: stores connector credentials, hands out request headers."
_EPILOG = (
    'Settings are the CONNECTORS_* environment variables (README.md, "Configuration");'
    " `connectors COMMAND --help` shows a command's options with their defaults."
)


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="connectors", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=formatter
    )
    parser.add_argument(
        "--version", action="version", version=f"connectors {__version__}", help="print the version and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=summary, description=description, epilog=_EPILOG, formatter_class=formatter
        )

    database = (
        "the database at CONNECTORS_DATABASE_URL (default: SQLite at $CONNECTORS_DATA_DIR/connectors.db,"
        f" where CONNECTORS_DATA_DIR defaults to {_default('data_dir')})"
    )
    serve = command(
        "serve",
        "serve the HTTP API",
        "Serve the HTTP API on CONNECTORS_HOST:CONNECTORS_PORT"
        f" (default: {_default('host')}:{_default('port')}) with {database}. Refuses to start on a"
        " database not at the newest schema revision, or"
        " with a key ring that cannot open the stored secrets.",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes serving the port, each with its own memory (default: CONNECTORS_WORKERS, or 1)",
    )
    serve.set_defaults(func=_serve)
    command(
        "migrate",
        "bring the database schema to the newest revision",
        f"Bring {database} to the newest schema revision.",
    ).set_defaults(func=_migrate)
    token = command(
        "token",
        "print a caller JWT signed with the HS256 secret",
        "Print a caller JWT signed with CONNECTORS_JWT_SECRET (HS256), or with CONNECTORS_DEV_KEYS=true"
        " the secret of an existing development key file, for development and tests.",
    )
    token.add_argument(
        "--org", required=True, default=argparse.SUPPRESS, help="organization id put in the token (required)"
    )
    token.add_argument(
        "--scope",
        default="connectors:read connectors:write connectors:authorize",
        help="space-separated scopes",
    )
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.add_argument("--subject", default="dev", help="the token's sub claim")
    token.set_defaults(func=_token)
    link = command(
        "console-link",
        "print a single-use sign-in link to the admin console (development)",
        "Print a link that signs in to the admin console at CONNECTORS_PUBLIC_URL/console/ as an"
        " admin of the organization, once, within 5 minutes. Development only: it needs"
        " CONNECTORS_DEV_KEYS=true (as `make run` sets); production signs in with OpenID Connect.",
    )
    link.add_argument(
        "--org", required=True, default=argparse.SUPPRESS, help="the organization to sign in to (required)"
    )
    link.add_argument("--subject", default="dev-admin", help="the admin's name in the audit trail")
    link.add_argument("--read-only", action="store_true", help="see everything, change nothing")
    link.set_defaults(func=_console_link)
    rotate = command(
        "rotate-keys",
        "re-encrypt every stored secret under the newest key",
        "Re-encrypt every stored secret under the first (newest) key of CONNECTORS_ENCRYPTION_KEYS,"
        " in batches of one transaction each; safe to interrupt and to run again.",
    )
    rotate.add_argument("--batch-size", type=int, default=100, help="connectors re-encrypted per transaction")
    rotate.set_defaults(func=_rotate_keys)
    check = command(
        "check",
        "check settings, database, keys, Redis and caller tokens",
        "Check what serve needs, one line per check (ok, FAILED or skipped): the settings, reaching"
        f" {database}, its schema revision against the newest, the key ring against the stored"
        " secrets, Redis with PING when CONNECTORS_REDIS_URL is set, and the caller-token"
        " verification (with CONNECTORS_JWKS_URL, the JWKS document is fetched). Writes nothing and"
        " prints no secret. Exit status: 0 when every check passed, 1 when one failed, 2 when a"
        " setting cannot be read.",
    )
    check.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    check.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=CHECK_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="deadline of each check that reaches another system (database, Redis, JWKS)",
    )
    check.set_defaults(func=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as error:
        print(f"connectors: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (OSError, SQLAlchemyError) as error:
        # Driver messages can carry connection details; the type is enough to act on.
        print(f"connectors: cannot reach the database ({type(error).__name__})", file=sys.stderr)
        return 2
    return code
