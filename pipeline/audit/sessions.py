"""Review-page sign-in sessions, kept in the audit DB so that signing out ends a session for good.

The browser's cookie holds a random session key; the ``review_sessions`` table holds its sha256, the reviewer and
when it expires. A request is signed in only while that row exists, so signing out deletes it and a copied
cookie stops working at once, and an admin can end every session of a reviewer (a lost laptop). A password
change or disabling a reviewer ends their sessions too. Operational state, like job leases: not chained.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from sqlalchemy import Connection, delete, insert, literal, select

from pipeline.audit.schema import ReviewerRow, ReviewSessionRow

_sessions = ReviewSessionRow.__table__
_reviewers = ReviewerRow.__table__


def _key_hash(key: str) -> str:
    # 256 random bits: a plain sha256 cannot be reversed, and a stolen DB row is not a usable cookie.
    return hashlib.sha256(key.encode()).hexdigest()


def sign_in_with_password(store: Any, name: str, password: str, ttl_s: float) -> tuple[dict[str, Any], str] | None:
    """Check the password and start a session valid for ``ttl_s`` seconds: (reviewer id/name/role, session key),
    or None for a wrong name or password or a disabled reviewer.

    The session is created only if the password hash is still the one just checked: a password change (or a
    disabling) landing between the check and the insert ends every session, and must not miss this one."""
    from pipeline.audit.reviews import check_password

    with store.engine.connect() as conn:
        row = conn.execute(select(_reviewers).where(_reviewers.c.name == name)).mappings().first()
    stored = row["password_hash"] if row is not None else None
    if not check_password(stored, password) or row["disabled"]:  # check_password hashes even for no one
        return None
    key = start_session(store, row["id"], ttl_s, password_hash=stored)
    return ({k: row[k] for k in ("id", "name", "role")}, key) if key is not None else None


def start_session(store: Any, reviewer_id: int, ttl_s: float, password_hash: str | None = None) -> str | None:
    """A new session for an enabled reviewer, valid for ``ttl_s`` seconds; returns its key (for the cookie only),
    or None when the reviewer is disabled or gone, or their password hash is no longer ``password_hash`` (when
    given). Expired sessions of everyone are deleted on the way, so the table holds live sessions only."""
    key = secrets.token_urlsafe(32)
    now = time.time()
    who = select(literal(_key_hash(key)), _reviewers.c.id, literal(now + ttl_s)).where(
        _reviewers.c.id == reviewer_id, ~_reviewers.c.disabled
    )
    if password_hash is not None:
        who = who.where(_reviewers.c.password_hash == password_hash)

    def tx(conn: Connection) -> int:
        conn.execute(delete(_sessions).where(_sessions.c.expires_at <= now))
        stmt = insert(_sessions).from_select(["id", "reviewer_id", "expires_at"], who).returning(_sessions.c.id)
        return len(conn.execute(stmt).all())  # (rowcount is -1 for INSERT ... SELECT on psycopg)

    return key if store._write("start a review session", tx) == 1 else None


def session_reviewer(store: Any, key: Any) -> dict[str, Any] | None:
    """The enabled reviewer (id, name, role) whose live session has this key, else None."""
    if not isinstance(key, str) or not key:
        return None
    query = (
        select(_reviewers.c.id, _reviewers.c.name, _reviewers.c.role)
        .join(_sessions, _sessions.c.reviewer_id == _reviewers.c.id)
        .where(_sessions.c.id == _key_hash(key), _sessions.c.expires_at > time.time(), ~_reviewers.c.disabled)
    )
    with store.engine.connect() as conn:
        row = conn.execute(query).mappings().first()
    return dict(row) if row is not None else None


def end_session(store: Any, key: Any) -> None:
    """Sign one session out (nothing happens for an unknown or already ended key)."""
    if isinstance(key, str) and key:
        store._write("end a review session", lambda conn: conn.execute(delete(_sessions).where(
            _sessions.c.id == _key_hash(key))))  # fmt: skip


def end_sessions_of(conn: Connection, reviewer_id: int) -> int:
    """Sign every session of a reviewer out, in the caller's transaction; returns how many there were."""
    return conn.execute(delete(_sessions).where(_sessions.c.reviewer_id == reviewer_id)).rowcount
