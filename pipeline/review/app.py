"""The reviewers' web app: ``create_app(db_url)`` returns a FastAPI app serving server-rendered pages.

Routes (all but /login, /healthz and /static need an authenticated reviewer; see ``pipeline.review.auth``):

    GET  /login, POST /login, POST /logout     sign in with name + password; sign out
    GET  /                                     the queue (default: items whose effective decision is review
                                               or escalated), filters, pagination, bulk form
    GET  /items/{item_id}                      image, every parameter, scores, reasons, full history, review forms
    POST /items/{item_id}/review               approve | reject | escalate | comment, a reason code, a comment
    POST /bulk                                 one review of every selected item, in one transaction
    GET  /jobs                                 per job: counts by status and decision, score histograms
    GET  /reviewers                            admins only: the accounts
    GET  /images/{item_id}[/thumb]             the item's image (or a JPEG thumbnail), found by id in the DB
    GET  /api/queue, /api/items/{item_id}      the same as JSON, for scripts with a bearer token
    GET  /healthz                              liveness (and the DB answers)

Unauthenticated page requests are redirected to /login; API, image and POST requests get 401. Every POST
from a browser session needs the session's CSRF token (403 otherwise). The reviewer recorded on a review is
always the authenticated one.
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jinja2
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from pipeline.audit.chain import json_default
from pipeline.audit.reviews import ACTIONS, MAX_TEXT, REASON_CODES, REASONS, ReviewError
from pipeline.audit.store import AuditStore
from pipeline.review.auth import (
    CSRF_FIELD,
    Reviewer,
    SignInThrottle,
    csrf_ok,
    csrf_token,
    current_reviewer,
    sign_in,
    sign_out,
)
from pipeline.review.views import (
    DECISION_CHOICES,
    ITEM_ID,
    PAGE_SIZES,
    SCORE_COLUMNS,
    SORTS,
    ImageUnavailable,
    QueueParams,
    ThumbnailCache,
    item_view,
    job_names,
    job_overviews,
    queue_page,
    read_image,
)

SECRET_ENV = "GENPIPE_REVIEW_SECRET"
COOKIE = "genpipe_review"
DEFAULT_SESSION_TTL = 8 * 3600
BULK_MAX = 500
HERE = Path(__file__).parent


CSP = (
    "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


class SignInRequired(Exception):
    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def _score_text(value: Any) -> str:
    """A score as the page shows it: flags as yes/no, counts and ranks as whole numbers, probabilities to 3 places."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}" if isinstance(value, float) else "–"


class BadReview(Exception):
    """A review the form asked for that is not allowed; the message is shown to the reviewer."""


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters["score"] = _score_text
    env.filters["when"] = lambda v: v.strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(v, datetime) else (v or "")
    env.filters["pretty"] = lambda v: json.dumps(v, indent=1, ensure_ascii=False, sort_keys=True, default=json_default)
    return env


def _safe_next(value: Any) -> str:
    """A local path to return to after sign-in; anything else (other hosts, //evil, odd characters) is '/'."""
    ok = (
        isinstance(value, str)
        and value.startswith("/")
        and not value.startswith("//")
        and len(value) < 2000
        and all(c.isprintable() and c not in "\\ " for c in value)
    )
    return value if ok else "/"


def _form_text(form: Any, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def create_app(
    db_url: str,
    *,
    secret_key: str | None = None,
    session_ttl: int = DEFAULT_SESSION_TTL,
    https_only: bool = False,
) -> FastAPI:
    """The review app on the audit DB at ``db_url`` (which must already be at the current schema).

    ``secret_key`` signs session cookies: default ``$GENPIPE_REVIEW_SECRET``, else a random one (sessions then
    end when the process does). ``https_only`` marks the cookie Secure (set it behind TLS).
    """
    store = AuditStore(db_url, migrate=False)
    secret = secret_key or os.environ.get(SECRET_ENV) or secrets.token_urlsafe(32)
    templates = Jinja2Templates(env=_environment())
    thumbnails = ThumbnailCache()
    throttle = SignInThrottle()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        store.dispose()

    app = FastAPI(title="genpipe review", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret,
        session_cookie=COOKIE,
        max_age=session_ttl,
        same_site="lax",
        https_only=https_only,
    )
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("cache-control", "no-store")
        return response

    # --- who is asking ---------------------------------------------------------------------------------------

    def reviewer_or_none(request: Request) -> Reviewer | None:
        return current_reviewer(request, store)

    def page_reviewer(request: Request) -> Reviewer:
        me = reviewer_or_none(request)
        if me is None:
            query = f"?{request.url.query}" if request.url.query else ""
            raise SignInRequired(request.url.path + query)
        return me

    def api_reviewer(request: Request) -> Reviewer:
        me = reviewer_or_none(request)
        if me is None:
            raise HTTPException(401, "sign in, or send Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"})
        return me

    async def form_reviewer(request: Request) -> Reviewer:
        """The reviewer behind a POST; a browser session must also send its CSRF token."""
        me = await run_in_threadpool(reviewer_or_none, request)
        if me is None:
            raise HTTPException(401, "sign in first", {"WWW-Authenticate": "Bearer"})
        if me.via == "session" and not csrf_ok(request, (await request.form()).get(CSRF_FIELD)):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        return me

    def render(request: Request, template: str, me: Reviewer | None, status: int = 200, /, **context: Any) -> Response:
        flashes = request.session.pop("flash", []) if "flash" in request.session else []
        context = {"me": me, "csrf": csrf_token(request), "flashes": flashes, "reasons": REASONS, **context}
        return templates.TemplateResponse(request, template, context, status_code=status)

    def flash(request: Request, kind: str, message: str) -> None:
        # The cookie holds at most 4 KB: keep the last few short messages only.
        request.session["flash"] = [*request.session.get("flash", [])[-2:], [kind, message[:400]]]

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, exc: SignInRequired) -> Response:
        return RedirectResponse("/login?" + urlencode({"next": exc.next_path}), status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        api = request.url.path.startswith(("/api/", "/images/")) or "text/html" not in request.headers.get("accept", "")
        if api:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        me = getattr(request.state, "reviewer", None)
        response = render(request, "error.html", me, exc.status_code, message=exc.detail)
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    # --- sign-in ----------------------------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        with store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"status": "ok"}

    @app.get("/login")
    def login_form(request: Request, next: str = "/") -> Response:
        me = reviewer_or_none(request)
        if me is not None and me.via == "session":
            return RedirectResponse(_safe_next(next), status_code=303)
        return render(request, "login.html", None, next=_safe_next(next), error=None, name="")

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        name, password, next_path = _form_text(form, "name"), _form_text(form, "password"), form.get("next")
        if not csrf_ok(request, form.get(CSRF_FIELD)):
            error = "Your sign-in form expired; please try again."
            return render(request, "login.html", None, 403, next=_safe_next(next_path), error=error, name=name)
        client = request.client.host if request.client else "unknown"
        if throttle.blocked(client, name):
            error = "Too many failed sign-ins; wait a few minutes."
            return render(request, "login.html", None, 429, next=_safe_next(next_path), error=error, name=name)
        ok = False
        if name and password and len(name) <= 64 and len(password) <= 1024:
            ok = await run_in_threadpool(sign_in, request, store, name, password, session_ttl)
        if not ok:
            throttle.failed(client, name)
            error = "Wrong name or password."
            return render(request, "login.html", None, 401, next=_safe_next(next_path), error=error, name=name)
        return RedirectResponse(_safe_next(next_path), status_code=303)

    @app.post("/logout")
    def logout(request: Request, me: Reviewer = Depends(form_reviewer)) -> Response:
        sign_out(request, store)
        return RedirectResponse("/login", status_code=303)

    # --- the queue and items ----------------------------------------------------------------------------------

    @app.get("/")
    def queue(request: Request, me: Reviewer = Depends(page_reviewer)) -> Response:
        params = QueueParams.parse(request.query_params)
        page = queue_page(store, params)
        return render(
            request,
            "queue.html",
            me,
            400 if params.errors else 200,
            p=params,
            page=page,
            jobs=job_names(store),
            decisions=DECISION_CHOICES,
            sorts=tuple(SORTS),
            page_sizes=PAGE_SIZES,
            score_columns=SCORE_COLUMNS,
            actions=ACTIONS,
        )

    @app.get("/items/{item_id}")
    def item_page(request: Request, item_id: str, me: Reviewer = Depends(page_reviewer)) -> Response:
        view = item_view(store, item_id)
        if view is None:
            raise HTTPException(404, "no item with this id")
        return render(request, "item.html", me, view=view, item=view.item, score_columns=SCORE_COLUMNS)

    def record(me: Reviewer, item_ids: list[str], form: Any) -> list[int]:
        action = _form_text(form, "action")
        reason = _form_text(form, "reason_code") or None
        comment = _form_text(form, "comment").strip() or None
        if action not in ACTIONS:
            raise BadReview(f"action {action!r}: must be one of {', '.join(ACTIONS)}")
        if reason is not None and reason not in REASON_CODES[action]:
            raise BadReview(f"reason {reason!r} is not a reason to {action}: one of {', '.join(REASON_CODES[action])}")
        if action != "comment" and reason is None:
            raise BadReview(f"choose a reason to {action}")
        if reason == "other" and comment is None:
            raise BadReview("reason 'other' needs a comment saying why")
        if comment is not None and len(comment) > MAX_TEXT:
            raise BadReview(f"the comment is longer than {MAX_TEXT} characters")
        bad = [i for i in item_ids if not ITEM_ID.fullmatch(i)]
        if bad:
            raise BadReview(f"not an item id: {bad[0][:80]!r}")
        if not item_ids:
            raise BadReview("select at least one item")
        if len(item_ids) > BULK_MAX:
            raise BadReview(f"at most {BULK_MAX} items at once")
        # The reviewer is the authenticated one; a "reviewer" field in the form is never read.
        try:
            return store.record_review(item_ids, action, me.name, reason, comment)
        except ReviewError as exc:
            raise BadReview(str(exc)) from None

    async def submit(request: Request, me: Reviewer, item_ids: list[str], redirect_to: str) -> Response:
        form = await request.form()
        try:
            seqs = await run_in_threadpool(record, me, item_ids, form)
        except BadReview as exc:
            if me.via == "token":
                return JSONResponse({"detail": str(exc)}, status_code=400)
            flash(request, "error", f"Not recorded: {exc}")
            return RedirectResponse(redirect_to, status_code=303)
        action = _form_text(form, "action")
        if me.via == "token":
            return JSONResponse({"reviewer": me.name, "action": action, "items": item_ids, "events": seqs})
        flash(request, "ok", f"{action} recorded for {len(seqs)} item(s) by {me.name}")
        return RedirectResponse(redirect_to, status_code=303)

    @app.post("/items/{item_id}/review")
    async def review(request: Request, item_id: str, me: Reviewer = Depends(form_reviewer)) -> Response:
        if not ITEM_ID.fullmatch(item_id):
            raise HTTPException(404, "no item with this id")
        return await submit(request, me, [item_id], f"/items/{item_id}")

    @app.post("/bulk")
    async def bulk(request: Request, me: Reviewer = Depends(form_reviewer)) -> Response:
        form = await request.form()
        item_ids = list(dict.fromkeys(v for v in form.getlist("item_id") if isinstance(v, str)))
        back = [(k, v) for k, v in parse_qsl(_form_text(form, "back")) if k in QueueParams.FIELDS]
        return await submit(request, me, item_ids, "/?" + urlencode(back) if back else "/")

    @app.get("/jobs")
    def jobs(request: Request, job: str | None = None, me: Reviewer = Depends(page_reviewer)) -> Response:
        return render(request, "jobs.html", me, overviews=job_overviews(store, job or None), job=job or "")

    @app.get("/reviewers")
    def reviewers(request: Request, me: Reviewer = Depends(page_reviewer)) -> Response:
        if not me.is_admin:
            raise HTTPException(403, "only admins may see the reviewer accounts")
        return render(request, "reviewers.html", me, accounts=store.reviewers())

    # --- images and JSON --------------------------------------------------------------------------------------

    def image(item_id: str, thumb: bool) -> Response:
        try:
            data, content_type, item = read_image(store, item_id)
        except ImageUnavailable as exc:
            raise HTTPException(exc.status, str(exc)) from None
        if thumb:
            data, content_type = thumbnails.get(item, data), "image/jpeg"
        return Response(data, media_type=content_type, headers={"cache-control": "private, no-store"})

    @app.get("/images/{item_id}")
    def image_full(item_id: str, me: Reviewer = Depends(api_reviewer)) -> Response:
        return image(item_id, thumb=False)

    @app.get("/images/{item_id}/thumb")
    def image_thumb(item_id: str, me: Reviewer = Depends(api_reviewer)) -> Response:
        return image(item_id, thumb=True)

    @app.get("/api/queue")
    def api_queue(request: Request, me: Reviewer = Depends(api_reviewer)) -> Response:
        params = QueueParams.parse(request.query_params)
        if params.errors:
            return JSONResponse({"detail": params.errors}, status_code=400)
        page = queue_page(store, params)
        body = {"total": page.total, "page": params.page, "pages": page.pages, "records": page.records}
        return Response(json.dumps(body, default=_json_value, ensure_ascii=False), media_type="application/json")

    @app.get("/api/items/{item_id}")
    def api_item(item_id: str, me: Reviewer = Depends(api_reviewer)) -> Response:
        view = item_view(store, item_id)
        if view is None:
            raise HTTPException(404, "no item with this id")
        body = {"record": view.item.as_dict(), "effective_decision": view.effective, "history": view.history}
        return Response(json.dumps(body, default=_json_value, ensure_ascii=False), media_type="application/json")

    return app


def _json_value(obj: Any) -> Any:
    return obj.isoformat() if isinstance(obj, datetime) else json_default(obj)
