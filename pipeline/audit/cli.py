"""``genpipe audit ...``: migrate, verify, query, export, history, and reviewer / review commands.

Exit codes: 0 done; 1 ``verify`` found tampering; 2 bad usage, bad filter value, or a database that cannot
be reached (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import getpass
import math
import os
import re
import sys
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from pipeline.audit.formats import FORMATS, WRITERS, open_output
from pipeline.audit.query import (
    DECISIONS,
    SORT_FIELDS,
    STATUSES,
    QueryError,
    QueryFilters,
    ScoreRange,
    check_score_key,
    export_approved,
    iter_records,
)
from pipeline.audit.reviews import ACTIONS, REASON_CODES, ROLES

TOKEN_ENV = "GENPIPE_REVIEW_TOKEN"
#: Score keys with their own --min-KEY / --max-KEY flags (any other key: --min-score KEY=VALUE).
SCORE_FLAGS = ("nsfw", "clipscore", "clip_cosine")


# --- argument types: a bad value is an argparse error naming the flag (exit 2) --------------------------


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _key_value(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. nsfw_open_nsfw=0.3")
    try:
        return check_score_key(key.strip()), _number(value.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _when(text: str) -> tuple[datetime, bool]:
    """An ISO 8601 date or date-time (naive = UTC); the flag says whether it was a whole day."""
    try:  # a date alone (2026-03-01 or 20260301) means that whole day
        return datetime.combine(date.fromisoformat(text), time(), tzinfo=UTC), True
    except ValueError:
        pass
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 date or date-time (e.g. 2026-03-01 or 2026-03-01T12:00:00Z)"
        ) from None
    return (value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)), False


#: The largest integer a database column holds (BIGINT); a bigger one is a bad argument, not an overflow.
MAX_INT = 2**63 - 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_INT:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and {MAX_INT}")
    return value


def _sort_field(text: str) -> str:
    if text in SORT_FIELDS or text in SCORE_FLAGS:
        return text
    try:
        return check_score_key(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: sort by one of {', '.join(SORT_FIELDS)} or a score key") from None


# --- commands ------------------------------------------------------------------------------------------------


def _open(url: str, migrate: bool = False) -> Any:
    from pipeline.audit.store import AuditStore

    return AuditStore(url, migrate=migrate)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from pipeline.audit.migrate import describe, head_revision

    store = _open(args.db, migrate=True)
    try:
        head = head_revision()
        found = store.revision_found
        if found == head:
            print(f"audit DB {store.safe_url}: already at schema revision {head}")
        else:
            print(f"audit DB {store.safe_url}: migrated from {describe(found)} to revision {head}")
    finally:
        store.dispose()
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.audit.verify import verify

    store = _open(args.db)
    try:
        report = verify(store, images=args.images, anchors=tuple(args.anchor), max_problems=args.max_problems)
    finally:
        store.dispose()
    print(report.render())
    return 0 if report.ok else 1


def _filters(args: argparse.Namespace) -> QueryFilters:
    ranges: dict[str, ScoreRange] = {}

    def bound(key: str, low: float | None, high: float | None, flag: str) -> None:
        r = ranges.setdefault(key, ScoreRange(key, flag=flag))
        r.low = low if low is not None else r.low
        r.high = high if high is not None else r.high
        r.flag = flag if r.flag == flag else f"{r.flag}/{flag}"

    for key in SCORE_FLAGS:
        flag = key.replace("_", "-")
        if (low := getattr(args, f"min_{key}")) is not None:
            bound(key, low, None, f"--min-{flag}")
        if (high := getattr(args, f"max_{key}")) is not None:
            bound(key, None, high, f"--max-{flag}")
    for key, low in args.min_score:
        bound(key, low, None, "--min-score")
    for key, high in args.max_score:
        bound(key, None, high, "--max-score")
    until = None
    if args.until is not None:
        until = args.until[0] + (timedelta(days=1) if args.until[1] else timedelta(microseconds=1))  # inclusive
    return QueryFilters(
        jobs=args.job,
        campaigns=args.campaign,
        statuses=args.status,
        decisions=args.decision,
        scores=list(ranges.values()),
        reviewers=args.reviewer,
        since=args.since[0] if args.since else None,
        until=until,
        search=args.search,
        sort=args.sort,
        descending=args.desc,
        limit=args.limit,
    )


def _cmd_query(args: argparse.Namespace) -> int:
    if args.format == "parquet" and not args.out:
        raise QueryError("--format parquet needs --out PATH_OR_URL (Parquet is not written to a terminal)")
    filters = _filters(args)
    store = _open(args.db)
    try:
        records = iter_records(store, filters)
        first = next(records, None)  # bad filters fail here, before any output file is created

        def stream() -> Any:
            if first is not None:
                yield first
                yield from records

        write = WRITERS[args.format]
        if args.out:
            with open_output(args.out, binary=args.format == "parquet") as out:
                n = write(stream(), out)
            print(f"{n} records written to {args.out}", file=sys.stderr)
        else:
            try:
                write(stream(), sys.stdout)
                sys.stdout.flush()
            except BrokenPipeError:  # `genpipe audit query ... | head`: the reader has all it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        store.dispose()
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    store = _open(args.db)
    try:
        n = export_approved(store, args.out, job=args.job)
    finally:
        store.dispose()
    print(f"{n} approved and auto-passed images written to {args.out}")
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    import json

    from pipeline.audit.chain import json_default

    store = _open(args.db)
    try:
        item_id = args.item_id
        if re.fullmatch(r"[0-9a-f]{6,31}", item_id):  # the 8 characters in an image's file name, or any prefix
            found = store.item_ids_starting(item_id, limit=2)
            if len(found) > 1:
                raise QueryError(f"item id prefix {item_id!r} is ambiguous ({', '.join(found)}, ...): give more of it")
            item_id = found[0] if found else item_id
        events = store.history(item_id)
    finally:
        store.dispose()
    if not events:
        raise QueryError(f"no events for item {args.item_id!r}")
    for ev in events:
        ev["created_at"] = ev["created_at"].isoformat()
    print(json.dumps(events, indent=2, ensure_ascii=False, default=json_default))
    return 0


def _read_password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n") or None
    if args.password:
        return getpass.getpass(f"password for {args.name}: ") or None
    return None


def _cmd_reviewer_add(args: argparse.Namespace) -> int:
    from pipeline.audit.reviews import ReviewError

    password = _read_password(args)
    if (args.password or args.password_stdin) and password is None:  # asked for one: never an account without
        raise ReviewError("the password is empty")
    store = _open(args.db)
    try:
        token = store.add_reviewer(args.name, args.role, password)
    finally:
        store.dispose()
    print(f"reviewer {args.name} ({args.role}) added; API token (shown once, store it now):\n{token}")
    return 0


def _cmd_reviewer_update(args: argparse.Namespace) -> int:
    from pipeline.audit.reviews import ReviewError

    password = _read_password(args)
    if (args.password or args.password_stdin) and password is None:
        raise ReviewError("the new password is empty")
    disabled = True if args.disable else False if args.enable else None
    if args.role is None and disabled is None and password is None and not args.rotate_token and not args.sign_out:
        raise ReviewError("nothing to change: give --role, --disable, --enable, --password, --rotate-token, --sign-out")
    store = _open(args.db)
    try:
        token = store.update_reviewer(args.name, role=args.role, disabled=disabled, password=password,
                                      rotate_token=args.rotate_token, end_sessions=args.sign_out)  # fmt: skip
    finally:
        store.dispose()
    print(f"reviewer {args.name} updated" + ("; review-page sessions signed out" if
          args.sign_out or password is not None or disabled else ""))  # fmt: skip
    if token is not None:
        print(f"new API token (shown once, store it now; the old one no longer works):\n{token}")
    return 0


def _cmd_review(args: argparse.Namespace) -> int:
    from pipeline.audit.reviews import ReviewError

    token = os.environ.get(TOKEN_ENV, "")
    store = _open(args.db)
    try:
        who = store.authenticate_token(token)
        if who is None:
            raise ReviewError(f"set {TOKEN_ENV} to a valid reviewer API token (genpipe audit add-reviewer)")
        seqs = store.record_review(args.item_id, args.action, who["name"], args.reason, args.text, args.supersedes)
    finally:
        store.dispose()
    events = f"event {seqs[0]}" if len(seqs) == 1 else f"events {seqs[0]}..{seqs[-1]}"
    print(f"{args.action} by {who['name']} recorded for {len(seqs)} item(s): {events}")
    return 0


# --- parser ------------------------------------------------------------------------------------------------


UPDATE_REVIEWER_HELP = "change a reviewer's role, password or API token, disable or enable them, or sign them out"


def reviewer_add_arguments(p: argparse.ArgumentParser) -> None:
    """``add-reviewer``'s arguments (``genpipe audit`` and ``genpipe review`` both have the command)."""
    p.add_argument("name")
    p.add_argument("--role", choices=ROLES, default="reviewer")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--password", action="store_true", help="prompt for a password (for the review page)")
    group.add_argument("--password-stdin", action="store_true", help="read the password from stdin's first line")
    p.set_defaults(fn=_cmd_reviewer_add)


def reviewer_update_arguments(p: argparse.ArgumentParser) -> None:
    """``update-reviewer``'s arguments (``genpipe audit`` and ``genpipe review`` both have the command)."""
    p.add_argument("name")
    p.add_argument("--role", choices=ROLES)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--disable", action="store_true", help="refuse their sign-ins and token (signs them out)")
    group.add_argument("--enable", action="store_true", help="allow them again")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--password", action="store_true", help="prompt for a new password (signs them out)")
    group.add_argument("--password-stdin", action="store_true", help="read the new password from stdin's first line")
    p.add_argument("--rotate-token", action="store_true", help="issue a new API token; the old one stops working")
    p.add_argument("--sign-out", action="store_true", help="end every review-page session of theirs (a lost laptop)")
    p.set_defaults(fn=_cmd_reviewer_update)


def register(subparsers: Any) -> None:
    """Add ``audit`` and its subcommands to the top-level ``genpipe`` parser."""
    audit = subparsers.add_parser("audit", help="the audit log: migrate, verify, query, export, review")
    sub = audit.add_subparsers(dest="audit_command", required=True)

    def add(name: str, fn: Any, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--db", required=True, metavar="URL", help="SQLAlchemy URL, e.g. sqlite:///runs/demo/genpipe.db")
        p.set_defaults(fn=fn)
        return p

    add("migrate", _cmd_migrate, "create the audit DB or bring it to the newest schema (idempotent)")

    p = add("verify", _cmd_verify, "check the tamper-evidence chain; exit 1 naming the first bad record")
    p.add_argument("--images", action="store_true", help="also check every image against its recorded sha256")
    p.add_argument("--anchor", action="append", default=[], metavar="PATH_OR_URL",
                   help="a chain_head.json (or a job root with one) whose seq+hash must be in the chain")  # fmt: skip
    p.add_argument("--max-problems", type=_positive_int, default=20, help="problems listed (all are counted)")

    p = add("query", _cmd_query, "select audit records by job, status, decision, scores, reviewer, date, prompt text")
    p.add_argument("--job", action="append", default=[], help="job name (repeatable)")
    p.add_argument("--campaign", action="append", default=[], help="campaign (repeatable)")
    p.add_argument("--status", action="append", default=[], choices=STATUSES, help="item status (repeatable)")
    p.add_argument("--decision", action="append", default=[], choices=DECISIONS,
                   help="effective decision: the latest review if any, else the pipeline's (repeatable)")  # fmt: skip
    for key in SCORE_FLAGS:
        flag = key.replace("_", "-")
        p.add_argument(f"--min-{flag}", dest=f"min_{key}", type=_number, metavar="X", help=f"scores.{key} >= X")
        p.add_argument(f"--max-{flag}", dest=f"max_{key}", type=_number, metavar="X", help=f"scores.{key} <= X")
    p.add_argument("--min-score", action="append", default=[], type=_key_value, metavar="KEY=X",
                   help="any score key (e.g. nsfw_open_nsfw, bias_gender_female) >= X (repeatable)")  # fmt: skip
    p.add_argument("--max-score", action="append", default=[], type=_key_value, metavar="KEY=X",
                   help="any score key <= X (repeatable)")  # fmt: skip
    p.add_argument("--reviewer", action="append", default=[], help="items this reviewer reviewed (repeatable)")
    p.add_argument("--since", type=_when, metavar="DATE", help="recorded at or after (ISO date or date-time; UTC)")
    p.add_argument("--until", type=_when, metavar="DATE", help="recorded at or before (a date includes that day)")
    p.add_argument("--search", metavar="TEXT", help="case-insensitive substring of the prompt")
    p.add_argument("--sort", type=_sort_field, default="item_id", metavar="FIELD",
                   help=f"one of {', '.join(SORT_FIELDS)}, or a score key (default item_id)")  # fmt: skip
    p.add_argument("--desc", action="store_true", help="sort descending")
    p.add_argument("--limit", type=_positive_int, metavar="N")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--out", metavar="PATH_OR_URL", help="write here (atomically) instead of stdout")

    p = add("export", _cmd_export, "write the publishable Parquet manifest of approved and auto-passed images")
    p.add_argument("--approved", action="store_true", required=True,
                   help="approved by a reviewer, or passed by the policy and not rejected/escalated")  # fmt: skip
    p.add_argument("--out", required=True, metavar="URL", help="Parquet file (path or fsspec URL)")
    p.add_argument("--job", help="only this job")

    p = add("history", _cmd_history, "every event of one item (JSON), oldest first")
    p.add_argument("item_id")

    reviewer_add_arguments(add("add-reviewer", _cmd_reviewer_add, "add a reviewer and print their API token"))

    reviewer_update_arguments(add("update-reviewer", _cmd_reviewer_update, UPDATE_REVIEWER_HELP))

    p = add("review", _cmd_review, f"record a review as the reviewer whose token is in ${TOKEN_ENV}")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("item_id", nargs="+")
    codes = "; ".join(f"{a}: {', '.join(c)}" for a, c in REASON_CODES.items())
    p.add_argument("--reason", metavar="CODE", help=f"reason code (approve, reject and escalate need one) — {codes}")
    p.add_argument("--text", help="free text (a comment needs one, and so does reason 'other')")
    p.add_argument(
        "--supersedes", type=_positive_int, metavar="SEQ", help="the review event this one replaces (default: latest)"
    )
