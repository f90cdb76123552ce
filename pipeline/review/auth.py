"""Who is asking: a reviewer signed in with a session cookie, or one holding an API token; and CSRF tokens.

A browser signs in with name + password and gets a signed session cookie (starlette's SessionMiddleware:
itsdangerous-signed, HttpOnly, SameSite=Lax) holding a random session key and a CSRF token; the audit DB holds
the key's hash, its reviewer and its expiry (``pipeline.audit.sessions``), so signing out, a password change,
disabling the reviewer or an admin's ``genpipe audit update-reviewer NAME --sign-out`` ends the session on the
server, and a copied cookie stops working with it. Scripts send ``Authorization: Bearer <token>`` instead.
Either way the reviewer is looked up in the audit DB on every request, so disabling an account or changing a
role takes effect at once, and the name a review is recorded under is always this one, never anything a form
or a URL says.

Every state-changing form carries the session's CSRF token (hidden field ``csrf_token``); a POST whose token
is missing or differs is refused with 403. Bearer requests need none: browsers never attach that header by
themselves, so a forged cross-site request cannot carry it.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from pipeline.audit.sessions import end_session, session_reviewer, sign_in_with_password

CSRF_FIELD = "csrf_token"
SESSION_KEY = "sid"


@dataclass(frozen=True)
class Reviewer:
    id: int
    name: str
    role: str  # reviewer | admin
    via: str  # session | token

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header ("" when empty); None without such a header (other
    schemes, e.g. an auth proxy's Basic, are not ours and leave the session in charge)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def current_reviewer(request: Request, store: Any) -> Reviewer | None:
    """The authenticated reviewer of this request (cached on it), or None.

    A request with an ``Authorization: Bearer`` header is judged by that token alone (a bad token is not
    rescued by a cookie). A session that expired, was signed out, or whose reviewer was disabled or removed is
    cleared from the cookie as well.
    """
    if hasattr(request.state, "reviewer"):
        return request.state.reviewer
    who: Reviewer | None = None
    token = bearer_token(request)
    if token is not None:
        row = store.authenticate_token(token) if token else None
        if row is not None:
            who = Reviewer(row["id"], row["name"], row["role"], via="token")
    elif SESSION_KEY in request.session:
        row = session_reviewer(store, request.session[SESSION_KEY])
        if row is not None:
            who = Reviewer(row["id"], row["name"], row["role"], via="session")
        else:
            request.session.clear()  # ended, expired or disabled: the browser must sign in again
    request.state.reviewer = who
    return who


def sign_in(request: Request, store: Any, name: str, password: str, ttl_s: float) -> bool:
    """Check the password and start a fresh session (a new CSRF token too: nothing from before sign-in carries
    over); False for a wrong name or password."""
    signed_in = sign_in_with_password(store, name, password, ttl_s)
    if signed_in is None:
        return False
    request.session.clear()
    request.session[SESSION_KEY] = signed_in[1]
    new_csrf_token(request)
    return True


def sign_out(request: Request, store: Any) -> None:
    end_session(store, request.session.get(SESSION_KEY))
    request.session.clear()


def new_csrf_token(request: Request) -> str:
    request.session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return request.session[CSRF_FIELD]


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use (the sign-in form gets one before anyone signs in)."""
    token = request.session.get(CSRF_FIELD)
    return token if isinstance(token, str) and token else new_csrf_token(request)


def csrf_ok(request: Request, submitted: Any) -> bool:
    expected = request.session.get(CSRF_FIELD)
    if not isinstance(expected, str) or not expected or not isinstance(submitted, str):
        return False
    return hmac.compare_digest(expected.encode(), submitted.encode())


class SignInThrottle:
    """Failed sign-ins, counted per account and client address (``limit`` per ``window`` seconds: guessing one
    reviewer's password) and per address alone (``client_limit``: spraying many accounts). Everyone behind one
    proxy shares an address, so a few users' typos must not lock the others out: the address alone is only
    refused at ten times the per-account limit. In memory, per process."""

    def __init__(self, limit: int = 20, window: float = 300.0, client_limit: int | None = None) -> None:
        self.limit, self.window = limit, window
        self.client_limit = client_limit if client_limit is not None else 10 * limit
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(key, deque())
        while failures and now - failures[0] > self.window:
            failures.popleft()
        return failures

    @staticmethod
    def _keys(client: str, name: str) -> tuple[str, str]:
        return f"{client}\x00{name.strip().casefold()}", client

    def blocked(self, client: str, name: str = "") -> bool:
        account, address = self._keys(client, name)
        with self._lock:
            now = time.monotonic()
            return (len(self._recent(account, now)) >= self.limit
                    or len(self._recent(address, now)) >= self.client_limit)  # fmt: skip

    def failed(self, client: str, name: str = "") -> None:
        with self._lock:
            now = time.monotonic()
            for key in self._keys(client, name):
                self._recent(key, now).append(now)
            if len(self._failures) > 10_000:  # bounded memory under a spray of addresses
                self._failures = {k: v for k, v in self._failures.items() if v and now - v[-1] <= self.window}
