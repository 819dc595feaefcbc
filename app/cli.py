"""The command line: ``python -m app`` (also installed as ``connectors``).

Commands: ``serve``, ``migrate``, ``token`` (mint a development caller token) and ``rotate-keys``.
A missing or malformed setting, or an address ``serve`` cannot listen on, ends the command with
one line on stderr and exit status 2. Every command first warns of ``CONNECTORS_*`` variables that
no setting reads.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from app.core.config import (
    ConfigError,
    Settings,
    load_settings,
    load_token_settings,
    parse_settings,
    unknown_variables,
)

log = logging.getLogger("connectors")


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


def _serve(_args: argparse.Namespace) -> int:
    import uvicorn

    from app.keycheck import require_readable_secrets
    from app.main import create_app
    from app.migrations import current_revision, head_revision

    settings = _settings()
    url = settings.effective_database_url
    current, head = asyncio.run(current_revision(url)), head_revision()
    if current != head:
        raise ConfigError(
            f"the database is at revision {current or 'none'}, the newest is {head}:"
            " run `python -m app migrate` first"
        )
    asyncio.run(require_readable_secrets(settings))
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=30,
    )
    sockets = _listen(settings.host, settings.port, config.backlog)
    log.info("serving", extra={"host": settings.host, "port": settings.port})
    try:
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


def _rotate_keys(args: argparse.Namespace) -> int:
    from app.rotation import rotate_keys

    settings = _settings()
    report = asyncio.run(rotate_keys(settings, batch_size=args.batch_size))
    log.info(
        "key rotation finished",
        extra={"rotated": report.rotated, "skipped": report.skipped, "failed": report.failed},
    )
    return 1 if report.failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="connectors", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve the HTTP API").set_defaults(func=_serve)
    commands.add_parser("migrate", help="bring the database schema to the newest revision").set_defaults(
        func=_migrate
    )
    token = commands.add_parser("token", help="print a caller JWT signed with the HS256 secret")
    token.add_argument("--org", required=True, help="organization id put in the token")
    token.add_argument(
        "--scope",
        default="connectors:read connectors:write connectors:authorize",
        help="space-separated scopes",
    )
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.add_argument("--subject", default="dev", help="the token's sub claim")
    token.set_defaults(func=_token)
    rotate = commands.add_parser("rotate-keys", help="re-encrypt every stored secret under the newest key")
    rotate.add_argument("--batch-size", type=int, default=100)
    rotate.set_defaults(func=_rotate_keys)
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
