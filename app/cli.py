"""The command line: ``python -m app`` (also installed as ``connectors``).

Commands: ``serve``, ``migrate``, ``token`` (mint a development caller token) and ``rotate-keys``.
A missing or malformed setting ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from app.core.config import ConfigError, Settings, load_settings, parse_settings

log = logging.getLogger("connectors")


def _settings() -> Settings:
    """Settings with keys; configures logging, then notes development keys it generated."""
    from app.core.logs import configure_logging

    settings, note = load_settings()
    configure_logging(settings.log_level)
    if note:
        log.warning(note)
    return settings


def _serve(_args: argparse.Namespace) -> int:
    import uvicorn

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
    log.info("serving", extra={"host": settings.host, "port": settings.port})
    uvicorn.Server(config).run()
    return 0


def _migrate(_args: argparse.Namespace) -> int:
    from app.core.logs import configure_logging
    from app.migrations import current_revision, upgrade

    settings = parse_settings()
    configure_logging(settings.log_level)
    url = settings.effective_database_url
    asyncio.run(upgrade(url))
    log.info("database migrated", extra={"revision": asyncio.run(current_revision(url))})
    return 0


def _token(args: argparse.Namespace) -> int:
    from app.core.auth import mint_token

    settings = _settings()
    if settings.jwt_secret is None:
        raise ConfigError("`token` signs with CONNECTORS_JWT_SECRET, which is not set")
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
