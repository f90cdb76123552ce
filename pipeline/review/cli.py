"""``genpipe review serve | add-reviewer | update-reviewer``: run the review page; manage reviewers (the same
commands as ``genpipe audit add-reviewer | update-reviewer``)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

from pipeline.audit.cli import UPDATE_REVIEWER_HELP, reviewer_add_arguments, reviewer_update_arguments


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pipeline.review.app import SECRET_ENV, create_app

    app = create_app(args.db, https_only=args.secure_cookies, session_ttl=args.session_ttl)
    try:
        public = not ipaddress.ip_address(args.host).is_loopback
    except ValueError:  # a host name
        public = args.host != "localhost"
    if public and not args.secure_cookies:
        print(f"genpipe: warning: serving on {args.host} without --secure-cookies; put it behind TLS", file=sys.stderr)
    print(f"genpipe review: http://{args.host}:{args.port}/ (set {SECRET_ENV} to keep sessions across restarts)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", proxy_headers=False)
    return 0


def _positive(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def register(subparsers: Any) -> None:
    """Add ``review`` and its subcommands to the top-level ``genpipe`` parser."""
    review = subparsers.add_parser("review", help="the reviewers' web page and accounts")
    sub = review.add_subparsers(dest="review_command", required=True)

    p = sub.add_parser("serve", help="serve the review page", description="serve the review page (FastAPI)")
    p.add_argument("--db", required=True, metavar="URL", help="audit DB (SQLAlchemy URL)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8080, help="port (default 8080)")
    p.add_argument("--secure-cookies", action="store_true", help="mark the session cookie Secure (behind TLS)")
    p.add_argument("--session-ttl", type=_positive, default=8 * 3600, metavar="SECONDS",
                   help="a sign-in lasts this long (default 8 hours)")  # fmt: skip
    p.set_defaults(fn=_cmd_serve)

    for name, help_, arguments in (
        ("add-reviewer", "add a reviewer and print their API token", reviewer_add_arguments),
        ("update-reviewer", UPDATE_REVIEWER_HELP, reviewer_update_arguments),
    ):
        help_ += f" (same as `genpipe audit {name}`)"
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--db", required=True, metavar="URL", help="audit DB (SQLAlchemy URL)")
        arguments(p)
