"""The audit store on SQLite and PostgreSQL: round trips, idempotent upserts, streaming, concurrency, errors."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, event, func, insert, select

from pipeline.audit import RESULTS_SCHEMA, AuditStore, AuditStoreError, item_to_record, write_results_parquet
from pipeline.audit.chain import ITEM_FIELDS, item_payload, json_default
from pipeline.audit.schema import EventRow, ItemRow
from pipeline.audit.store import _item_to_row
from pipeline.audit.verify import verify
from schemas.record import Item
from tests.pg import postgres_url  # noqa: F401  (session fixture, reached through request.getfixturevalue)

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/not-yet/genpipe.db"  # the store creates the directory
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(db_url: str):
    s = AuditStore(db_url)
    yield s
    s.dispose()


@pytest.fixture
def job() -> str:
    # Tests share one PostgreSQL database per session; item ids derive from the job, so nothing collides.
    return f"job-{uuid.uuid4().hex[:12]}"


def make_item(job: str, n: int, **fields) -> Item:
    item_id = hashlib.sha256(f"{job}:{n}".encode()).hexdigest()[:32]
    base = dict(
        item_id=item_id,
        job=job,
        prompt_id=f"p{n // 2:05d}",
        sample_index=n % 2,
        row_number=n // 2,
        prompt=f"prompt {n}",
        seed=n,
        seed_source="derived",
        model="tiny",
        sampler="euler",
        steps=4,
        guidance_scale=7.5,
        width=64,
        height=64,
        status="pending",
    )
    base.update(fields)
    return Item(**base)


def full_item(job: str) -> Item:
    return make_item(
        job,
        7,
        prompt="Sneaker on marble, soft light — «édition» 日本語 🥿",
        negative_prompt="blurry, ☠",
        seed=2**63 - 1,
        seed_source="row",
        model="org/model-x",
        model_revision="0123abcd",
        lora=[{"path": "s3://b/lora.safetensors", "scale": 0.8, "name": "brand"}],
        sampler="dpmpp_2m_karras",
        steps=30,
        guidance_scale=6.25,
        width=1024,
        height=768,
        format="webp",
        campaign="spring-2025",
        sku="SKU-001",
        locale="de-DE",
        tags=["shoe", "hero", "ünïcode"],
        metadata={"colour": "red", "nested": {"list": [1, 2.5, None, True], "empty": {}}, "n": 10**15},
        status="generated",
        decision="review",
        reasons=[{"code": "nsfw_borderline", "score": 0.41, "threshold": 0.4}],
        image_uri="s3://bucket/out/job/ab/abc.webp",
        image_sha256="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        scores={"clip_cosine": 0.31, "nsfw": 0.41, "nsfw_categories": {"porn": 0.1, "hentai": 0.02}, "bias": {}},
        timings={"generate_s": 1.25, "score_s": 0.125},
        error=None,
        attempt=2,
        pixels=np.zeros((4, 4, 3), dtype=np.uint8),
    )


def row_count(store: AuditStore, job: str) -> int:
    with store.engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(ItemRow).where(ItemRow.job == job))


# --- both backends --------------------------------------------------------------------------------------


def test_round_trip_of_a_fully_populated_item(store: AuditStore, job: str):
    item = full_item(job)
    run_id = store.begin_run(job, {"name": job}, {"torch": "2.x"}, {"id": "org/model-x"})
    store.write_items([item], run_id)

    got = store.get_items([item.item_id])[item.item_id]
    assert got == item  # every persisted field (pixels excluded from comparison)
    assert got.as_dict() == item.as_dict()
    assert got.pixels is None  # never stored
    assert type(got.seed) is int and got.seed == 2**63 - 1
    assert type(got.guidance_scale) is float

    [(streamed, created_at)] = list(store.iter_records(job))
    assert streamed == item
    assert created_at.tzinfo is not None and created_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - created_at) < timedelta(minutes=5)


def test_writing_the_same_records_twice_leaves_one_row_each(store: AuditStore, job: str):
    items = [make_item(job, n) for n in range(20)]
    store.write_items(items, None)  # no run yet: the job row is created on the way
    store.write_items(items, None)
    store.write_items(items[:5] + items[:5], None)  # duplicates within one call: last one wins
    assert row_count(store, job) == 20
    assert store.counts(job) == {"pending": 20}


def test_upsert_updates_every_field_and_keeps_created_at(store: AuditStore, job: str):
    run1 = store.begin_run(job, {}, {}, {})
    failed = make_item(job, 1).fail(RuntimeError("CUDA out of memory"), stage="generate")
    store.write_items([failed], run1)
    [(_, first_created)] = list(store.iter_records(job))

    run2 = store.begin_run(job, {}, {}, {})
    done = make_item(job, 1, status="generated", image_uri="file:///x.png", scores={"nsfw": 0.01}, attempt=2)
    store.write_items([done], run2)

    got = store.get_items([done.item_id])[done.item_id]
    assert got == done
    assert got.status == "generated" and got.error is None and got.reasons == []
    [(_, created_again)] = list(store.iter_records(job))
    assert created_again == first_created
    with store.engine.connect() as conn:
        assert conn.scalar(select(ItemRow.run_id).where(ItemRow.item_id == done.item_id)) == run2


def test_counts_by_status(store: AuditStore, job: str):
    statuses = ["generated"] * 5 + ["rejected"] * 3 + ["failed"] * 2 + ["blocked"]
    store.write_items([make_item(job, n, status=s) for n, s in enumerate(statuses)], None)
    assert store.counts(job) == {"generated": 5, "rejected": 3, "failed": 2, "blocked": 1}
    assert store.counts("no-such-job") == {}


def test_iter_items_streams_in_keyset_pages(store: AuditStore, job: str):
    items = [make_item(job, n) for n in range(2500)]
    for start in range(0, len(items), 500):
        store.write_items(items[start : start + 500], None)

    selects: list[str] = []
    listener = lambda conn, cursor, statement, *rest: statement.startswith("SELECT") and selects.append(statement)  # noqa: E731
    event.listen(store.engine, "before_cursor_execute", listener)
    try:
        stream = store.iter_items(job, batch=1000)
        first = next(stream)
        assert len(selects) == 1  # the first page only, not the whole job
        rest = list(stream)
    finally:
        event.remove(store.engine, "before_cursor_execute", listener)

    got = [first, *rest]
    assert [i.item_id for i in got] == sorted(i.item_id for i in items)  # ordered by item_id, none twice
    assert len(selects) == 3  # pages of 1000, 1000, 500
    assert got[1234] == {i.item_id: i for i in items}[got[1234].item_id]


def test_get_items_chunks_more_than_500_ids(store: AuditStore, job: str):
    items = [make_item(job, n) for n in range(1203)]
    store.write_items(items, None)
    wanted = [i.item_id for i in items] + ["0" * 32, "f" * 32]  # two ids with no record
    got = store.get_items(wanted)
    assert set(got) == {i.item_id for i in items}
    assert got[items[700].item_id] == items[700]


def test_runs_begin_and_end(store: AuditStore, job: str):
    first = store.begin_run(job, {"v": 1}, {"torch": "2.5"}, {"id": "tiny", "sha256": {"unet.safetensors": "ab"}})
    store.end_run(first, "failed", {"failed": 3}, {"error": "boom"})
    second = store.begin_run(job, {"v": 2}, {"torch": "2.5"}, {"id": "tiny"}, host="worker-1")
    assert second > first

    runs = store.runs(job)
    assert [r["id"] for r in runs] == [first, second]
    assert (
        runs[0]["status"] == "failed" and runs[0]["counts"] == {"failed": 3} and runs[0]["summary"] == {"error": "boom"}
    )
    assert runs[0]["model_info"] == {"id": "tiny", "sha256": {"unet.safetensors": "ab"}}
    assert runs[0]["ended_at"] >= runs[0]["started_at"]
    assert runs[0]["started_at"].utcoffset() == timedelta(0)
    assert runs[1]["status"] == "running" and runs[1]["ended_at"] is None and runs[1]["host"] == "worker-1"
    with store.engine.connect() as conn:  # the job row holds the latest run's spec
        assert conn.exec_driver_sql(f"SELECT spec FROM jobs WHERE name = '{job}'").scalar() in ({"v": 2}, '{"v": 2}')

    with pytest.raises(AuditStoreError, match="no run with id 999999"):
        store.end_run(999_999, "succeeded", {}, {})
    with pytest.raises(ValueError, match="succeeded, failed"):
        store.end_run(second, "done", {}, {})


def test_values_the_db_cannot_hold_are_refused_on_every_backend(store: AuditStore, job: str):
    with pytest.raises(ValueError, match="prompt contains a NUL"):
        store.write_items([make_item(job, 1, prompt="a\x00b")], None)
    with pytest.raises(ValueError, match="NaN or Infinity"):
        store.write_items([make_item(job, 2, scores={"nsfw": float("nan")})], None)
    assert row_count(store, job) == 0  # the whole call is one transaction
    store.write_items([make_item(job, 3, scores={"nsfw": np.float32(0.5)}, seed=np.int64(5))], None)
    got = next(store.iter_items(job))
    assert got.scores == {"nsfw": 0.5} and got.seed == 5


def _write_from_another_process(url: str, job: str, run_id: int, worker: int, barrier) -> None:
    store = AuditStore(url)
    items = [make_item(job, worker * 1000 + n, status="generated") for n in range(200)]
    barrier.wait(timeout=60)  # all processes write at the same moment
    for start in range(0, 200, 50):
        store.write_items(items[start : start + 50], run_id)
    store.write_items(items[:50], run_id)  # a retried batch overlapping the others
    store.dispose()


def test_concurrent_writer_processes_lose_nothing(store: AuditStore, db_url: str, job: str):
    run_id = store.begin_run(job, {}, {}, {})
    ctx = multiprocessing.get_context("fork")  # fast start; each child opens its own store (no engine crosses)
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=_write_from_another_process, args=(db_url, job, run_id, w, barrier)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 8
    assert row_count(store, job) == 1600
    assert store.counts(job) == {"generated": 1600}
    with store.engine.connect() as conn:  # one item_recorded event per item written, retried batch included
        recorded = select(func.count()).where(EventRow.job == job, EventRow.kind == "item_recorded")
        assert conn.scalar(recorded) == 8 * 250
    report = verify(store)  # one unbroken chain, whatever the interleaving (other tests' events included)
    assert report.ok, report.render()


def _reference_json(obj) -> str:
    """A JSON column's text as SQLAlchemy's JSON type wrote it before write_items bypassed it (plain json.dumps)."""
    return json.dumps(obj, ensure_ascii=False, default=json_default, allow_nan=False)


def _stored_text(conn, ids: list[str]) -> dict[str, tuple]:
    """Each row's persisted columns (not item_id, not the DB timestamps) as the database's own text of them:
    JSON columns byte for byte, numbers with their storage type (SQLite: typeof + quote; PostgreSQL: ::text)."""
    names = [n for n in (*ITEM_FIELDS, "run_id") if n != "item_id"]
    if conn.dialect.name == "sqlite":
        exprs = [f'typeof("{n}") || \':\' || quote("{n}")' for n in names]
    else:
        exprs = [f'"{n}"::text' for n in names]
    marks = ", ".join(["?" if conn.dialect.name == "sqlite" else "%s"] * len(ids))
    sql = f"SELECT item_id, {', '.join(exprs)} FROM items WHERE item_id IN ({marks})"
    return {r[0]: tuple(r[1:]) for r in conn.exec_driver_sql(sql, tuple(ids))}


def test_write_items_stores_byte_for_byte_what_sqlalchemy_core_stores(store: AuditStore, job: str):
    """write_items sends DB-API tuples with its own JSON text; the rows must equal, byte for byte, those written
    through SQLAlchemy Core's JSON type with a plain ``json.dumps`` serializer (what write_items did before)."""
    run_id = store.begin_run(job, {}, {}, {})
    tricky = make_item(
        job,
        3,
        guidance_scale=7,  # an int: stored as a float, as SQLAlchemy's Float stores it
        seed=np.int64(12345),
        prompt='quote " backslash \\ newline \n tab \t ctrl \x01 — 日本語 🥿',
        negative_prompt=None,
        lora=[{"path": "s3://b/l.safetensors", "scale": np.float32(0.75)}],
        tags=("tuple", "of", "tags"),
        metadata={"z": 1, "a": {"nested": [1e-7, 1e22, -0.0, 2**70, True, None]}, "é": "☃", "set": {"b", "a"}},
        scores={"nsfw": np.float64(0.1) + 0.2, "clip": 0.28170001, "arr": np.arange(3), "none": None},
        timings={},
        status="generated",
    )
    first = make_item(job, 5, status="pending", scores={"nsfw": 0.9})
    last = make_item(job, 5, status="generated", decision="pass", scores={"nsfw": 0.01}, attempt=3)
    items = [full_item(job), tricky, first, make_item(job, 4, lora=[], tags=[]), last]  # id 5 twice: the last wins
    store.write_items(items, run_id)

    expected = {item.item_id: _item_to_row(item, run_id) for item in items}
    twin = {item_id: "f" * 8 + item_id[8:] for item_id in expected}  # the same row under another id
    serializer_engine = create_engine(store.url, json_serializer=_reference_json)
    try:
        with serializer_engine.connect() as conn:
            tx = conn.begin()
            conn.execute(insert(ItemRow.__table__), [{**row, "item_id": twin[i]} for i, row in expected.items()])
            written = _stored_text(conn, list(expected))
            reference = _stored_text(conn, list(twin.values()))
            tx.rollback()  # the twins never existed
    finally:
        serializer_engine.dispose()
    assert len(written) == len(reference) == 4
    for item_id in expected:
        assert written[item_id] == reference[twin[item_id]], item_id

    with store.engine.connect() as conn:  # the event of each item holds its canonical record
        payloads = dict(
            conn.execute(
                select(EventRow.item_id, EventRow.payload).where(EventRow.job == job, EventRow.kind == "item_recorded")
            ).all()
        )
    assert set(payloads) == set(expected)
    for item_id, row in expected.items():
        canonical = json.dumps(item_payload(row), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                               allow_nan=False, default=json_default)  # fmt: skip
        assert payloads[item_id] == canonical
    assert store.get_items([last.item_id])[last.item_id] == last
    report = verify(store)
    assert report.ok, report.render()


def test_write_items_retries_a_transient_error_as_one_transaction(store: AuditStore, job: str, monkeypatch):
    """The upsert has run when the events insert fails: the retry starts the transaction again, from the top."""
    items = [make_item(job, n, status="generated") for n in range(6)]
    dialect = store.engine.dialect
    real = dialect.do_executemany
    failed = []

    def flaky(cursor, statement, parameters, context=None):
        if statement.startswith("INSERT INTO events") and not failed:
            failed.append(statement)
            if dialect.name == "sqlite":
                raise sqlite3.OperationalError("database is locked")
            import psycopg

            raise psycopg.errors.SerializationFailure("could not serialize access")
        return real(cursor, statement, parameters, context)

    monkeypatch.setattr(dialect, "do_executemany", flaky)
    store.write_items(items, None)
    assert failed  # it did fail once
    assert row_count(store, job) == 6
    with store.engine.connect() as conn:
        recorded = select(func.count()).where(EventRow.job == job, EventRow.kind == "item_recorded")
        assert conn.scalar(recorded) == 6  # the failed attempt left nothing behind
    report = verify(store)
    assert report.ok, report.render()


# --- SQLite only ----------------------------------------------------------------------------------------


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path):
    path = tmp_path / "db" / "genpipe.db"
    store = AuditStore(f"sqlite:///{path}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    store.dispose()
    with sqlite3.connect(path) as raw:  # WAL is a property of the file: any later reader sees it
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_results_parquet_has_one_row_per_item(tmp_path):
    store = AuditStore(f"sqlite:///{tmp_path}/genpipe.db")
    job = "parquet-job"
    items = [make_item(job, n, scores={"nsfw": n / 1000}, tags=["a", str(n)]) for n in range(1234)]
    items[7] = full_item(job)  # full_item is item number 7
    store.write_items(items, None)

    out = tmp_path / "results.parquet"
    assert write_results_parquet(store, job, out, batch=500) == 1234
    meta = pq.ParquetFile(out)
    assert meta.schema_arrow.equals(RESULTS_SCHEMA, check_metadata=True)
    assert meta.num_row_groups == 3  # written 500 at a time
    table = pq.read_table(out)
    assert table.num_rows == 1234
    assert sorted(table.column("item_id").to_pylist()) == sorted(i.item_id for i in items)

    rows = {r["item_id"]: r for r in table.to_pylist()}
    full = rows[items[7].item_id]
    assert json.loads(full["scores"]) == items[7].scores
    assert json.loads(full["metadata"]) == items[7].metadata
    assert json.loads(full["reasons"]) == items[7].reasons
    assert full["tags"] == items[7].tags and full["seed"] == 2**63 - 1 and full["prompt"] == items[7].prompt
    assert full["created_at"].tzinfo is not None

    empty = tmp_path / "empty.parquet"
    assert write_results_parquet(store, "no-such-job", empty) == 0
    assert pq.read_table(empty).schema.equals(RESULTS_SCHEMA)
    store.dispose()


def test_item_to_record_is_the_public_json_shape():
    item = full_item("j")
    created = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    record = item_to_record(item, created)
    promised = {"item_id", "job", "prompt_id", "prompt", "sample_index", "seed", "model", "sampler", "steps"}
    promised |= {"guidance_scale", "width", "height", "status", "decision", "reasons", "image_uri", "image_sha256"}
    promised |= {"scores", "created_at", "negative_prompt", "campaign", "sku", "locale", "tags", "metadata", "error"}
    assert promised <= set(record) and list(record) == RESULTS_SCHEMA.names
    assert record["created_at"] == "2025-03-01T12:00:00.123456+00:00"
    assert record["scores"]["nsfw_categories"] == {"porn": 0.1, "hentai": 0.02}
    assert json.loads(json.dumps(record)) == record  # plain JSON all the way down
    assert "pixels" not in record and "timings" not in record


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://alice:s3cret-pw@127.0.0.1:1/genpipe", "127.0.0.1:1"),
        ("postgres://alice:s3cret-pw@127.0.0.1:1/genpipe", "Connection refused"),
        ("nosuchdb://alice:s3cret-pw@host/db", "nosuchdb://alice:***@host/db"),
        ("postgresql://alice:s3cret-pw@host:notaport/db", "is not a SQLAlchemy URL"),
    ],
)
def test_unreachable_or_bad_url_raises_one_clear_line_without_the_password(url: str, says: str):
    with pytest.raises(AuditStoreError) as err:
        AuditStore(url)
    message = str(err.value)
    assert says in message
    assert "s3cret-pw" not in message and "\n" not in message


def test_sqlite_directory_that_cannot_be_created(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(AuditStoreError, match="cannot create directory .*a-file/sub: Not a directory"):
        AuditStore(f"sqlite:///{tmp_path}/a-file/sub/genpipe.db")


def test_opening_sqlite_retries_an_immediate_database_is_locked(tmp_path, monkeypatch):
    from sqlalchemy.exc import OperationalError

    original = AuditStore._prepare_schema
    calls = {"n": 0}

    def locked_twice(self, migrate):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OperationalError("PRAGMA journal_mode = WAL", {}, sqlite3.OperationalError("database is locked"))
        return original(self, migrate)

    monkeypatch.setattr(AuditStore, "_prepare_schema", locked_twice)
    store = AuditStore(f"sqlite:///{tmp_path}/a.db")
    assert calls["n"] == 3 and store.counts("none") == {}
    store.dispose()

    calls["n"] = -10  # locked every time: the error is reported, not retried forever
    with pytest.raises(AuditStoreError, match="database is locked"):
        AuditStore(f"sqlite:///{tmp_path}/b.db")
