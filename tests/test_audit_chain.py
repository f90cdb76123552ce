"""The tamper-evident chain: migrations, verify (clean and after every kind of tampering), anchors, reviews,
and the PostgreSQL application role, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, event, select, text

from pipeline.audit import AuditStore, AuditStoreError
from pipeline.audit.anchor import ANCHOR_KEY, read_anchor, write_chain_anchor
from pipeline.audit.chain import (
    CHAIN_STARTED,
    ITEM_RECORDED,
    _row_hash,
    canonical_json,
    event_hash,
    format_time,
    json_default,
    json_encoder,
)
from pipeline.audit.lease import JobLease
from pipeline.audit.migrate import alembic_config, head_revision
from pipeline.audit.reviews import ReviewError
from pipeline.audit.schema import EventRow, metadata
from pipeline.audit.sessions import end_session, session_reviewer, start_session
from pipeline.audit.verify import verify
from pipeline.cli import main
from pipeline.storage import Storage
from tests.pg import fresh_database
from tests.test_audit_store import make_item

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
ROLES_SQL = Path(__file__).resolve().parent.parent / "infra" / "db" / "postgres-roles.sql"
JOB = "chain-job"


def _sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


@pytest.fixture(params=BACKENDS)
def fresh_url(request: pytest.FixtureRequest, tmp_path):
    """An empty database of each backend, for this test only."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/audit.db"
        return
    with fresh_database() as url:
        yield url


def _raw(url: str):
    """An engine that bypasses the store: no foreign keys on SQLite, replica mode (no FK triggers) on PostgreSQL
    — what someone editing the database by hand would have."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    if engine.dialect.name == "postgresql":
        event.listen(engine, "connect", lambda c, _: c.execute("SET session_replication_role = replica"))
    return engine


def tamper(url: str, *statements: tuple[str, dict] | str) -> None:
    engine = _raw(url)
    with engine.begin() as conn:
        for st in statements:
            sql, params = (st, {}) if isinstance(st, str) else st
            conn.execute(text(sql), params)
    engine.dispose()


# --- a populated audit DB, built once per backend and copied for each test -------------------------------------


class Populated:
    """Seqs: 1 chain_started, 2 run_started, 3-8 six items (sorted by id), 9 run_ended, 10-11 reviewers
    alice (admin) and bob, 12 bob rejects G[0], 13 alice approves G[1], 14 alice comments on G[2]."""

    def __init__(self, url: str, root: Path) -> None:
        self.url, self.root = url, root
        storage = Storage(str(root))
        store = AuditStore(url)
        run = store.begin_run(JOB, {"name": JOB, "policy": {"nsfw_block": 0.8}}, {"torch": "2"}, {"id": "tiny"})
        items = []
        for n in range(6):
            status = "generated" if n < 4 else ("rejected" if n == 4 else "failed")
            item = make_item(JOB, n, status=status, decision="review" if n < 4 else None, scores={"nsfw": n / 10})
            if status == "generated":
                data = f"image bytes {n}".encode()
                item.image_uri = storage.write_atomic(f"images/{item.prompt_id}-{n}.png", data)
                item.image_sha256 = hashlib.sha256(data).hexdigest()
            items.append(item)
        store.write_items(items, run)
        store.end_run(run, "succeeded", {"generated": 4, "rejected": 1, "failed": 1}, {"elapsed_s": 1.5})
        store.add_reviewer("alice", "admin", password="correct horse")
        store.add_reviewer("bob")
        self.generated = sorted(i.item_id for i in items if i.status == "generated")
        self.ids = sorted(i.item_id for i in items)
        g = self.generated
        store.record_review([g[0]], "reject", "bob", "nsfw_confirmed", "too much skin")
        store.record_review([g[1]], "approve", "alice", "false_positive")
        store.record_review([g[2]], "comment", "alice", text="check the logo")
        self.anchor = write_chain_anchor(store, storage, JOB)
        self.anchor_url = str(root / ANCHOR_KEY)
        self.images = {i.item_id: i.image_uri for i in items if i.image_uri}
        store.dispose()

    def seq_of(self, item_id: str, kind: str = ITEM_RECORDED) -> int:
        engine = _raw(self.url)
        with engine.connect() as conn:
            query = select(EventRow.seq).where(EventRow.item_id == item_id, EventRow.kind == kind)
            seq = conn.execute(query).scalar_one()
        engine.dispose()
        return seq


@pytest.fixture(scope="session", params=BACKENDS)
def template(request: pytest.FixtureRequest, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain") / "out" / JOB
    if request.param == "sqlite":
        yield Populated(f"sqlite:///{root.parent.parent}/template.db", root)
        return
    with fresh_database() as url:
        populated = Populated(url, root)
        _snapshot(url)
        yield populated


_TABLES = ("jobs", "runs", "items", "reviewers", "events", "alembic_version", "audit_settings")


def _snapshot(url: str) -> None:
    """Keep a copy of every table in schema ``snap`` (PostgreSQL), for ``_restore`` after each test."""
    tamper(url, "CREATE SCHEMA snap", *(f"CREATE TABLE snap.{t} AS TABLE public.{t}" for t in _TABLES))


def _restore(url: str) -> None:
    deletes = [f"DELETE FROM public.{t}" for t in _TABLES]
    tamper(url, *deletes, *(f"INSERT INTO public.{t} SELECT * FROM snap.{t}" for t in _TABLES))


@pytest.fixture
def db(template: Populated, tmp_path):
    """The populated database, as built, for this test alone: a copy of the file on SQLite; on PostgreSQL the
    same database, restored from a snapshot afterwards (cheaper than a new database per test). The images are
    shared: tests that touch one restore it."""
    if template.url.startswith("sqlite"):
        copy = tmp_path / "audit.db"
        for suffix in ("", "-wal"):
            if os.path.exists(_sqlite_path(template.url) + suffix):
                shutil.copy(_sqlite_path(template.url) + suffix, str(copy) + suffix)
        clone = Populated.__new__(Populated)
        clone.__dict__.update(template.__dict__, url=f"sqlite:///{copy}")
        yield clone
        return
    try:
        yield template
    finally:
        _restore(template.url)


def run_verify(db: Populated, capsys, *extra: str) -> tuple[int, str]:
    code = main(["audit", "verify", "--db", db.url, "--images", "--anchor", db.anchor_url, *extra])
    return code, capsys.readouterr().out


# --- clean chains -------------------------------------------------------------------------------------------


def test_a_clean_database_verifies_with_images_and_anchor(db: Populated, capsys):
    code, out = run_verify(db, capsys)
    assert code == 0, out
    assert out.startswith("audit chain OK: 14 events, 6 items, 1 runs, 4 images, 1 anchor checked; head seq 14")
    assert db.anchor["seq"] == 14 and db.anchor["job"] == JOB


# --- the fast serialisers give the reference's bytes ---------------------------------------------------------

JSON_VALUES = [
    None, True, 0, -1, 2**70, 0.1 + 0.2, -0.0, 1e-7, 1e22, 5e-324, "", "é☃🥿", 'q"b\\s\n\t\x00\x1f\u2028',
    [], {}, (1, "two"), {"b": 1, "a": [1, {"y": 2, "x": None}], "é": {}}, {3: "int key", "2": "str key"},
    {2.5: "float key", True: "bool key", None: "none key"}, {"s": {"b", "a"}, "f": frozenset([2, 1])},
    {"np": [np.float32(0.25), np.int64(7), np.bool_(True), np.arange(3), np.float64(0.3)]}, {"obj": object},
    [[[[{"deep": [1.5]}]]]],
]  # fmt: skip


@pytest.mark.parametrize("value", JSON_VALUES, ids=range(len(JSON_VALUES)))
@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
@pytest.mark.parametrize("sort_keys", [True, False])
def test_json_encoder_writes_what_json_dumps_writes(value, separators, sort_keys):
    options = {"ensure_ascii": False, "allow_nan": False, "default": json_default}
    dumps = json_encoder(separators, sort_keys)
    try:
        expected = json.dumps(value, separators=separators, sort_keys=sort_keys, **options)
    except TypeError:  # keys of mixed types cannot be sorted: the same error
        with pytest.raises(TypeError):
            dumps(value)
        return
    assert dumps(value) == expected


@pytest.mark.parametrize("bad", [float("nan"), [float("inf")], {"a": {"b": -float("inf")}}])
def test_json_encoder_refuses_nan_like_json_dumps(bad):
    with pytest.raises(ValueError):
        json_encoder((",", ":"), True)(bad)
    with pytest.raises(ValueError, match="NaN or Infinity"):
        canonical_json(bad)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"job": 'j"ob\\ é\n', "item_id": "☃" * 32, "run_id": 2**40, "text": "a\x00b\u2028", "reason_code": ""},
        {"kind": "review_reject", "reviewer_id": 3, "supersedes": 17, "reason_code": "nsfw", "text": "too much"},
        {"run_id": np.int64(4)},  # not a plain int: hashed through canonical_json, as event_hash does
        {"run_id": True},  # a bool is not an int to JSON
    ],
)
def test_the_fast_envelope_hashes_as_event_hash(fields):
    now = datetime(2026, 11, 30, 10, 1, 2, 345000, tzinfo=UTC)
    row = {"seq": 41, "prev_hash": "ab" * 32, "kind": ITEM_RECORDED, "job": "job", "item_id": "i" * 32, "run_id": None,
           "reviewer_id": None, "reason_code": None, "text": None, "supersedes": None, "created_at": now,
           "payload": canonical_json({"x": [1.5, "é", None], "q": '"'})}  # fmt: skip
    row.update(fields)
    assert _row_hash(row, format_time(now)) == event_hash(row)


def test_events_hash_as_documented(db: Populated):
    """The hash is sha256 of the canonical JSON envelope — recomputed here without the package's helper."""
    engine = _raw(db.url)
    with engine.connect() as conn:
        rows = conn.execute(select(EventRow.__table__).order_by(EventRow.seq)).mappings().all()
    engine.dispose()
    prev = "0" * 64
    for row in rows:
        envelope = {k: row[k] for k in ("seq", "prev_hash", "kind", "job", "item_id", "run_id", "reviewer_id",
                                        "reason_code", "text", "supersedes", "payload")}  # fmt: skip
        envelope["created_at"] = row["created_at"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        envelope["v"] = 1
        blob = json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        assert row["prev_hash"] == prev and row["hash"] == hashlib.sha256(blob).hexdigest() == event_hash(row)
        prev = row["hash"]
    assert [r["kind"] for r in rows[:3]] == [CHAIN_STARTED, "run_started", ITEM_RECORDED]
    recorded = json.loads(rows[2]["payload"])
    assert recorded["item_id"] == db.ids[0] and recorded["run_id"] == 1 and "pixels" not in recorded
    assert rows[2]["payload"] == canonical_json(recorded)  # stored exactly as hashed


def test_an_anchor_from_earlier_still_verifies_after_more_writes(db: Populated, capsys):
    store = AuditStore(db.url)
    store.write_items([make_item(JOB, 99, status="rejected")], None)
    store.dispose()
    code, out = run_verify(db, capsys)
    assert code == 0, out
    assert read_anchor(str(db.root))["seq"] == 14  # a job root works as --anchor too


# --- tampering: every single edit is caught, naming the first bad record -----------------------------------------


def _swap_payloads(db: Populated) -> list:
    a, b = db.seq_of(db.ids[1]), db.seq_of(db.ids[3])
    engine = _raw(db.url)
    with engine.connect() as conn:
        pa, pb = (conn.execute(text("SELECT payload FROM events WHERE seq = :s"), {"s": s}).scalar() for s in (a, b))
    engine.dispose()
    sql = "UPDATE events SET payload = :p WHERE seq = :s"
    return [(sql, {"p": pb, "s": a}), (sql, {"p": pa, "s": b})]


def _rewrite_tail(db: Populated) -> None:
    """What someone who knows the scheme does: edit an item and its record, and re-hash the chain from there."""
    target = db.generated[3]
    engine = _raw(db.url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE items SET scores = :s WHERE item_id = :i"), {"s": '{"nsfw": 0.0}', "i": target})
        seq = conn.execute(text("SELECT seq FROM events WHERE item_id = :i"), {"i": target}).scalar()
        payload = json.loads(conn.execute(text("SELECT payload FROM events WHERE seq = :s"), {"s": seq}).scalar())
        payload["scores"] = {"nsfw": 0.0}
        conn.execute(text("UPDATE events SET payload = :p WHERE seq = :s"), {"p": canonical_json(payload), "s": seq})
        prev = conn.execute(text("SELECT hash FROM events WHERE seq = :s"), {"s": seq - 1}).scalar()
        for row in (
            conn.execute(select(EventRow.__table__).where(EventRow.seq >= seq).order_by(EventRow.seq)).mappings().all()
        ):
            new = event_hash({**row, "prev_hash": prev})
            conn.execute(
                text("UPDATE events SET prev_hash = :p, hash = :h WHERE seq = :s"),
                {"p": prev, "h": new, "s": row["seq"]},
            )
            prev = new
    engine.dispose()


_ITEM_COLUMNS = [c.name for c in metadata.tables["items"].columns if c.name != "item_id"]
_COPY_ITEM = (
    f"INSERT INTO items (item_id, {', '.join(_ITEM_COLUMNS)}) "
    f"SELECT :new, {', '.join(_ITEM_COLUMNS)} FROM items WHERE item_id = :i"
)

CASES = {
    # name: (tampering, expected start of the first bad record)
    "edit a score in items": (
        lambda db: tamper(
            db.url, ("UPDATE items SET scores = :s WHERE item_id = :i", {"s": '{"nsfw": 0.01}', "i": db.ids[2]})
        ),
        lambda db: (
            f"event seq {db.seq_of(db.ids[2])}, item {db.ids[2]}: items row differs from its latest record in: scores"
        ),
    ),
    "edit the status and image hash in items": (
        lambda db: tamper(
            db.url, ("UPDATE items SET status = 'generated', image_sha256 = 'x' WHERE item_id = :i", {"i": db.ids[0]})
        ),
        lambda db: f"event seq {db.seq_of(db.ids[0])}, item {db.ids[0]}: items row differs from its latest record in: ",
    ),
    "edit an event payload": (
        lambda db: tamper(
            db.url, ("UPDATE events SET payload = replace(payload, 'prompt', 'PROMPT') WHERE seq = 5", {})
        ),
        lambda db: f"event seq 5, item {db.ids[2]}: hash mismatch",
    ),
    "edit a review's reason": (
        lambda db: tamper(db.url, "UPDATE events SET reason_code = 'policy_ok' WHERE seq = 12"),
        lambda db: f"event seq 12, item {db.generated[0]}: hash mismatch",
    ),
    "edit a review's time": (
        lambda db: tamper(
            db.url, ("UPDATE events SET created_at = :t WHERE seq = 13", {"t": "2020-01-01 00:00:00.000000"})
        ),
        lambda db: f"event seq 13, item {db.generated[1]}: hash mismatch",
    ),
    "delete an event": (
        lambda db: tamper(db.url, "DELETE FROM events WHERE seq = 6"),
        lambda db: f"event seq 7, item {db.ids[4]}: events missing before it (seq 6): deleted",
    ),
    "delete the last event (a comment)": (
        lambda db: tamper(db.url, "DELETE FROM events WHERE seq = 14"),
        lambda db: (
            f"event seq 14: anchor {db.anchor_url}: the chain has no event seq 14 (head is 13): its tail was cut off"
        ),
    ),
    "delete an items row": (
        lambda db: tamper(db.url, ("DELETE FROM items WHERE item_id = :i", {"i": db.ids[5]})),
        lambda db: f"event seq 8, item {db.ids[5]}: the item's row is missing from items (deleted)",
    ),
    "insert an items row behind the log's back": (
        lambda db: tamper(db.url, (_COPY_ITEM, {"new": "f" * 32, "i": db.ids[0]})),
        lambda db: f"item {'f' * 32}: has no item_recorded event",
    ),
    "swap two events' payloads": (
        lambda db: tamper(db.url, *_swap_payloads(db)),
        lambda db: f"event seq {db.seq_of(db.ids[1])}, item {db.ids[1]}: hash mismatch",
    ),
    "reorder two events": (
        lambda db: tamper(
            db.url,
            "UPDATE events SET seq = -1 WHERE seq = 4",
            "UPDATE events SET seq = 4 WHERE seq = 7",
            "UPDATE events SET seq = 7 WHERE seq = -1",
        ),  # fmt: skip
        lambda db: f"event seq 4, item {db.ids[4]}: prev_hash does not match the hash of event seq 3",
    ),
    "rewrite the chain from an item on": (
        _rewrite_tail,
        lambda db: f"event seq 14: anchor {db.anchor_url}: event seq 14 has hash",
    ),
    "promote a reviewer": (
        lambda db: tamper(db.url, "UPDATE reviewers SET role = 'admin' WHERE name = 'bob'"),
        lambda db: "event seq 11: reviewer 'bob' differs from its latest record in: role",
    ),
    "change a run's recorded outcome": (
        lambda db: tamper(db.url, "UPDATE runs SET status = 'failed'"),
        lambda db: "event seq 9: run 1 differs from its latest record in: status",
    ),
    "backdate an item's creation (what audit query --since filters on)": (
        lambda db: tamper(
            db.url,
            ("UPDATE items SET created_at = :t WHERE item_id = :i", {"t": "2020-01-01 00:00:00", "i": db.ids[2]}),
        ),
        lambda db: f"event seq {db.seq_of(db.ids[2])}, item {db.ids[2]}: created_at 2020-01-01",
    ),
    "move the row-times boundary past an item, then backdate it": (
        lambda db: tamper(
            db.url,
            "UPDATE audit_settings SET value = '999'",
            ("UPDATE items SET created_at = :t WHERE item_id = :i", {"t": "2020-01-01 00:00:00", "i": db.ids[2]}),
        ),
        lambda db: f"event seq 14: anchor {db.anchor_url}: audit_settings.row_times_from_seq is 999, the anchor 1",
    ),
    "backdate a run's start": (
        lambda db: tamper(db.url, ("UPDATE runs SET started_at = :t", {"t": "2020-01-01 00:00:00"})),
        lambda db: "event seq 9: run 1: started_at 2020-01-01",
    ),
    "erase a run's end": (
        lambda db: tamper(db.url, "UPDATE runs SET ended_at = NULL"),
        lambda db: "event seq 9: run 1: ended_at null differs from its event's time",
    ),
    "change the job's spec": (
        lambda db: tamper(db.url, ("UPDATE jobs SET spec = :s", {"s": '{"policy": {"nsfw_block": 0.99}}'})),
        lambda db: f"event seq 2: job '{JOB}': spec differs from the one its latest run recorded",
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=[c.replace(" ", "-") for c in CASES])
def test_tampering_is_caught_naming_the_first_bad_record(case: str, db: Populated, capsys):
    edit, expected = CASES[case]
    edit(db)
    code, out = run_verify(db, capsys)
    assert code == 1, out
    assert "audit chain FAILED" in out
    first = out.splitlines()[1]
    assert first.startswith(f"first bad record: {expected(db)}"), out


@pytest.mark.parametrize("how", ["replace", "delete"])
def test_an_image_replaced_or_deleted_is_caught(how: str, db: Populated, capsys):
    victim = db.generated[2]
    path = Path(db.images[victim])
    original = path.read_bytes()
    try:
        if how == "replace":
            path.write_bytes(b"a different image")
        else:
            path.unlink()
        code, out = run_verify(db, capsys)
        without_images = main(["audit", "verify", "--db", db.url])
        capsys.readouterr()
    finally:
        path.write_bytes(original)
    assert code == 1
    expected = "does not match its recorded sha256" if how == "replace" else f"image missing: {path}"
    assert out.splitlines()[1].startswith(f"first bad record: item {victim}: "), out
    assert expected in out.splitlines()[1]
    assert without_images == 0  # images are only read when asked


def test_verify_lists_every_problem_and_counts_past_the_limit(db: Populated, capsys):
    tamper(db.url, "UPDATE items SET error = 'x'")
    code, out = run_verify(db, capsys, "--max-problems", "2")
    assert code == 1
    assert "audit chain FAILED: 6 problems" in out and "... and 4 more" in out


# --- migrations ----------------------------------------------------------------------------------------------


def test_migrate_creates_a_fresh_database_and_is_idempotent(fresh_url: str, capsys):
    assert main(["audit", "migrate", "--db", fresh_url]) == 0
    assert f"migrated from empty (no audit tables) to revision {head_revision()}" in capsys.readouterr().out
    assert main(["audit", "migrate", "--db", fresh_url]) == 0
    assert f"already at schema revision {head_revision()}" in capsys.readouterr().out
    store = AuditStore(fresh_url, migrate=False)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head_revision()]
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []  # models and migrations agree
        assert conn.execute(select(EventRow.kind)).scalars().all() == [CHAIN_STARTED]
    assert verify(store).ok
    store.dispose()


def test_read_only_commands_refuse_a_database_that_is_missing_or_not_migrated(tmp_path, capsys):
    missing = f"sqlite:///{tmp_path}/nope.db"
    assert main(["audit", "verify", "--db", missing]) == 2
    assert f"no such file {tmp_path}/nope.db" in capsys.readouterr().err
    assert not (tmp_path / "nope.db").exists()  # verify never creates a database
    (tmp_path / "empty.db").touch()
    assert main(["audit", "query", "--db", f"sqlite:///{tmp_path}/empty.db"]) == 2
    err = capsys.readouterr().err
    assert "is empty (no audit tables), not at schema revision" in err and "genpipe audit migrate" in err
    assert err.count("\n") == 1


def _legacy_database(url: str) -> None:
    """The schema as the store created it before migrations (revision 0001, no version table), with data."""
    from alembic import command

    engine = _raw(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
        conn.execute(text("DROP TABLE alembic_version"))
    engine.dispose()
    # Rows as the old store wrote them: through the current code path minus the events.
    from pipeline.audit import store as store_module

    item_rows = [store_module._item_to_row(make_item("legacy", n, scores={"nsfw": 0.5}), 1) for n in range(3)]
    engine = _raw(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO jobs (name, spec) VALUES ('legacy', :s)"), {"s": '{"name": "legacy"}'})
        conn.execute(
            text("INSERT INTO runs (job, status, versions, model_info) VALUES ('legacy', 'succeeded', '{}', '{}')")
        )
        table = metadata.tables["items"]
        conn.execute(table.insert(), item_rows)
    engine.dispose()


def test_a_pre_migration_database_is_upgraded_and_back_filled(fresh_url: str, capsys):
    _legacy_database(fresh_url)
    assert main(["audit", "migrate", "--db", fresh_url]) == 0
    assert "migrated from created before schema migrations (no version table) to revision" in capsys.readouterr().out
    store = AuditStore(fresh_url, migrate=False)
    report = verify(store)
    assert report.ok, report.render()
    assert report.events == 1 + 1 + 3 and report.items == 3
    assert [e["kind"] for e in store.history(make_item("legacy", 0).item_id)] == [ITEM_RECORDED]
    with store.engine.connect() as conn:
        started = json.loads(conn.execute(select(EventRow.payload).where(EventRow.seq == 1)).scalar_one())
    assert started == {"backfilled": {"items": 3, "runs": 1}, "schema_revision": "0002"}
    store.dispose()


def test_a_database_from_a_newer_genpipe_is_reported(fresh_url: str, capsys):
    AuditStore(fresh_url).dispose()
    tamper(fresh_url, "UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(AuditStoreError, match="revision 9999, which this genpipe does not know"):
        AuditStore(fresh_url)
    assert main(["audit", "migrate", "--db", fresh_url]) == 2
    assert "9999" in capsys.readouterr().err


def _open_and_write(url: str, worker: int, barrier) -> None:
    barrier.wait(timeout=60)
    store = AuditStore(url)  # all eight find an empty database at the same moment
    store.write_items([make_item("race", worker)], None)
    store.dispose()


def test_several_processes_opening_a_fresh_database_migrate_it_once(fresh_url: str):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=_open_and_write, args=(fresh_url, w, barrier)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 8
    store = AuditStore(fresh_url, migrate=False)
    report = verify(store)
    assert report.ok and report.events == 9 and report.items == 8, report.render()
    store.dispose()


# --- reviews and reviewers ------------------------------------------------------------------------------------


def test_reviewers_authenticate_by_password_or_token(db: Populated):
    store = AuditStore(db.url)
    who = store.authenticate("alice", "correct horse")
    assert who is not None and who["role"] == "admin"
    assert store.authenticate("alice", "wrong") is None and store.authenticate("nobody", "x") is None
    assert store.authenticate("bob", "") is None  # bob has a token only
    token = store.add_reviewer("carol", password="pw")
    assert store.authenticate_token(token)["name"] == "carol" and store.authenticate_token(token + "x") is None
    with store.engine.connect() as conn:
        stored = conn.execute(text("SELECT password_hash, token_hash FROM reviewers WHERE name = 'carol'")).one()
        payloads = " ".join(conn.execute(text("SELECT payload FROM events")).scalars())
    assert stored.password_hash.startswith("scrypt$16384$8$1$") and len(stored.password_hash.split("$")) == 6
    assert stored.token_hash == hashlib.sha256(token.encode()).hexdigest() and token not in payloads
    assert stored.password_hash not in payloads and stored.token_hash not in payloads  # secrets never in the log
    with pytest.raises(ReviewError, match="already exists"):
        store.add_reviewer("carol")
    with pytest.raises(ReviewError, match="reviewer name"):
        store.add_reviewer("../evil")
    new_token = store.update_reviewer("carol", disabled=True, rotate_token=True)
    assert store.authenticate_token(new_token) is None and store.authenticate("carol", "pw") is None
    with pytest.raises(ReviewError, match="does not exist or is disabled"):
        store.record_review([db.generated[3]], "approve", "carol", "false_positive")
    assert verify(store).ok  # the change of disabled is itself an event
    store.dispose()


def test_reviews_follow_the_rules_and_supersede_the_previous_decision(db: Populated):
    store = AuditStore(db.url)
    g = db.generated
    rejected_row = next(i for i in db.ids if i not in g)
    decisions = store.effective_decisions([*g, rejected_row, "no-such-id"])
    assert decisions == {g[0]: "rejected", g[1]: "approved", g[2]: "review", g[3]: "review", rejected_row: None}
    with pytest.raises(ReviewError, match="needs a reason code"):
        store.record_review([g[3]], "reject", "bob")
    # One vocabulary for the page, the API and the CLI: an approve needs a reason too, and only a listed one.
    with pytest.raises(ReviewError, match="a review approve needs a reason code: one of false_positive, within_"):
        store.record_review([g[3]], "approve", "bob")
    with pytest.raises(ReviewError, match="'nsfw_false_positive' is not a reason to approve: one of false_positive"):
        store.record_review([g[3]], "approve", "bob", "nsfw_false_positive")
    with pytest.raises(ReviewError, match="reason 'other' needs text saying why"):
        store.record_review([g[3]], "reject", "bob", "other")
    with pytest.raises(ReviewError, match="needs text"):
        store.record_review([g[3]], "comment", "bob")
    with pytest.raises(ReviewError, match="no item with id 'nope'"):
        store.record_review([g[3], "nope"], "approve", "bob", "within_policy")
    with pytest.raises(ReviewError, match="not generated"):
        store.record_review([rejected_row], "approve", "bob", "within_policy")

    [esc] = store.record_review([g[3]], "escalate", "bob", "brand_risk", "logo looks off")
    with pytest.raises(ReviewError, match="only an admin may approve"):
        store.record_review([g[3]], "approve", "bob", "within_policy")
    seqs = store.record_review([g[3], g[0]], "approve", "alice", "false_positive", "'; DROP TABLE items; --")
    assert seqs == [esc + 1, esc + 2]  # bulk, in the order given
    assert store.effective_decision(g[3]) == "approved" and store.effective_decision(g[0]) == "approved"

    history = store.history(g[3])
    assert [e["kind"] for e in history] == ["item_recorded", "review_escalate", "review_approve"]
    approve = history[-1]
    assert (
        approve["supersedes"] == esc and approve["reviewer"] == "alice" and approve["reason_code"] == "false_positive"
    )
    assert approve["text"] == "'; DROP TABLE items; --"  # data, stored verbatim
    assert approve["payload"]["image_sha256"] == store.get_items([g[3]])[g[3]].image_sha256
    with pytest.raises(ReviewError, match="supersedes=1: not a review event"):
        store.record_review([g[3]], "comment", "bob", text="x", supersedes=1)
    assert verify(store).ok
    store.dispose()


def test_review_cli_records_the_token_holder(db: Populated, capsys, monkeypatch):
    assert main(["audit", "add-reviewer", "--db", db.url, "dana"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    monkeypatch.setenv("GENPIPE_REVIEW_TOKEN", token)
    assert main(["audit", "review", "--db", db.url, "reject", db.generated[3], "--reason", "off_brand"]) == 0
    assert "reject by dana recorded for 1 item(s): event 16" in capsys.readouterr().out
    monkeypatch.setenv("GENPIPE_REVIEW_TOKEN", "gp_forged")
    assert main(["audit", "review", "--db", db.url, "approve", db.generated[3]]) == 2
    assert "valid reviewer API token" in capsys.readouterr().err
    assert main(["audit", "history", "--db", db.url, db.generated[3]]) == 0
    events = json.loads(capsys.readouterr().out)
    assert events[-1]["kind"] == "review_reject" and events[-1]["reviewer"] == "dana"
    # The 8 characters of an image's file name find the item too.
    assert main(["audit", "history", "--db", db.url, db.generated[3][:8]]) == 0
    assert json.loads(capsys.readouterr().out) == events
    assert main(["audit", "history", "--db", db.url, "ffffffffff"]) == 2
    assert "no events for item 'ffffffffff'" in capsys.readouterr().err


# --- the PostgreSQL application role ----------------------------------------------------------------------------


@pytest.mark.postgres
def test_application_role_can_append_but_never_update_or_delete_events(tmp_path):
    import psycopg
    from sqlalchemy.engine import make_url

    login = f"genpipe_test_app_{uuid.uuid4().hex[:8]}"
    with fresh_database() as url:
        AuditStore(url).dispose()  # migrated by the owner
        sql = ROLES_SQL.read_text()
        with psycopg.connect(url, autocommit=True) as owner:
            owner.execute(sql)
            owner.execute(sql)  # idempotent
            owner.execute(f'CREATE ROLE "{login}" LOGIN IN ROLE genpipe_app')
        try:
            app_url = make_url(url).set(username=login).render_as_string(hide_password=False)
            app = AuditStore(app_url)  # opens at head without needing DDL
            run = app.begin_run("roles", {}, {}, {})
            app.write_items([make_item("roles", n, status="generated") for n in range(3)], run)
            app.write_items([make_item("roles", 0, status="generated", attempt=2)], run)  # upsert = UPDATE items
            app.end_run(run, "succeeded", {}, {})
            app.add_reviewer("erin", password="erin-secret-pw")
            app.record_review([make_item("roles", 1).item_id], "comment", "erin", text="ok")
            # The review page and job leases work as the application role: sign in, password change, sign out.
            erin = app.authenticate("erin", "erin-secret-pw")
            key = start_session(app, erin["id"], 60)
            assert session_reviewer(app, key)["name"] == "erin"
            app.update_reviewer("erin", password="erin-new-pw")
            assert session_reviewer(app, key) is None
            end_session(app, start_session(app, erin["id"], 60))
            lease = JobLease(app, "roles").acquire()
            lease.release()
            assert verify(app).ok
            app.dispose()
            with psycopg.connect(app_url, autocommit=True) as conn:
                forbidden = ["UPDATE events SET text = 'x'", "DELETE FROM events", "TRUNCATE events",
                             "DELETE FROM items", "UPDATE audit_settings SET value = '999999'",
                             "UPDATE reviewers SET name = 'mallory'", "DROP TABLE events"]  # fmt: skip
                for statement in forbidden:
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        conn.execute(statement)
            with psycopg.connect(url, autocommit=True) as owner:  # the trigger stops the owner too
                for statement in (
                    "UPDATE events SET text = 'x' WHERE seq = 1",
                    "DELETE FROM events",
                    "TRUNCATE events",
                ):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                        owner.execute(statement)
                assert owner.execute("SELECT count(*) FROM events").fetchone()[0] == 1 + 1 + 4 + 1 + 1 + 1
        finally:
            with psycopg.connect(url, autocommit=True) as owner:
                owner.execute(f'DROP OWNED BY "{login}"')
                owner.execute(f'DROP ROLE "{login}"')


def test_unknown_backend_or_unreachable_database_is_one_line(capsys):
    assert main(["audit", "verify", "--db", "postgresql://u:secret@127.0.0.1:1/db"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genpipe: error: cannot open audit DB") and "secret" not in err and err.count("\n") == 1
    assert os.environ.get("GENPIPE_REVIEW_TOKEN") is None
