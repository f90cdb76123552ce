"""``genpipe audit query`` and ``export``: every filter and format, SQL metacharacters as data, bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select, update

from pipeline.audit import AuditStore
from pipeline.audit.formats import QUERY_SCHEMA
from pipeline.audit.query import EXPORT_SCHEMA, QueryFilters, iter_records
from pipeline.audit.schema import ROW_TIMES_FROM_SEQ, AuditSettingRow, EventRow, ItemRow
from pipeline.audit.verify import verify
from pipeline.cli import main
from tests.pg import fresh_database
from tests.test_audit_store import make_item

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
INJECTION = "'; DROP TABLE items; --"

# label: (job, status, pipeline decision, campaign, prompt, scores)
ITEMS = {
    0: (
        "A",
        "generated",
        "pass",
        "spring",
        "red mug on a table",
        {"nsfw": 0.05, "clipscore": 0.31, "clip_cosine": 0.29},
    ),
    1: ("A", "generated", "review", "spring", "100% cotton shirt", {"nsfw": 0.55, "clipscore": 0.18}),
    2: ("A", "blocked", "block", "summer", "snake_case banner", {"nsfw": 0.95, "clipscore": 0.3}),
    3: ("A", "rejected", None, None, INJECTION, {}),
    4: (
        "B",
        "generated",
        "pass",
        "spring",
        'say " OR 1=1',
        {"nsfw": 0.10, "clipscore": 0.15, "nsfw_categories": {"porn": 0.02}},
    ),  # fmt: skip
    5: (
        "B",
        "generated",
        "review",
        "日本",
        "Café «crème» 日本語 🥿",
        {"nsfw": 0.45, "clipscore": 0.25, "bias": {"gender": 0.5}, "note": "n/a"},
    ),  # fmt: skip
    6: ("it's", "generated", "pass", None, "plain", {"nsfw": 0.2}),
    7: ("B", "failed", None, None, "x", {}),
}
DATES = {
    0: "2026-01-10T08:00:00",
    1: "2026-01-10T09:00:00",
    2: "2026-02-15T12:00:00",
    3: "2026-02-15T12:00:00",
    4: "2026-02-15T12:00:00",
}  # fmt: skip   (others: the DB clock, later)


class Dataset:
    def __init__(self, url: str) -> None:
        self.url = url
        store = AuditStore(url)
        self.ids: dict[int, str] = {}
        for n, (job, status, decision, campaign, prompt, scores) in ITEMS.items():
            item = make_item(job, n, status=status, decision=decision, campaign=campaign, prompt=prompt, scores=scores)
            if status == "generated":
                item.image_uri, item.image_sha256 = f"/images/{n}.png", f"{n:064d}"
            store.write_items([item], None)
            self.ids[n] = item.item_id
        store.add_reviewer("alice", "admin")
        store.add_reviewer("bob")
        store.record_review([self.ids[0]], "reject", "alice", "nsfw_confirmed", "not for a catalogue")
        store.record_review([self.ids[1]], "approve", "bob", "false_positive")
        store.record_review([self.ids[5]], "escalate", "bob", "brand_risk")
        store.record_review([self.ids[4]], "comment", "alice", text="fine")
        with store.engine.begin() as conn:  # created_at is the DB clock of the first write; set some in the past
            for n, when in DATES.items():
                at = datetime.fromisoformat(when).replace(tzinfo=UTC)
                conn.execute(update(ItemRow).where(ItemRow.item_id == self.ids[n]).values(created_at=at))
            # Times set by hand are what rows from before revision 0005 hold: its migration records the chain head
            # then, and only rows recorded after it must carry their events' times. These rows are such rows.
            head = conn.scalar(select(func.max(EventRow.seq)))
            conn.execute(
                update(AuditSettingRow).where(AuditSettingRow.name == ROW_TIMES_FROM_SEQ).values(value=str(head))
            )
        store.dispose()
        self.label = {v: k for k, v in self.ids.items()}


@pytest.fixture(scope="module", params=BACKENDS)
def data(request: pytest.FixtureRequest, tmp_path_factory):
    if request.param == "sqlite":
        yield Dataset(f"sqlite:///{tmp_path_factory.mktemp('query')}/audit.db")
        return
    with fresh_database() as url:
        yield Dataset(url)


def query(data: Dataset, capsys, *args: str) -> tuple[int, str, str]:
    code = main(["audit", "query", "--db", data.url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def labels(data: Dataset, capsys, *args: str) -> list[int]:
    code, out, err = query(data, capsys, *args, "--format", "json")
    assert code == 0, err
    return [data.label[r["item_id"]] for r in json.loads(out)]


FILTERS = [
    ([], {0, 1, 2, 3, 4, 5, 6, 7}),
    (["--job", "A"], {0, 1, 2, 3}),
    (["--job", "A", "--job", "B"], {0, 1, 2, 3, 4, 5, 7}),
    (["--job", "it's"], {6}),
    (["--campaign", "spring"], {0, 1, 4}),
    (["--campaign", "日本"], {5}),
    (["--status", "generated"], {0, 1, 4, 5, 6}),
    (["--status", "failed", "--status", "rejected"], {3, 7}),
    (["--decision", "rejected"], {0}),
    (["--decision", "approved"], {1}),
    (["--decision", "pass"], {4, 6}),
    (["--decision", "escalated"], {5}),
    (["--decision", "block"], {2}),
    (["--decision", "review"], set()),
    (["--decision", "none"], {3, 7}),
    (["--decision", "pass", "--decision", "approved", "--status", "generated"], {1, 4, 6}),
    (["--min-nsfw", "0.5"], {1, 2}),
    (["--max-nsfw", "0.1"], {0, 4}),  # inclusive
    (["--min-nsfw", "0.1", "--max-nsfw", "0.5"], {4, 5, 6}),
    (["--max-clipscore", "0.2"], {1, 4}),
    (["--min-clip-cosine", "0.2"], {0}),
    (["--min-score", "nsfw_categories.porn=0.01"], {4}),
    (["--min-score", "bias.gender=0.5", "--max-score", "bias.gender=0.5"], {5}),
    (["--reviewer", "bob"], {1, 5}),
    (["--reviewer", "alice"], {0, 4}),  # a comment is a review too
    (["--since", "2026-02-01"], {2, 3, 4, 5, 6, 7}),
    (["--until", "2026-01-31"], {0, 1}),
    (["--since", "2026-02-15", "--until", "2026-02-15"], {2, 3, 4}),  # a date --until includes the day
    (["--since", "2026-01-10T08:30:00+00:00", "--until", "2026-01-10T09:00:00Z"], {1}),
    (["--search", "MUG"], {0}),
    (["--search", "%"], {1}),
    (["--search", "_"], {2}),
    (["--search", INJECTION], {3}),
    (["--search", '" OR 1=1'], {4}),
    (["--search", "«crème» 日本語"], {5}),
    (["--search", "CAFÉ «CRÈME»"], {5}),  # case folds beyond ASCII on SQLite too
    (["--job", "A", "--campaign", "spring", "--min-nsfw", "0.5"], {1}),
]


@pytest.mark.parametrize(("args", "expected"), FILTERS, ids=[" ".join(a) or "all" for a, _ in FILTERS])
def test_each_filter_selects_exactly_the_matching_records(data: Dataset, capsys, args: list[str], expected: set):
    got = labels(data, capsys, *args)
    assert len(got) == len(set(got)) and set(got) == expected


INJECTIONS = [INJECTION, "' OR '1'='1", '" OR 1=1 --', "%", "_", "\\", "a'b", "1; SELECT 1", "ünï'cödé\u2028", "*"]


@pytest.mark.parametrize("flag", ["--job", "--campaign", "--reviewer", "--search"])
def test_sql_metacharacters_in_every_text_filter_are_data(data: Dataset, capsys, flag: str):
    for value in INJECTIONS:
        got = labels(data, capsys, flag, value)
        # --search is a literal, case-insensitive substring (% and _ are no wildcards); the others match exactly
        expected = [n for n, spec in ITEMS.items() if value.lower() in spec[4].lower()] if flag == "--search" else []
        assert got == expected, (flag, value)
    store = AuditStore(data.url, migrate=False)
    with store.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(ItemRow)) == len(ITEMS)
    assert verify(store).ok
    store.dispose()


def test_sort_and_limit(data: Dataset, capsys):
    assert labels(data, capsys, "--sort", "nsfw", "--desc", "--limit", "3") == [2, 1, 5]
    assert labels(data, capsys, "--sort", "clipscore", "--limit", "2") == [4, 1]
    by_date = labels(data, capsys, "--sort", "created_at", "--status", "generated")
    assert by_date[:2] == [0, 1] and set(by_date[2:]) == {4, 5, 6}
    # approved < block < rejected, and no decision (NULL) last on both backends
    assert labels(data, capsys, "--sort", "decision", "--job", "A") == [1, 2, 0, 3]
    assert labels(data, capsys, "--sort", "decision", "--job", "A", "--desc") == [0, 2, 1, 3]
    assert labels(data, capsys, "--sort", "reviewed_at", "--limit", "3") == [0, 1, 5]
    ids = labels(data, capsys)
    assert [data.ids[n] for n in ids] == sorted(data.ids.values())  # default: item_id


def test_json_records_carry_the_design_fields_scores_and_review(data: Dataset, capsys):
    code, out, _ = query(data, capsys, "--format", "json")
    records = {data.label[r["item_id"]]: r for r in json.loads(out)}
    promised = {"item_id", "job", "prompt_id", "prompt", "sample_index", "seed", "model", "sampler", "steps",
                "guidance_scale", "width", "height", "status", "decision", "reasons", "image_uri", "image_sha256",
                "scores", "created_at", "effective_decision", "review"}  # fmt: skip
    assert all(promised <= set(r) for r in records.values())
    assert records[4]["scores"] == ITEMS[4][5] and records[5]["prompt"] == ITEMS[5][4]
    assert records[0]["decision"] == "pass" and records[0]["effective_decision"] == "rejected"
    review = records[0]["review"]
    assert review["reviewer"] == "alice" and review["reason_code"] == "nsfw_confirmed" and review["state"] == "rejected"
    assert review["text"] == "not for a catalogue" and datetime.fromisoformat(review["at"]).tzinfo is not None
    assert records[4]["review"] is None  # comments do not decide
    assert records[0]["created_at"] == "2026-01-10T08:00:00+00:00"


def test_csv_table_and_parquet_formats(data: Dataset, capsys, tmp_path):
    code, out, _ = query(data, capsys, "--format", "csv", "--job", "B")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and {data.label[r["item_id"]] for r in rows} == {4, 5, 7}
    five = next(r for r in rows if data.label[r["item_id"]] == 5)
    assert json.loads(five["scores"]) == ITEMS[5][5] and five["review_reviewer"] == "bob"
    assert five["effective_decision"] == "escalated" and five["prompt"] == ITEMS[5][4]

    code, out, _ = query(data, capsys, "--format", "table", "--job", "B")
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["item_id", "job", "prompt_id", "status", "decision"]
    assert data.ids[5] in out and "escalated" in out and lines[-1] == "(3 records)"

    target = tmp_path / "sub" / "q.parquet"
    code, _, err = query(data, capsys, "--format", "parquet", "--out", str(target), "--min-nsfw", "0.4")
    assert code == 0 and "3 records written" in err
    table = pq.read_table(target)
    assert table.schema.equals(QUERY_SCHEMA) and table.num_rows == 3
    assert {data.label[i] for i in table.column("item_id").to_pylist()} == {1, 2, 5}

    json_out = tmp_path / "q.json"
    assert query(data, capsys, "--format", "json", "--out", str(json_out), "--status", "failed")[0] == 0
    assert [r["item_id"] for r in json.loads(json_out.read_text())] == [data.ids[7]]
    assert query(data, capsys, "--format", "json", "--job", "nobody")[1] == "[]\n"


def test_export_writes_only_approved_and_auto_passed_images(data: Dataset, capsys, tmp_path):
    out = tmp_path / "publish" / "approved.parquet"
    assert main(["audit", "export", "--db", data.url, "--approved", "--out", str(out)]) == 0
    assert "3 approved and auto-passed images" in capsys.readouterr().out
    table = pq.read_table(out)
    assert table.schema.remove_metadata().equals(EXPORT_SCHEMA)
    rows = {data.label[r["item_id"]]: r for r in table.to_pylist()}
    assert set(rows) == {1, 4, 6}  # 0 was rejected after passing, 5 is escalated, 2 blocked
    assert rows[1]["effective_decision"] == "approved" and rows[1]["review_reviewer"] == "bob"
    assert rows[4]["effective_decision"] == "pass" and rows[4]["image_sha256"] == f"{4:064d}"
    head = json.loads(table.schema.metadata[b"genpipe.chain_head"])
    store = AuditStore(data.url, migrate=False)
    assert (head["seq"], head["hash"]) == store.chain_head()
    assert verify(store).ok  # queries and exports never write
    store.dispose()
    assert main(["audit", "export", "--db", data.url, "--approved", "--job", "B", "--out", str(out)]) == 0
    assert [data.label[i] for i in pq.read_table(out).column("item_id").to_pylist()] == [4]


def test_iter_records_is_the_same_query_for_python_callers(data: Dataset):
    store = AuditStore(data.url, migrate=False)
    records = list(iter_records(store, QueryFilters(decisions=["escalated", "review"], statuses=["generated"])))
    store.dispose()
    assert [data.label[r["item_id"]] for r in records] == [5]


BAD = [
    (["--since", "2026-13-01"], "argument --since: '2026-13-01' is not an ISO 8601 date"),
    (["--until", "yesterday"], "argument --until: 'yesterday' is not an ISO 8601 date"),
    (["--min-nsfw", "abc"], "argument --min-nsfw: 'abc' is not a number"),
    (["--max-clipscore", "nan"], "argument --max-clipscore: 'nan' is not a finite number"),
    (["--min-score", "nsfw"], "argument --min-score: 'nsfw': expected KEY=VALUE"),
    (["--min-score", "Bad-Key=1"], "argument --min-score: score key 'Bad-Key'"),
    (["--status", "done"], "argument --status: invalid choice: 'done'"),
    (["--decision", INJECTION], "argument --decision: invalid choice"),
    (["--sort", INJECTION], 'argument --sort: "\'; DROP TABLE items; --": sort by one of'),
    (["--limit", "0"], "argument --limit: 0 is not between 1 and 9223372036854775807"),
    (["--limit", "9" * 20], "argument --limit: 99999999999999999999 is not between 1 and"),  # not an OverflowError
    (["--format", "xml"], "argument --format: invalid choice: 'xml'"),
]


@pytest.mark.parametrize(("args", "says"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_malformed_arguments_exit_2_naming_the_flag(data: Dataset, capsys, args: list[str], says: str):
    with pytest.raises(SystemExit) as exc:
        main(["audit", "query", "--db", data.url, *args])
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


USER_ERRORS = [
    (["--min-score", "note=0"], "--min-score: unknown score key 'note': no item has a number under it"),  # text only
    (["--min-score", "aesthetics_v2=1"], "--min-score: unknown score key 'aesthetics_v2': no item has a number"),
    (["--min-nsfw", "0.9", "--max-nsfw", "0.1"], "--min-nsfw/--max-nsfw: the range for 'nsfw' is empty"),
    (["--sort", "no_such_score"], "--sort 'no_such_score': must be one of"),
    (["--since", "2026-03-01", "--until", "2026-02-01"], "--since/--until: the date range is empty"),
]


@pytest.mark.parametrize(("args", "says"), USER_ERRORS, ids=[" ".join(a) for a, _ in USER_ERRORS])
def test_unknown_values_are_one_line_errors(data: Dataset, capsys, args: list[str], says: str, tmp_path):
    code, out, err = query(data, capsys, *args, "--out", str(tmp_path / "x.json"))
    assert code == 2 and out == ""
    assert err.startswith(f"genpipe: error: {says}") and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()  # nothing half-written


def test_parquet_needs_an_output_file(data: Dataset, capsys):
    code, out, err = query(data, capsys, "--format", "parquet")
    assert code == 2 and out == "" and err == "genpipe: error: --format parquet needs --out PATH_OR_URL " \
        "(Parquet is not written to a terminal)\n"  # fmt: skip


def test_an_unreachable_database_is_one_line(capsys):
    assert main(["audit", "query", "--db", "postgresql://reviewer:pw@127.0.0.1:1/audit"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genpipe: error: cannot open audit DB") and err.count("\n") == 1 and ":pw@" not in err


def test_output_paths_name_the_file_they_write(tmp_path, monkeypatch):
    from pipeline.audit.formats import OutputError, open_output

    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    for bad, says in (("folder", "is a directory"), (str(tmp_path / "folder"), "is a directory"),
                      (".", "not a file name"), ("..", "not a file name"), ("x/..", "not a file name"),
                      ("sub/", "not a file name")):  # fmt: skip
        with pytest.raises(OutputError, match=says), open_output(bad, binary=True) as f:
            f.write(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"] and not any((tmp_path / "folder").iterdir())
    with open_output(f"file://{tmp_path}/via-url.csv", binary=False) as f:
        f.write("a\n")
    assert (tmp_path / "via-url.csv").read_text() == "a\n"
    top = f"/genpipe-test-{tmp_path.name}.csv"  # a file right under / lands there, not in the working directory
    try:
        with open_output(top, binary=False) as f:
            f.write("b\n")
    except OutputError:
        pytest.skip("/ is not writable here")
    try:
        assert Path(top).read_text() == "b\n" and not (tmp_path / top.lstrip("/")).exists()
    finally:
        os.remove(top)


def test_csv_cells_a_spreadsheet_would_run_are_text(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/audit.db"
    store = AuditStore(url)
    formula = '=HYPERLINK("http://evil.example","click")'
    store.write_items([make_item("J", 0, prompt=formula, campaign="@SUM(A1)", prompt_id="-p"),
                       make_item("J", 1, prompt="a = b + c", campaign="+spring")], None)  # fmt: skip
    store.dispose()
    assert main(["audit", "query", "--db", url, "--format", "csv", "--sort", "prompt_id"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    cells = [(r["prompt"], r["campaign"], r["prompt_id"]) for r in rows]
    assert ("'" + formula, "'@SUM(A1)", "'-p") in cells and ("a = b + c", "'+spring", "p00000") in cells
    assert main(["audit", "query", "--db", url, "--format", "json"]) == 0  # JSON keeps every value as it is
    assert formula in {r["prompt"] for r in json.loads(capsys.readouterr().out)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_since_and_until_at_a_records_own_time_include_it(backend, tmp_path, capsys):
    # Records timed by the DB clock (SQLite keeps milliseconds, as text) are found by their own time either way.
    with contextlib.ExitStack() as stack:
        url = f"sqlite:///{tmp_path}/audit.db" if backend == "sqlite" else stack.enter_context(fresh_database())
        store = AuditStore(url)
        store.write_items([make_item("J", 0)], None)
        with store.engine.connect() as conn:
            at = conn.execute(select(ItemRow.created_at)).scalar_one()
        store.dispose()
        ms = timedelta(milliseconds=1)

        def found(*args: str) -> int:
            assert main(["audit", "query", "--db", url, "--format", "json", *args]) == 0
            return len(json.loads(capsys.readouterr().out))

        stamp = at.isoformat()
        assert found("--since", stamp) == found("--until", stamp) == found("--since", stamp, "--until", stamp) == 1
        assert found("--since", (at + ms).isoformat()) == found("--until", (at - ms).isoformat()) == 0
        day = at.date()
        assert found("--until", day.strftime("%Y%m%d")) == found("--since", day.isoformat()) == 1  # whole days
        assert found("--until", (day - timedelta(days=1)).strftime("%Y%m%d")) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_export_is_one_state_of_the_log_even_when_a_review_lands_meanwhile(backend, tmp_path, monkeypatch):
    import pipeline.audit.query as query_module
    from pipeline.audit.query import export_approved

    with contextlib.ExitStack() as stack:
        url = f"sqlite:///{tmp_path}/audit.db" if backend == "sqlite" else stack.enter_context(fresh_database())
        store = AuditStore(url)
        stack.callback(store.dispose)
        item = make_item("J", 0, status="generated", decision="pass", image_uri="/i/0.png", image_sha256="0" * 64)
        store.write_items([item], None)
        store.add_reviewer("alice", "admin")
        real_head = query_module.chain_head

        def head_then_a_review(conn):
            head = real_head(conn)
            other = AuditStore(url)  # another reviewer rejects the image between the two reads
            other.record_review([item.item_id], "reject", "alice", "nsfw_confirmed")
            other.dispose()
            return head

        monkeypatch.setattr(query_module, "chain_head", head_then_a_review)
        before = store.chain_head()
        assert export_approved(store, str(tmp_path / "approved.parquet")) == 1  # the state the head names
        meta = pq.read_schema(tmp_path / "approved.parquet").metadata[b"genpipe.chain_head"]
        assert json.loads(meta) == {"seq": before[0], "hash": before[1]} and store.chain_head()[0] == before[0] + 1
