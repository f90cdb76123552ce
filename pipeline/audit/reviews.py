"""Reviewers and their decisions: accounts (salted password / token hashes), review events, effective decisions.

A review is an event in the chain (``review_approve``, ``review_reject``, ``review_escalate``,
``review_comment``) carrying who (``reviewer_id``, and the name and role in the payload), why
(``reason_code``, ``text``), when (the hashed database clock), which image (its sha256 in the payload) and
the decision event it supersedes. Nothing about a review is stored anywhere else, so there is no second
copy to drift or to edit: an item's *effective decision* is computed from the chain —

    the latest approve / reject / escalate of the item  →  approved / rejected / escalated
    none                                                →  the pipeline's decision (pass / review / block)

Admins have the last word: once an item has been escalated, or an admin has decided it, only an admin may approve
or reject it; and only an admin may approve an image the policy blocked (quarantined). Publishable = pass or
approved.
Reviewer accounts are current-state rows; adding one and changing its role or disabled flag are events too
(password and token hashes never enter the log).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, case, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from pipeline.audit.chain import (
    DECISION_KINDS,
    REVIEW_KINDS,
    REVIEWER_ADDED,
    REVIEWER_UPDATED,
    NewEvent,
    append_events,
    reviewer_payload,
)
from pipeline.audit.schema import EventRow, ItemRow, ReviewerRow
from pipeline.audit.sessions import end_sessions_of
from pipeline.errors import GenpipeError

if TYPE_CHECKING:
    from pipeline.audit.store import AuditStore

ROLES = ("reviewer", "admin")
ACTIONS = ("approve", "reject", "escalate", "comment")
#: Effective decisions, in the order a review queue shows them.
EFFECTIVE_DECISIONS = ("pass", "review", "block", "approved", "rejected", "escalated")
PUBLISHABLE = ("pass", "approved")
_STATE_OF_KIND = {"review_approve": "approved", "review_reject": "rejected", "review_escalate": "escalated"}

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
REASON_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
MAX_TEXT = 10_000
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_IN_CHUNK = 500

_events = EventRow.__table__
_items = ItemRow.__table__
_reviewers = ReviewerRow.__table__


class ReviewError(GenpipeError):
    """A review or reviewer change that is not allowed (unknown item or reviewer, missing reason, ...)."""


# --- secrets ---------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash`` with a fresh 16-byte salt."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${_b64(salt)}${_b64(digest)}"


def check_password(stored: str | None, password: str) -> bool:
    if not stored:
        hash_password(password)  # same work as a real check: no timing hint that the account has no password
        return False
    scheme, n, r, p, salt, digest = stored.split("$")
    if scheme != "scrypt":
        return False
    got = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    return hmac.compare_digest(got, _unb64(digest))


def token_hash(token: str) -> str:
    """Tokens are 256 random bits, so a plain sha256 is as good as a slow hash and can be looked up."""
    return hashlib.sha256(token.encode()).hexdigest()


def _new_token() -> str:
    return "gp_" + secrets.token_urlsafe(32)


def _public(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "name", "role", "disabled", "created_at")}


# --- reviewers -------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ReviewError(f"reviewer name {name!r}: 1-64 characters of A-Z a-z 0-9 . _ @ -, starting alphanumeric")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ReviewError(f"reviewer role {role!r}: must be one of {', '.join(ROLES)}")


def _reviewer_row(conn: Connection, name: str) -> Any:
    return conn.execute(select(_reviewers).where(_reviewers.c.name == name)).mappings().first()


def add_reviewer(store: AuditStore, name: str, role: str = "reviewer", password: str | None = None) -> str:
    """Create a reviewer; returns their API token (shown once: only its hash is stored)."""
    _check_name(name)
    _check_role(role)
    token = _new_token()
    values = {"name": name, "role": role, "token_hash": token_hash(token), "disabled": False}
    values["password_hash"] = hash_password(password) if password else None

    def tx(conn: Connection) -> None:
        if _reviewer_row(conn, name) is not None:
            raise ReviewError(f"reviewer {name!r} already exists")
        rid = conn.execute(insert(_reviewers).values(**values)).inserted_primary_key[0]
        row = conn.execute(select(_reviewers).where(_reviewers.c.id == rid)).mappings().one()
        append_events(conn, [NewEvent(REVIEWER_ADDED, {"reviewer": reviewer_payload(row)}, reviewer_id=rid)])

    try:
        store._write("add_reviewer", tx)
    except IntegrityError:  # a concurrent add of the same name on PostgreSQL
        raise ReviewError(f"reviewer {name!r} already exists") from None
    return token


def update_reviewer(
    store: AuditStore,
    name: str,
    *,
    role: str | None = None,
    disabled: bool | None = None,
    password: str | None = None,
    rotate_token: bool = False,
    end_sessions: bool = False,
) -> str | None:
    """Change a reviewer's role, disabled flag, password or token; returns the new token when rotated.

    A new password, disabling, or ``end_sessions`` signs every review-page session of the reviewer out."""
    if role is not None:
        _check_role(role)
    token = _new_token() if rotate_token else None
    values: dict[str, Any] = {}
    if role is not None:
        values["role"] = role
    if disabled is not None:
        values["disabled"] = bool(disabled)
    if password is not None:
        values["password_hash"] = hash_password(password)
    if token is not None:
        values["token_hash"] = token_hash(token)

    def tx(conn: Connection) -> None:
        before = _reviewer_row(conn, name)
        if before is None:
            raise ReviewError(f"no reviewer named {name!r}")
        if end_sessions or password is not None or disabled:
            end_sessions_of(conn, before["id"])
        if not values:
            return
        conn.execute(update(_reviewers).where(_reviewers.c.id == before["id"]).values(**values))
        after = _reviewer_row(conn, name)
        if reviewer_payload(after) != reviewer_payload(before):  # secrets changing is not an audit event
            event = NewEvent(REVIEWER_UPDATED, {"reviewer": reviewer_payload(after)}, reviewer_id=after["id"])
            append_events(conn, [event])

    store._write("update_reviewer", tx)
    return token


def authenticate(store: AuditStore, name: str, password: str) -> dict[str, Any] | None:
    """The reviewer (id, name, role, disabled, created_at) when the password is theirs and they are enabled."""
    with store.engine.connect() as conn:
        row = _reviewer_row(conn, name) if isinstance(name, str) else None
    ok = check_password(row["password_hash"] if row else None, password)
    return _public(row) if ok and not row["disabled"] else None


def authenticate_token(store: AuditStore, token: str) -> dict[str, Any] | None:
    """The enabled reviewer holding ``token``, else None."""
    if not isinstance(token, str) or not token:
        return None
    with store.engine.connect() as conn:
        row = conn.execute(select(_reviewers).where(_reviewers.c.token_hash == token_hash(token))).mappings().first()
    return _public(row) if row is not None and not row["disabled"] else None


def reviewers(store: AuditStore) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [_public(r) for r in conn.execute(select(_reviewers).order_by(_reviewers.c.name)).mappings()]


# --- reviews ---------------------------------------------------------------------------------------------


def latest_decision_subquery() -> Any:
    """(item_id, seq) of each item's latest approve / reject / escalate event."""
    return (
        select(_events.c.item_id, func.max(_events.c.seq).label("seq"))
        .where(_events.c.kind.in_(DECISION_KINDS))
        .group_by(_events.c.item_id)
        .subquery("latest_decision")
    )


def effective_decision_expr(review_kind: Any, pipeline_decision: Any) -> Any:
    """SQL for the effective decision, from the latest decision event's kind (NULL: none) and the pipeline's."""
    whens = [(review_kind == kind, state) for kind, state in _STATE_OF_KIND.items()]
    return case(*whens, else_=pipeline_decision)


#: The reason codes a reviewer may give, per action (code, what the review page shows): one vocabulary for the page,
#: the HTTP API and ``genpipe audit review``. Approve, reject and escalate need one; "other" needs text saying what.
REASONS: dict[str, tuple[tuple[str, str], ...]] = {
    "approve": (
        ("false_positive", "flag was a false positive"),
        ("within_policy", "within policy"),
        ("acceptable_in_context", "acceptable in context"),
        ("other", "other (say why)"),
    ),
    "reject": (
        ("nsfw_confirmed", "NSFW confirmed"),
        ("off_brand", "off brand"),
        ("prompt_mismatch", "does not match the prompt"),
        ("bias_concern", "bias or stereotyping"),
        ("quality", "artifacts / low quality"),
        ("legal_risk", "legal / trademark risk"),
        ("other", "other (say why)"),
    ),
    "escalate": (
        ("needs_admin", "needs an admin decision"),
        ("legal_risk", "legal / trademark risk"),
        ("brand_risk", "brand risk"),
        ("unsure", "unsure"),
    ),
    "comment": (("note", "note"), ("question", "question")),
}
REASON_CODES = {action: tuple(code for code, _ in reasons) for action, reasons in REASONS.items()}


def _check_review(action: str, reason_code: str | None, text: str | None) -> None:
    if action not in ACTIONS:
        raise ReviewError(f"review action {action!r}: must be one of {', '.join(ACTIONS)}")
    if reason_code is not None and not (isinstance(reason_code, str) and REASON_PATTERN.fullmatch(reason_code)):
        raise ReviewError(f"reason code {reason_code!r}: 1-64 characters of a-z 0-9 _ . -, e.g. false_positive")
    codes = ", ".join(REASON_CODES[action])
    if reason_code is not None and reason_code not in REASON_CODES[action]:
        raise ReviewError(f"reason {reason_code!r} is not a reason to {action}: one of {codes}")
    if action != "comment" and not reason_code:
        raise ReviewError(f"a review {action} needs a reason code: one of {codes}")
    if reason_code == "other" and not (text and text.strip()):
        raise ReviewError("reason 'other' needs text saying why")
    if action == "comment" and not (text and text.strip()):
        raise ReviewError("a review comment needs text")
    if text is not None and (len(text) > MAX_TEXT or "\x00" in text):
        raise ReviewError(f"review text: at most {MAX_TEXT} characters and no NUL characters")


def record_review(
    store: AuditStore,
    item_ids: list[str],
    action: str,
    reviewer: str,
    reason_code: str | None = None,
    text: str | None = None,
    supersedes: int | None = None,
) -> list[int]:
    """Record one review of each item (one transaction); returns the events' seq numbers, in item order.

    ``reviewer`` is the authenticated reviewer's name. ``supersedes`` defaults to the item's latest decision
    event (for approve / reject / escalate); an explicit one must be a review event of the same, single item.
    Approve, reject and escalate need a generated item (one with an image); comments go on any item.
    """
    _check_review(action, reason_code, text)
    ids = list(dict.fromkeys(item_ids))
    if not ids:
        raise ReviewError("no item ids to review")
    if supersedes is not None and len(ids) != 1:
        raise ReviewError("supersedes names one earlier event, so it needs exactly one item id")
    kind = f"review_{action}"

    def tx(conn: Connection) -> list[int]:
        who = _reviewer_row(conn, reviewer)
        if who is None or who["disabled"]:
            raise ReviewError(f"reviewer {reviewer!r} does not exist or is disabled")
        items, latest, admin_only = _items_and_latest_decisions(conn, ids)
        missing = [i for i in ids if i not in items]
        if missing:
            raise ReviewError(f"no item with id {', '.join(map(repr, missing[:5]))}" + (" ..." if missing[5:] else ""))
        events = []
        for item_id in ids:
            item = items[item_id]
            before = latest.get(item_id)
            if action != "comment":
                if item["status"] != "generated":
                    raise ReviewError(f"item {item_id} is {item['status']}, not generated: no image to {action}")
                if who["role"] != "admin" and action in ("approve", "reject"):
                    if item_id in admin_only:
                        raise ReviewError(f"item {item_id} is escalated or decided by an admin: only an admin may "
                                          f"{action} it")  # fmt: skip
                    if action == "approve" and item["decision"] == "block":
                        raise ReviewError(f"item {item_id} was blocked by the policy: only an admin may approve it")
            target = supersedes if supersedes is not None else (before[1] if before and action != "comment" else None)
            if supersedes is not None:
                _check_supersedes(conn, supersedes, item_id)
            payload = {"action": action, "reviewer": who["name"], "role": who["role"], "image_sha256": item["sha"]}
            events.append(
                NewEvent(
                    kind,
                    payload,
                    job=item["job"],
                    item_id=item_id,
                    reviewer_id=who["id"],
                    reason_code=reason_code,
                    text=text,
                    supersedes=target,
                )  # fmt: skip
            )
        return append_events(conn, events)

    return store._write("record_review", tx)


def _items_and_latest_decisions(conn: Connection, ids: list[str]) -> tuple[dict[str, Any], dict[str, tuple], set[str]]:
    """The items; each one's latest decision event (kind, seq); and the ids only an admin may decide now (escalated
    at some point, or decided by an admin: the role recorded in the event, as it was then)."""
    items: dict[str, Any] = {}
    latest: dict[str, tuple[str, int]] = {}
    admin_only: set[str] = set()
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        query = select(_items.c.item_id, _items.c.job, _items.c.status, _items.c.decision,
                       _items.c.image_sha256.label("sha"))  # fmt: skip
        for row in conn.execute(query.where(_items.c.item_id.in_(chunk))).mappings():
            items[row["item_id"]] = row
        decisions = select(_events.c.item_id, _events.c.kind, _events.c.seq, _events.c.payload).where(
            _events.c.kind.in_(DECISION_KINDS), _events.c.item_id.in_(chunk)
        )
        for row in conn.execute(decisions):
            if row.item_id not in latest or row.seq > latest[row.item_id][1]:
                latest[row.item_id] = (row.kind, row.seq)
            if row.kind == "review_escalate" or json.loads(row.payload).get("role") == "admin":
                admin_only.add(row.item_id)
    return items, latest, admin_only


def _check_supersedes(conn: Connection, seq: int, item_id: str) -> None:
    row = conn.execute(select(_events.c.kind, _events.c.item_id).where(_events.c.seq == seq)).first()
    if row is None or row.kind not in REVIEW_KINDS or row.item_id != item_id:
        raise ReviewError(f"supersedes={seq}: not a review event of item {item_id}")


def history(store: AuditStore, item_id: str) -> list[dict[str, Any]]:
    """Every event of an item, oldest first: records written by runs and reviews, with reviewer names."""
    query = (
        select(_events, _reviewers.c.name.label("reviewer"))
        .select_from(_events.outerjoin(_reviewers, _reviewers.c.id == _events.c.reviewer_id))
        .where(_events.c.item_id == item_id)
        .order_by(_events.c.seq)
    )
    with store.engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [{**dict(r), "payload": json.loads(r["payload"])} for r in rows]


def effective_decisions(store: AuditStore, item_ids: list[str]) -> dict[str, str | None]:
    """Each existing item's effective decision (see the module docstring); unknown ids are absent."""
    ids = list(dict.fromkeys(item_ids))
    latest = latest_decision_subquery()
    review = _events.alias("review")
    found: dict[str, str | None] = {}
    with store.engine.connect() as conn:
        for start in range(0, len(ids), _IN_CHUNK):
            query = (
                select(_items.c.item_id, effective_decision_expr(review.c.kind, _items.c.decision))
                .select_from(
                    _items.outerjoin(latest, latest.c.item_id == _items.c.item_id).outerjoin(
                        review, review.c.seq == latest.c.seq
                    )
                )
                .where(_items.c.item_id.in_(ids[start : start + _IN_CHUNK]))
            )
            found.update(dict(conn.execute(query).all()))
    return found
