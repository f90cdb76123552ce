"""The review app over HTTP (FastAPI TestClient): sign-in, CSRF, who is recorded, bulk reviews, SQL
metacharacters as data, images by item id only, history, job overview, the CLI commands."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from sqlalchemy import func, select

from pipeline.audit import AuditStore
from pipeline.audit.reviews import ReviewError
from pipeline.audit.schema import EventRow, ItemRow, ReviewSessionRow
from pipeline.review import create_app
from pipeline.storage import Storage
from schemas.record import Item

pytestmark = pytest.mark.timeout(120)

INJECTION = "'; DROP TABLE items; --"
SCRIPT = "<script>alert('x')</script>"
PASSWORDS = {"alice": "alice-secret-pw", "root": "root-secret-pw"}
PREFIX = {"pass": "images", "review": "review", "block": "quarantine"}

# label: (job, campaign, pipeline decision or None for a rejected row, prompt, scores, reasons)
ITEMS = {
    "sneaker": ("spring-shoes", "spring", "review", "white sneaker on a marble floor, soft light",
                {"nsfw": 0.55, "clipscore": 0.27, "clip_cosine": 0.25}, [("nsfw_borderline", "nsfw 0.55 >= 0.5")]),
    "runner": ("spring-shoes", "spring", "review", "red running shoe, studio light",
               {"nsfw": 0.62, "clipscore": 0.24, "clip_cosine": 0.22}, [("nsfw_borderline", "nsfw 0.62 >= 0.5")]),
    "boot": ("spring-shoes", "spring", "review", "leather boot in autumn leaves",
             {"nsfw": 0.08, "clipscore": 0.11, "clip_cosine": 0.10}, [("low_alignment", "clipscore 0.11 < 0.15")]),
    "sandal": ("spring-shoes", "spring", "review", "sandals on a beach towel",
               {"nsfw": 0.51, "clipscore": 0.29, "clip_cosine": 0.27}, [("nsfw_borderline", "nsfw 0.51 >= 0.5")]),
    "tote": ("spring-shoes", "spring", "pass", "canvas tote bag", {"nsfw": 0.04, "clipscore": 0.31}, []),
    "swim": ("spring-shoes", "spring", "block", "swimwear on a beach", {"nsfw": 0.97, "clipscore": 0.3},
             [("nsfw", "nsfw 0.97 >= 0.9")]),
    "badrow": ("spring-shoes", None, None, INJECTION, {}, [("empty_prompt", "row rejected")]),
    "hat": ("summer-hats", "summer", "review", "straw hat, 100% natural_fibre",
            {"nsfw": 0.30, "clipscore": 0.09, "clip_cosine": 0.08}, [("low_alignment", "clipscore 0.09 < 0.15")]),
    "gift": ("summer-hats", "summer", "review", f"gift card {INJECTION} {SCRIPT}",
             {"nsfw": 0.58, "clipscore": 0.2, "bias_person_present": False, "clip_rank": 1},
             [("nsfw_borderline", SCRIPT)]),
}  # fmt: skip
COLORS = [(231, 111, 81), (42, 157, 143), (233, 196, 106), (38, 70, 83), (244, 162, 97), (120, 90, 200), (90, 90, 90)]


@dataclass
class Dataset:
    url: str
    ids: dict[str, str]
    files: dict[str, Path]
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> dict[str, str]:
        return {v: k for k, v in self.ids.items()}


def png(n: int, size: int = 128) -> bytes:
    """A small but real PNG: a colour field with a shape, different per item."""
    im = Image.new("RGB", (size, size), COLORS[n % len(COLORS)])
    draw = ImageDraw.Draw(im)
    n %= 8
    draw.ellipse((20 + 4 * n, 24, 100, 104 - 3 * n), fill=(250, 250, 245))
    draw.rectangle((8, 8, 40 + 6 * n, 20), fill=(30, 30, 30))
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def populate(url: str, output: Path) -> Dataset:
    """Items with decisions review / pass / block (real PNGs under the job's prefixes), a rejected row, two
    reviewers (alice: reviewer, root: admin) and one item escalated by root."""
    store = AuditStore(url)
    data = Dataset(url, {}, {})
    items = []
    for n, (label, (job, campaign, decision, prompt, scores, reasons)) in enumerate(ITEMS.items()):
        item_id = hashlib.sha256(f"{job}:{label}".encode()).hexdigest()[:32]
        item = Item(item_id=item_id, job=job, prompt_id=label, sample_index=0, row_number=n, prompt=prompt,
                    seed=n, seed_source="derived", model="tiny-sd", sampler="euler", steps=4, guidance_scale=7.5,
                    width=128, height=128, campaign=campaign, tags=["catalog"], metadata={"sku_color": "red"},
                    status="generated" if decision else "rejected", decision=decision, scores=scores,
                    reasons=[{"code": c, "message": m} for c, m in reasons])  # fmt: skip
        if decision:
            image = png(n)
            key = f"{PREFIX[decision]}/{label}/{label}-0000-{item_id[:8]}.png"
            item.image_uri = Storage(str(output / job)).write_atomic(key, image)
            item.image_sha256 = hashlib.sha256(image).hexdigest()
            data.files[label] = Path(item.image_uri)
        items.append(item)
        data.ids[label] = item_id
    store.write_items(items, None)
    for name, role in (("alice", "reviewer"), ("root", "admin")):
        data.tokens[name] = store.add_reviewer(name, role, PASSWORDS[name])
    store.record_review([data.ids["gift"]], "escalate", "root", "needs_admin", "check the brand guide")
    store.dispose()
    return data


# --- helpers ---------------------------------------------------------------------------------------------------

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
HTML = {"accept": "text/html"}


def csrf_of(client: TestClient, path: str = "/") -> str:
    r = client.get(path, headers=HTML)
    assert r.status_code == 200, r.text[:300]
    return CSRF_RE.search(r.text).group(1)


def sign_in(client: TestClient, name: str = "alice") -> None:
    token = csrf_of(client, "/login")
    r = client.post(
        "/login", data={"name": name, "password": PASSWORDS[name], "csrf_token": token}, follow_redirects=False
    )
    assert r.status_code == 303, r.text[:300]


def reviews(store: AuditStore, item_id: str) -> list[tuple[str, str | None, str | None, str | None]]:
    """(kind, reviewer, reason_code, text) of every review event of an item."""
    return [(e["kind"], e["reviewer"], e["reason_code"], e["text"]) for e in store.history(item_id)
            if e["kind"].startswith("review_")]  # fmt: skip


def counts(store: AuditStore) -> tuple[int, int]:
    with store.engine.connect() as conn:
        return (conn.execute(select(func.count()).select_from(ItemRow)).scalar_one(),
                conn.execute(select(func.count()).select_from(EventRow)).scalar_one())  # fmt: skip


@dataclass
class Env:
    client: TestClient
    data: Dataset
    store: AuditStore

    def id(self, label: str) -> str:
        return self.data.ids[label]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, Dataset]:
    root = tmp_path_factory.mktemp("review")
    data = populate(f"sqlite:///{root}/audit.db", root / "out")
    return root / "audit.db", data


@pytest.fixture
def env(template, tmp_path) -> Env:
    """A fresh copy of the populated SQLite DB (images shared, read-only) and a client on the app over it."""
    db, data = template
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{db}{suffix}").exists():
            shutil.copy(f"{db}{suffix}", f"{tmp_path}/audit.db{suffix}")
    url = f"sqlite:///{tmp_path}/audit.db"
    app = create_app(url, secret_key="test-secret-key-0123456789abcdef")
    with TestClient(app) as client:
        yield Env(client, Dataset(url, data.ids, data.files, data.tokens), app.state.store)


# --- authentication -------------------------------------------------------------------------------------------


def test_requests_without_a_session_are_refused(env: Env) -> None:
    c, item = env.client, env.id("sneaker")
    for path in ("/", "/jobs", f"/items/{item}", "/reviewers", "/?job=spring-shoes"):
        r = c.get(path, headers=HTML, follow_redirects=False)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/login?next=%2F"), r.headers["location"]
    for path in (f"/images/{item}", f"/images/{item}/thumb", f"/images/{env.id('swim')}", "/api/queue"):
        r = c.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
    before = counts(env.store)
    r = c.post(f"/items/{item}/review", data={"action": "approve", "reason_code": "false_positive"})
    assert r.status_code == 401
    r = c.post("/bulk", data={"item_id": [item], "action": "reject", "reason_code": "off_brand"})
    assert r.status_code == 401
    assert counts(env.store) == before
    assert c.get("/healthz").json() == {"status": "ok"}


def test_sign_in_and_out(env: Env) -> None:
    c = env.client
    token = csrf_of(c, "/login")
    r = c.post("/login", data={"name": "alice", "password": "wrong", "csrf_token": token}, headers=HTML)
    assert r.status_code == 401 and "Wrong name or password" in r.text
    r = c.post("/login", data={"name": "' OR '1'='1", "password": "' OR '1'='1", "csrf_token": token}, headers=HTML)
    assert r.status_code == 401
    assert "&#39; OR &#39;1&#39;=&#39;1" in r.text  # the name is shown back as text
    assert c.get("/", follow_redirects=False).status_code == 303
    r = c.post("/login", data={"name": "alice", "password": PASSWORDS["alice"]}, headers=HTML)  # no CSRF token
    assert r.status_code == 403
    token = csrf_of(c, "/login?next=/jobs")
    r = c.post("/login", data={"name": "alice", "password": PASSWORDS["alice"], "csrf_token": token, "next": "/jobs"},
               follow_redirects=False)  # fmt: skip
    assert r.status_code == 303 and r.headers["location"] == "/jobs"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie
    page = c.get("/", headers=HTML)
    assert page.status_code == 200 and '<b id="whoami">alice</b>' in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    copied = c.cookies.get("genpipe_review")
    r = c.post("/logout", data={"csrf_token": CSRF_RE.search(page.text).group(1)}, follow_redirects=False)
    assert r.status_code == 303
    assert c.get("/", follow_redirects=False).status_code == 303
    # Signing out ends the session on the server: a copy of the cookie taken before is refused too.
    replay = TestClient(c.app).get("/", headers={"cookie": f"genpipe_review={copied}"}, follow_redirects=False)
    assert replay.status_code == 303


def test_open_redirects_and_tampered_cookies_are_refused(env: Env) -> None:
    c = env.client
    for evil in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        token = csrf_of(c, "/login")
        r = c.post("/login", data={"name": "alice", "password": PASSWORDS["alice"], "csrf_token": token,
                                   "next": evil}, follow_redirects=False)  # fmt: skip
        assert r.headers["location"] == "/", evil
    session = c.cookies.get("genpipe_review")
    fresh = TestClient(c.app)
    assert fresh.get("/", headers={"cookie": f"genpipe_review={session}"}, follow_redirects=False).status_code == 200
    payload, dot, signed = session.partition(".")
    forged = payload.replace(payload[5], "B" if payload[5] != "B" else "C", 1) + dot + signed
    assert fresh.get("/", headers={"cookie": f"genpipe_review={forged}"}, follow_redirects=False).status_code == 303


def test_a_disabled_reviewer_loses_the_session_at_once(env: Env) -> None:
    sign_in(env.client)
    assert env.client.get("/", follow_redirects=False).status_code == 200
    env.store.update_reviewer("alice", disabled=True)
    assert env.client.get("/", follow_redirects=False).status_code == 303


def test_sessions_expire(template, tmp_path) -> None:
    db, data = template
    shutil.copy(db, tmp_path / "audit.db")
    app = create_app(f"sqlite:///{tmp_path}/audit.db", secret_key="k" * 32, session_ttl=1)
    with TestClient(app) as client:
        sign_in(client)
        cookie = {"cookie": f"genpipe_review={client.cookies.get('genpipe_review')}"}
        assert client.get("/", follow_redirects=False).status_code == 200
        time.sleep(1.5)
        # Replayed by hand: the browser would drop it (Max-Age), but the server must refuse it anyway.
        assert TestClient(app).get("/", headers=cookie, follow_redirects=False).status_code == 303


# --- CSRF and who is recorded ---------------------------------------------------------------------------------


def test_every_post_needs_the_session_csrf_token(env: Env) -> None:
    c, item = env.client, env.id("sneaker")
    other = TestClient(c.app)
    sign_in(other, "root")
    foreign = csrf_of(other, "/")  # a valid token, of another session
    sign_in(c)
    before = counts(env.store)
    form = {"action": "approve", "reason_code": "false_positive"}
    for token in (None, "", "not-the-token", foreign):
        extra = {} if token is None else {"csrf_token": token}
        assert c.post(f"/items/{item}/review", data={**form, **extra}).status_code == 403
        assert c.post("/bulk", data={"item_id": [item], **form, **extra}).status_code == 403
        assert c.post("/logout", data=extra).status_code == 403
    assert counts(env.store) == before
    assert c.get("/", follow_redirects=False).status_code == 200  # still signed in: logout was refused
    token = csrf_of(c)
    r = c.post(f"/items/{item}/review", data={**form, "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/items/{item}"
    assert reviews(env.store, item) == [("review_approve", "alice", "false_positive", None)]


def test_the_recorded_reviewer_is_the_signed_in_one(env: Env) -> None:
    c, item = env.client, env.id("runner")
    sign_in(c)
    token = csrf_of(c)
    form = {"action": "reject", "reason_code": "off_brand", "comment": "not our style", "csrf_token": token,
            "reviewer": "root", "reviewer_id": "2", "role": "admin"}  # fmt: skip
    assert c.post(f"/items/{item}/review?reviewer=root", data=form).status_code == 200
    form = {"action": "comment", "comment": "second look", "csrf_token": token, "reviewer": "root"}
    assert c.post("/bulk", data={**form, "item_id": [item]}).status_code == 200
    assert reviews(env.store, item) == [
        ("review_reject", "alice", "off_brand", "not our style"),
        ("review_comment", "alice", None, "second look"),
    ]
    payloads = [e["payload"] for e in env.store.history(item) if e["kind"].startswith("review_")]
    assert {(p["reviewer"], p["role"]) for p in payloads} == {("alice", "reviewer")}


def test_bearer_tokens_for_scripts(env: Env) -> None:
    c, item = env.client, env.id("boot")
    auth = {"authorization": f"Bearer {env.data.tokens['root']}"}
    r = c.get("/api/queue", params={"job": "spring-shoes"}, headers=auth)
    assert r.status_code == 200
    assert {env.data.label[x["item_id"]] for x in r.json()["records"]} == {"sneaker", "runner", "boot", "sandal"}
    r = c.post(f"/items/{item}/review", data={"action": "approve", "reason_code": "within_policy"}, headers=auth)
    assert r.status_code == 200 and r.json()["reviewer"] == "root"
    assert c.get(f"/api/items/{item}", headers=auth).json()["effective_decision"] == "approved"
    bad = {"authorization": "Bearer gp_not-a-token"}
    assert c.get("/api/queue", headers=bad).status_code == 401
    sign_in(c)  # a bad bearer header is not rescued by a good session cookie
    assert c.get("/api/queue", headers=bad).status_code == 401
    assert c.get("/api/queue", headers={"authorization": "Bearer "}).status_code == 401
    # Another scheme (an auth proxy's Basic) is not ours: the session decides.
    assert c.get("/api/queue", headers={"authorization": "Basic YWxpY2U6eA=="}).status_code == 200


# --- reviews --------------------------------------------------------------------------------------------------


def test_bulk_reject_two_and_the_queue_moves_on(env: Env) -> None:
    c = env.client
    sign_in(c)
    page = c.get("/", params={"job": "spring-shoes"}, headers=HTML)
    assert page.text.count('name="item_id"') == 4  # the review items of the job, not pass / block / rejected
    two = [env.id("sneaker"), env.id("sandal")]
    form = {"item_id": two, "action": "reject", "reason_code": "nsfw_confirmed", "comment": "too revealing",
            "csrf_token": CSRF_RE.search(page.text).group(1), "back": "job=spring-shoes&evil=1"}  # fmt: skip
    r = c.post("/bulk", data=form, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/?job=spring-shoes"
    page = c.get(r.headers["location"], headers=HTML)
    assert "reject recorded for 2 item(s) by alice" in page.text
    assert page.text.count('name="item_id"') == 2
    assert env.store.effective_decisions(two) == dict.fromkeys(two, "rejected")
    for item in two:
        assert reviews(env.store, item) == [("review_reject", "alice", "nsfw_confirmed", "too revealing")]
    rejected = c.get("/", params={"decision": "rejected"}, headers=HTML).text
    assert all(f'value="{i}"' in rejected for i in two)


def test_review_rules(env: Env) -> None:
    c = env.client
    sign_in(c)
    token = csrf_of(c)
    item, gift = env.id("hat"), env.id("gift")
    cases = [
        ({"action": "reject"}, "choose a reason to reject"),
        ({"action": "reject", "reason_code": "false_positive"}, "is not a reason to reject"),
        ({"action": "approve", "reason_code": "other"}, "needs a comment"),
        ({"action": "comment"}, "needs text"),
        ({"action": "delete", "reason_code": "x"}, "must be one of"),
    ]
    for form, message in cases:
        r = c.post(f"/items/{item}/review", data={**form, "csrf_token": token}, headers=HTML)
        assert r.status_code == 200 and message in r.text, (form, r.text[:200])
    r = c.post(f"/items/{gift}/review", data={"action": "approve", "reason_code": "false_positive",
                                               "csrf_token": token}, headers=HTML)  # fmt: skip
    assert "only an admin may approve" in r.text
    rejected_row = env.id("badrow")
    r = c.post(f"/items/{rejected_row}/review", data={"action": "approve", "reason_code": "within_policy",
                                                      "csrf_token": token}, headers=HTML)  # fmt: skip
    assert "no image to approve" in r.text
    assert reviews(env.store, item) == [] and reviews(env.store, rejected_row) == []
    admin = TestClient(c.app)
    sign_in(admin, "root")
    r = admin.post(f"/items/{gift}/review", data={"action": "approve", "reason_code": "false_positive",
                                                   "csrf_token": csrf_of(admin)}, headers=HTML)  # fmt: skip
    assert "approve recorded for 1 item(s) by root" in r.text
    assert env.store.effective_decision(gift) == "approved"


def test_admins_have_the_last_word(env: Env) -> None:
    """A reviewer may neither approve an image the policy blocked nor overturn an admin's ruling; an admin may."""
    store, swim, gift, hat = env.store, env.id("swim"), env.id("gift"), env.id("hat")
    with pytest.raises(ReviewError, match="blocked by the policy: only an admin may approve"):
        store.record_review([swim], "approve", "alice", "false_positive")
    with pytest.raises(ReviewError, match="blocked by the policy"):  # not through a bulk action either
        store.record_review([hat, swim], "approve", "alice", "false_positive")
    assert reviews(store, hat) == []  # all or nothing
    store.record_review([swim], "reject", "alice", "nsfw_confirmed")  # stricter than the policy: fine
    store.record_review([gift], "reject", "root", "legal_risk")  # the admin rules on the escalated item
    with pytest.raises(ReviewError, match="escalated or decided by an admin"):
        store.record_review([gift], "approve", "alice", "false_positive")
    assert store.effective_decision(gift) == "rejected"
    store.record_review([hat], "approve", "root", "false_positive")  # an admin's decision, never escalated
    with pytest.raises(ReviewError, match="decided by an admin"):
        store.record_review([hat], "reject", "alice", "off_brand")
    store.record_review([gift], "comment", "alice", None, "the logo is ours, see ticket 12")  # comments still go
    store.record_review([swim], "approve", "root", "false_positive")
    assert store.effective_decision(swim) == "approved" and store.effective_decision(hat) == "approved"


def test_a_password_change_signs_every_session_out(env: Env) -> None:
    c = env.client
    sign_in(c)
    stolen = dict(c.cookies)
    assert c.get("/", headers=HTML, follow_redirects=False).status_code == 200
    env.store.update_reviewer("alice", password="a-new-secret-pw")
    assert c.get("/", headers=HTML, follow_redirects=False).status_code == 303
    other = TestClient(c.app, cookies=stolen)
    r = other.post(f"/items/{env.id('hat')}/review", data={"action": "reject", "reason_code": "off_brand"})
    assert r.status_code == 401 and reviews(env.store, env.id("hat")) == []
    PASSWORDS["alice"], old = "a-new-secret-pw", PASSWORDS["alice"]
    try:
        sign_in(c)  # the new password works, and its session holds
        assert c.get("/", headers=HTML, follow_redirects=False).status_code == 200
    finally:
        PASSWORDS["alice"] = old


def session_rows(store: AuditStore) -> list[dict]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(ReviewSessionRow.__table__)).mappings()]


def test_the_db_keeps_only_a_hash_of_live_sessions(env: Env, monkeypatch) -> None:
    c = env.client
    sign_in(c)
    key = json.loads(base64.b64decode(c.cookies.get("genpipe_review").split(".")[0] + "=="))["sid"]
    (row,) = session_rows(env.store)
    assert row["id"] == hashlib.sha256(key.encode()).hexdigest() and key not in json.dumps(row, default=str)
    assert row["reviewer_id"] == env.store.authenticate("alice", PASSWORDS["alice"])["id"]
    assert 8 * 3600 - 60 < row["expires_at"] - time.time() <= 8 * 3600
    # An expired session is refused even while its row is still there, and the next sign-in clears it away.
    later = time.time() + 8 * 3600 + 1
    monkeypatch.setattr("pipeline.audit.sessions.time.time", lambda: later)
    assert c.get("/", follow_redirects=False).status_code == 303
    other = TestClient(c.app)
    sign_in(other, "root")
    root_id = env.store.authenticate("root", PASSWORDS["root"])["id"]
    assert [r["reviewer_id"] for r in session_rows(env.store)] == [root_id]


def test_a_password_change_during_sign_in_leaves_no_session(env: Env, monkeypatch) -> None:
    import pipeline.audit.reviews as reviews
    from pipeline.audit.sessions import sign_in_with_password as sign_in_reviewer

    real = reviews.check_password

    def check_then_change(stored, password):  # the change lands between the check and the session's insert
        ok = real(stored, password)
        env.store.update_reviewer("alice", password="changed-meanwhile")
        return ok

    monkeypatch.setattr(reviews, "check_password", check_then_change)
    assert sign_in_reviewer(env.store, "alice", PASSWORDS["alice"], 60) is None
    assert session_rows(env.store) == []
    monkeypatch.undo()
    assert sign_in_reviewer(env.store, "alice", "changed-meanwhile", 60)[0]["name"] == "alice"


def test_an_admin_signs_a_reviewer_out_everywhere_and_manages_them_from_the_cli(env: Env, monkeypatch, capsys) -> None:
    from pipeline.cli import main

    laptop, phone, admin = TestClient(env.client.app), TestClient(env.client.app), TestClient(env.client.app)
    for client, name in ((laptop, "alice"), (phone, "alice"), (admin, "root")):
        sign_in(client, name)
    assert main(["review", "update-reviewer", "--db", env.data.url, "alice", "--sign-out"]) == 0
    assert "sessions signed out" in capsys.readouterr().out
    for client, expected in ((laptop, 303), (phone, 303), (admin, 200)):  # only alice's sessions ended
        assert client.get("/", follow_redirects=False).status_code == expected
    # A new API token replaces the old one; role and disabled change through the same command.
    assert main(["audit", "update-reviewer", "--db", env.data.url, "alice", "--rotate-token", "--role", "admin"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert env.store.authenticate_token(env.data.tokens["alice"]) is None
    assert env.store.authenticate_token(token)["role"] == "admin"
    sign_in(laptop)
    alice_id = env.store.authenticate_token(token)["id"]
    assert alice_id in {r["reviewer_id"] for r in session_rows(env.store)}
    assert main(["audit", "update-reviewer", "--db", env.data.url, "alice", "--disable"]) == 0
    assert alice_id not in {r["reviewer_id"] for r in session_rows(env.store)}  # disabling ends the sessions
    assert laptop.get("/", follow_redirects=False).status_code == 303
    assert env.store.authenticate("alice", PASSWORDS["alice"]) is None
    assert main(["audit", "update-reviewer", "--db", env.data.url, "alice", "--enable"]) == 0
    assert env.store.authenticate("alice", PASSWORDS["alice"])["role"] == "admin"
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["audit", "update-reviewer", "--db", env.data.url, "alice", "--password-stdin"]) == 2
    assert main(["audit", "update-reviewer", "--db", env.data.url, "alice"]) == 2
    assert main(["audit", "update-reviewer", "--db", env.data.url, "nobody", "--sign-out"]) == 2
    err = capsys.readouterr().err
    assert "the new password is empty" in err and "nothing to change" in err and "no reviewer named 'nobody'" in err


@pytest.mark.parametrize("query", ["page=%C2%B2", "per_page=%C2%B2", "page=%C2%B9", "page=" + "9" * 400])
def test_odd_page_numbers_are_a_clear_400_not_a_crash(env: Env, query: str) -> None:
    sign_in(env.client)
    r = env.client.get(f"/api/queue?{query}")
    assert r.status_code == 400 and "is not allowed" in r.text, r.text[:300]


def test_item_page_shows_everything_and_the_history(env: Env) -> None:
    c, item = env.client, env.id("gift")
    sign_in(c, "root")
    token = csrf_of(c)
    c.post(f"/items/{item}/review", data={"action": "reject", "reason_code": "legal_risk", "csrf_token": token})
    page = c.get(f"/items/{item}", headers=HTML).text
    for text in ("gift card", "summer-hats", "euler", "7.5", "nsfw_borderline", "0.580", "catalog", "sku_color",
                 env.data.files["gift"].name, 'id="effective">rejected'):  # fmt: skip
        assert text in page, text
    # A flag reads yes/no and a rank as a whole number (they showed as "–" and "1.000").
    assert '<th>bias_person_present</th><td class="num">no</td>' in page
    assert '<th>clip_rank</th><td class="num">1</td>' in page
    history = page[page.index('id="history"') :]
    assert history.index("item recorded") < history.index("review escalate") < history.index("review reject")
    assert "check the brand guide" in history and "needs_admin" in history and "legal_risk" in history
    assert c.get(f"/items/{'0' * 32}", headers=HTML).status_code == 404


# --- bad input is data ----------------------------------------------------------------------------------------

BAD = [INJECTION, "x' OR '1'='1", '" OR 1=1 --', "%", "_", "\\", "1; DELETE FROM events", SCRIPT, "a\x00b"]


def test_sql_metacharacters_in_filters_are_data(env: Env) -> None:
    c = env.client
    sign_in(c)
    before = counts(env.store)
    for bad in BAD:
        for name in ("job", "campaign", "q", "decision", "sort", "min_nsfw", "max_nsfw", "max_clipscore", "per_page",
                     "page"):  # fmt: skip
            r = c.get("/", params={name: bad, "decision": "any"} if name != "decision" else {name: bad}, headers=HTML)
            assert r.status_code in (200, 400), (name, bad, r.status_code)
            assert SCRIPT not in r.text, (name, bad)  # escaped wherever it is shown back
            if name in ("job", "campaign") and r.status_code == 200:
                assert 'id="total">0 items' in r.text, (name, bad)
    # LIKE wildcards and quotes in the text search match literally.
    page = c.get("/", params={"q": "100% natural_", "decision": "any"}, headers=HTML).text
    assert 'id="total">1 item<' in page and env.id("hat") in page
    page = c.get("/", params={"q": INJECTION, "decision": "any"}, headers=HTML).text
    assert 'id="total">2 items' in page  # the rejected row and the gift card carry it in their prompts
    assert "&#39;; DROP TABLE items; --" in page and "&lt;script&gt;" in page
    assert counts(env.store) == before


def test_sql_metacharacters_in_forms_are_data(env: Env) -> None:
    c = env.client
    sign_in(c)
    token = csrf_of(c)
    item = env.id("boot")
    for bad in BAD:
        before = counts(env.store)
        for form in (
            {"action": bad, "reason_code": "off_brand"},
            {"action": "reject", "reason_code": bad},
            {"action": "reject", "reason_code": "off_brand", "item_id": [bad]},
        ):
            r = c.post("/bulk" if "item_id" in form else f"/items/{item}/review", data={**form, "csrf_token": token},
                       headers=HTML)  # fmt: skip
            assert r.status_code == 200 and "Not recorded" in r.text, (form, r.text[:300])
            assert SCRIPT not in r.text
        assert counts(env.store) == before
    comment = "\n".join(b for b in BAD if "\x00" not in b)
    r = c.post(f"/items/{item}/review", headers=HTML,
               data={"action": "comment", "reason_code": "note", "comment": comment, "csrf_token": token})  # fmt: skip
    assert "comment recorded" in r.text
    assert reviews(env.store, item) == [("review_comment", "alice", "note", comment)]
    assert SCRIPT not in r.text and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in r.text
    r = c.post(f"/items/{item}/review", headers=HTML,
               data={"action": "comment", "comment": "a\x00b", "csrf_token": token})  # fmt: skip
    assert "Not recorded" in r.text
    assert c.get("/items/" + INJECTION, headers=HTML).status_code == 404


# --- images ---------------------------------------------------------------------------------------------------


def test_images_are_served_by_item_id_only(env: Env) -> None:
    c = env.client
    sign_in(c)
    for label in ("sneaker", "tote", "swim"):  # review/, images/ and quarantine/
        r = c.get(f"/images/{env.id(label)}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == env.data.files[label].read_bytes()
        assert r.headers["cache-control"] == "private, no-store" and r.headers["x-content-type-options"] == "nosniff"
        thumb = c.get(f"/images/{env.id(label)}/thumb")
        assert thumb.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb.content)).size[0] <= 192
    path = str(env.data.files["swim"])
    for bad in ("0" * 32, env.id("badrow"), "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", path.replace("/", "%2F"),
                env.id("tote").upper(), env.id("tote") + "%2F..%2F" + env.id("swim")):  # fmt: skip
        assert c.get(f"/images/{bad}").status_code == 404, bad
    assert c.get("/images", params={"path": path}).status_code == 404
    assert c.get("/images/", params={"uri": path}).status_code == 404


def test_an_image_that_differs_from_its_record_is_not_shown(env: Env, tmp_path) -> None:
    sign_in(env.client)
    item = env.store.get_items([env.id("runner")])[env.id("runner")]
    copy = tmp_path / "tampered.png"
    copy.write_bytes(png(99))
    item.image_uri = str(copy)
    env.store.write_items([item], None)
    r = env.client.get(f"/images/{item.item_id}")
    assert r.status_code == 409 and "sha256" in r.json()["detail"]


# --- overview, admin page, CLI ---------------------------------------------------------------------------------


def test_jobs_overview_counts_and_histograms(env: Env) -> None:
    c = env.client
    sign_in(c)
    page = c.get("/jobs", headers=HTML).text
    spring = page[page.index("spring-shoes") : page.index("summer-hats")]
    assert "7 items" in spring
    for count in (r"generated</td><td class=\"num\">6<", r"rejected</td><td class=\"num\">1<",
                  r">review</span></td><td class=\"num\">4<", r">block</span></td><td class=\"num\">1<"):  # fmt: skip
        assert re.search(count, spring), count
    assert spring.count('aria-label="histogram of') == 3 and "(6 images)" in spring
    assert re.findall(r"<rect [^>]*><title>[^<]*: (\d+)</title>", spring)  # bars with their counts
    one = c.get("/jobs", params={"job": "summer-hats"}, headers=HTML).text
    assert "summer-hats" in one and "spring-shoes" not in one
    assert c.get("/reviewers", headers=HTML).status_code == 403
    admin = TestClient(c.app)
    sign_in(admin, "root")
    assert "alice" in admin.get("/reviewers", headers=HTML).text


def test_cli_add_reviewer_and_serve_parse(env: Env, monkeypatch, capsys) -> None:
    from pipeline.cli import build_parser, main

    monkeypatch.setattr("sys.stdin", io.StringIO("bob-password\n"))
    assert main(["review", "add-reviewer", "--db", env.data.url, "bob", "--role", "admin", "--password-stdin"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert env.store.authenticate("bob", "bob-password")["role"] == "admin"
    assert env.store.authenticate_token(token)["name"] == "bob"
    assert main(["review", "add-reviewer", "--db", env.data.url, "bob"]) == 2  # exists already
    args = build_parser().parse_args(["review", "serve", "--db", env.data.url, "--port", "9999"])
    assert (args.host, args.port, args.secure_cookies) == ("127.0.0.1", 9999, False)
    # An empty password is refused, as by update-reviewer: it made an account that could not sign in.
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["review", "add-reviewer", "--db", env.data.url, "carol", "--password-stdin"]) == 2
    assert "the password is empty" in capsys.readouterr().err and "carol" not in [
        r["name"] for r in env.store.reviewers()
    ]
    with pytest.raises(SystemExit):  # a port past 65535 is an argument error, not a traceback from bind()
        build_parser().parse_args(["review", "serve", "--db", env.data.url, "--port", "80000"])


def test_api_item_json(env: Env) -> None:
    auth = {"authorization": f"Bearer {env.data.tokens['alice']}"}
    body = env.client.get(f"/api/items/{env.id('gift')}", headers=auth).json()
    assert body["effective_decision"] == "escalated"
    assert [e["kind"] for e in body["history"]] == ["item_recorded", "review_escalate"]
    assert json.loads(json.dumps(body))["record"]["prompt"].startswith("gift card")


def test_pagination_and_a_bulk_review_of_a_whole_page(env: Env) -> None:
    base = env.store.get_items([env.id("boot")])[env.id("boot")]
    extra = []
    for n in range(30):
        item = Item(**{**base.as_dict(), "job": "many", "prompt_id": f"m{n:02d}", "prompt": f"mug {n:02d}"})
        item.item_id = hashlib.sha256(f"many:{n}".encode()).hexdigest()[:32]
        extra.append(item)
    env.store.write_items(extra, None)
    c = env.client
    sign_in(c)
    first = c.get("/", params={"job": "many", "per_page": "25", "sort": "item_id"}, headers=HTML).text
    assert 'id="total">30 items' in first and "page 1 of 2" in first and first.count('name="item_id"') == 25
    second = c.get("/", params={"job": "many", "per_page": "25", "sort": "item_id", "page": "2"}, headers=HTML).text
    assert second.count('name="item_id"') == 5
    shown = set(re.findall(r'name="item_id" value="([0-9a-f]{32})"', first + second))
    assert shown == {i.item_id for i in extra}
    page_ids = re.findall(r'name="item_id" value="([0-9a-f]{32})"', first)
    form = {"item_id": page_ids, "action": "approve", "reason_code": "within_policy", "csrf_token": csrf_of(c)}
    assert "approve recorded for 25 item(s)" in c.post("/bulk", data=form, headers=HTML).text
    left = c.get("/", params={"job": "many", "per_page": "25"}, headers=HTML).text
    assert 'id="total">5 items' in left


def test_sign_in_throttle_counts_per_account_and_address() -> None:
    from pipeline.review.auth import SignInThrottle

    t = SignInThrottle(limit=3, window=60.0, client_limit=5)
    for _ in range(3):
        t.failed("10.0.0.1", "ghost")
    assert t.blocked("10.0.0.1", "ghost") and t.blocked("10.0.0.1", " GHOST ")  # the same account
    assert not t.blocked("10.0.0.1", "alice")  # a colleague behind the same proxy still signs in
    assert not t.blocked("10.0.0.2", "ghost")
    for name in ("a", "b"):  # spraying: the address as a whole is refused past client_limit
        t.failed("10.0.0.1", name)
    assert t.blocked("10.0.0.1", "alice") and not t.blocked("10.0.0.2", "alice")


def test_failed_sign_ins_for_one_account_do_not_lock_out_another(env: Env) -> None:
    c = env.client
    token = csrf_of(c, "/login")
    for _ in range(20):  # the per-account limit, all from the test client's one address
        r = c.post("/login", data={"name": "ghost", "password": "guess", "csrf_token": token}, headers=HTML)
        assert r.status_code == 401
    r = c.post("/login", data={"name": "ghost", "password": "guess", "csrf_token": token}, headers=HTML)
    assert r.status_code == 429 and "Too many failed sign-ins" in r.text
    sign_in(c)  # alice, from the same address
    assert c.get("/", headers=HTML, follow_redirects=False).status_code == 200
