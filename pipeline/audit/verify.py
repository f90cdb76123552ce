"""``genpipe audit verify``: check the event chain, the current rows against it, the images and the anchors.

All reads happen in one read transaction (a consistent snapshot; writers go on meanwhile), in four passes:

1. chain — events in seq order: seq 1, 2, 3, ... without gaps; each ``prev_hash`` is the previous hash;
   each hash recomputes from the stored columns; review events name the reviewer the chain knows.
2. state — every current row equals the payload of its latest event: ``items`` (paged, in SQL: an edited
   score, a deleted row, a row nobody recorded), ``runs``, ``jobs.spec`` and ``reviewers``; and, for rows
   first recorded after ``audit_settings.row_times_from_seq`` (migration 0005), an item's ``created_at`` and a
   run's ``started_at`` / ``ended_at`` equal the time of their events (what ``audit query`` shows and filters on).
3. images (``--images``) — every generated item's image exists and has the recorded sha256.
4. anchors (``--anchor``) — each anchored (seq, hash) is still in the chain (catches a cut-off tail, or a
   chain rewritten from some point on).

Problems are reported in that order (within a pass, by seq or item id); the first one is "the first bad
record". Editing, deleting or reordering any single row, or replacing or deleting an image, is always caught.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, exists, func, or_, select

from pipeline.audit.anchor import ANCHOR_FORMAT, read_anchor
from pipeline.audit.chain import (
    EVENT_KINDS,
    GENESIS_HASH,
    ITEM_FIELDS,
    ITEM_RECORDED,
    REVIEW_KINDS,
    REVIEWER_ADDED,
    REVIEWER_UPDATED,
    RUN_ENDED,
    RUN_STARTED,
    canonical_json,
    event_hash,
    item_payload,
    reviewer_payload,
    run_payload,
)
from pipeline.audit.schema import ROW_TIMES_FROM_SEQ, EventRow, ItemRow, JobRow, ReviewerRow, RunRow
from pipeline.audit.store import row_times_setting
from pipeline.storage import open_input, retry
from schemas.record import SUPERSEDED

_events = EventRow.__table__
_items = ItemRow.__table__
_jobs = JobRow.__table__
_runs = RunRow.__table__
_reviewers = ReviewerRow.__table__

_PAGE = 1000
_IMAGE_THREADS = 8


@dataclass
class Problem:
    check: str  # chain | items | runs | jobs | reviewers | images | anchors
    message: str
    seq: int | None = None
    item_id: str | None = None

    def __str__(self) -> str:
        where = [f"event seq {self.seq}"] if self.seq is not None else []
        where += [f"item {self.item_id}"] if self.item_id is not None else []
        return f"{', '.join(where) or self.check}: {self.message}"


@dataclass
class VerifyReport:
    max_problems: int = 20
    events: int = 0
    head: tuple[int, str] | None = None
    items: int = 0
    runs: int = 0
    images: int | None = None  # checked; None when not asked
    anchors: int = 0
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    @property
    def first(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def add(self, problem: Problem) -> None:
        self.problem_count += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(problem)

    def render(self) -> str:
        checked = f"{self.events} events, {self.items} items, {self.runs} runs"
        if self.images is not None:
            checked += f", {self.images} images"
        if self.anchors:
            checked += f", {self.anchors} anchor{'s' * (self.anchors > 1)}"
        if self.ok:
            seq, digest = self.head or (0, GENESIS_HASH)
            return f"audit chain OK: {checked} checked; head seq {seq} hash {digest}"
        lines = [
            f"audit chain FAILED: {self.problem_count} problem{'s' * (self.problem_count > 1)} ({checked} checked)",
            f"first bad record: {self.problems[0]}",
        ]
        lines += [f"  - {p}" for p in self.problems[1:]]
        if self.problem_count > len(self.problems):
            lines.append(f"  ... and {self.problem_count - len(self.problems)} more")
        return "\n".join(lines)


def verify(store: Any, *, images: bool = False, anchors: tuple[str, ...] = (), max_problems: int = 20) -> VerifyReport:
    """Run every check on ``store``'s database; see the module docstring. Never raises for tampering."""
    report = VerifyReport(max_problems=max_problems)
    anchor_docs = [(url, read_anchor(url)) for url in anchors]  # unreadable: AnchorError before any work
    with store.snapshot() as conn:  # one snapshot for every pass
        chain = _check_chain(conn, report)
        _check_items(conn, report, chain.times_from)
        _check_runs_jobs_reviewers(conn, report, chain)
        if images:
            _check_images(conn, report)
        for url, doc in anchor_docs:
            _check_anchor(conn, report, chain, url, doc)
    return report


# --- pass 1: the chain -------------------------------------------------------------------------------------


@dataclass
class _ChainState:
    """What pass 2 needs from the (hash-checked) chain about the small tables."""

    runs: dict[int, tuple[int, Any]] = field(default_factory=dict)  # run id -> (seq, payload["run"])
    specs: dict[str, tuple[int, Any]] = field(default_factory=dict)  # job -> (seq, spec of its latest run)
    reviewers: dict[int, tuple[int, Any]] = field(default_factory=dict)  # id -> (seq, payload["reviewer"])
    # Row timestamps are checked for rows first recorded after this seq (audit_settings.row_times_from_seq)
    times_from: int = 0
    times_text: str | None = None  # audit_settings.row_times_from_seq as stored (the anchors compare it)
    # run id -> [run_started time, latest run_ended time], for runs started after times_from
    run_times: dict[int, list[Any]] = field(default_factory=dict)


def _pages(conn: Connection, query: Any, key: Any) -> Iterator[Any]:
    """Rows of ``query`` in keyset pages on the unique ``key`` column (within the caller's transaction)."""
    last = None
    while True:
        page = query.order_by(key).limit(_PAGE)
        if last is not None:
            page = page.where(key > last)
        rows = conn.execute(page).mappings().all()
        yield from rows
        if len(rows) < _PAGE:
            return
        last = rows[-1][key.key]


def _check_chain(conn: Connection, report: VerifyReport) -> _ChainState:
    state = _ChainState()
    bound = state.times_text = row_times_setting(conn)
    if bound is None or not bound.isdigit():
        report.add(Problem("chain", f"audit_settings.{ROW_TIMES_FROM_SEQ} is {bound!r}, not a seq: it was edited"))
    else:
        state.times_from = int(bound)
    expected, prev = 1, GENESIS_HASH
    for row in _pages(conn, select(_events), _events.c.seq):
        seq, item_id = row["seq"], row["item_id"]
        report.events += 1
        if seq != expected:
            gone = f"seq {expected}" if seq == expected + 1 else f"seqs {expected}-{seq - 1}"
            report.add(Problem("chain", f"events missing before it ({gone}): deleted", seq, item_id))
        elif row["prev_hash"] != prev:
            report.add(Problem("chain", f"prev_hash does not match the hash of event seq {seq - 1}: "
                                        "events reordered, replaced or re-hashed", seq, item_id))  # fmt: skip
        recomputed = event_hash(row)
        if recomputed != row["hash"]:
            report.add(Problem("chain", f"hash mismatch (stored {row['hash'][:16]}..., recomputed "
                                        f"{recomputed[:16]}...): the event was edited", seq, item_id))  # fmt: skip
        expected, prev = seq + 1, row["hash"]
        report.head = (seq, row["hash"])
        _note_event(row, state, report)
    if report.events == 0:
        report.add(Problem("chain", "the events table is empty: the whole chain was deleted"))
    return state


def _note_event(row: Any, state: _ChainState, report: VerifyReport) -> None:
    kind, seq = row["kind"], row["seq"]
    if kind not in EVENT_KINDS:
        report.add(Problem("chain", f"unknown event kind {kind!r}", seq, row["item_id"]))
        return
    try:
        payload = json.loads(row["payload"])
    except ValueError:
        report.add(Problem("chain", "payload is not JSON", seq, row["item_id"]))
        return
    if kind in (RUN_STARTED, RUN_ENDED):
        state.runs[row["run_id"]] = (seq, payload.get("run"))
        if kind == RUN_STARTED:
            state.specs[row["job"]] = (seq, payload.get("spec"))
            if seq > state.times_from:
                state.run_times[row["run_id"]] = [row["created_at"], None]
        elif row["run_id"] in state.run_times:
            state.run_times[row["run_id"]][1] = row["created_at"]
    elif kind in (REVIEWER_ADDED, REVIEWER_UPDATED):
        state.reviewers[row["reviewer_id"]] = (seq, payload.get("reviewer"))
    elif kind in REVIEW_KINDS:
        known = state.reviewers.get(row["reviewer_id"])
        if known is None or not isinstance(known[1], dict) or known[1].get("name") != payload.get("reviewer"):
            report.add(Problem("chain", f"review by {payload.get('reviewer')!r} (reviewer id {row['reviewer_id']}) "
                                        "names no reviewer the chain added", seq, row["item_id"]))  # fmt: skip


# --- pass 2: current rows against their latest events -----------------------------------------------------


def _diff(current: dict[str, Any], recorded: Any) -> list[str]:
    if not isinstance(recorded, dict):
        return ["(the recorded payload is not an object)"]
    names = sorted(set(current) | set(recorded))
    return [n for n in names if canonical_json(current.get(n)) != canonical_json(recorded.get(n))]


def _check_items(conn: Connection, report: VerifyReport, times_from: int) -> None:
    recorded = select(_events.c.item_id).where(_events.c.kind == ITEM_RECORDED)
    unrecorded = ~exists(recorded.where(_events.c.item_id == _items.c.item_id))
    count = conn.scalar(select(func.count()).select_from(_items).where(unrecorded))
    if count:
        query = select(_items.c.item_id).where(unrecorded).order_by(_items.c.item_id).limit(report.max_problems)
        ids = conn.execute(query).scalars().all()
        for item_id in ids:
            report.add(Problem("items", "has no item_recorded event: the row was written outside the audit log",
                               item_id=item_id))  # fmt: skip
        report.problem_count += count - len(ids)

    latest_seq = func.max(_events.c.seq)
    row_exists = exists(select(_items.c.item_id).where(_items.c.item_id == _events.c.item_id))
    orphans = (
        select(_events.c.item_id, latest_seq)
        .where(_events.c.kind == ITEM_RECORDED, ~row_exists)
        .group_by(_events.c.item_id)
        .order_by(latest_seq)
    )
    for item_id, seq in conn.execute(orphans):
        report.add(Problem("items", "the item's row is missing from items (deleted)", seq, item_id))

    cols = [_items.c[name] for name in ITEM_FIELDS] + [_items.c.run_id, _items.c.created_at]
    page: list[Any] = []
    for row in _pages(conn, select(*cols), _items.c.item_id):
        page.append(row)
        if len(page) == _PAGE:
            _compare_items(conn, report, page, times_from)
            page = []
    _compare_items(conn, report, page, times_from)


def _compare_items(conn: Connection, report: VerifyReport, rows: list[Any], times_from: int) -> None:
    if not rows:
        return
    report.items += len(rows)
    ids = [r["item_id"] for r in rows]
    # created_at is the time of the item's first record (what `audit query --since` shows and filters on)
    first = select(func.min(_events.c.seq)).where(_events.c.kind == ITEM_RECORDED, _events.c.item_id.in_(ids))
    query = select(_events.c.item_id, _events.c.seq, _events.c.created_at).where(
        _events.c.seq.in_(first.group_by(_events.c.item_id)), _events.c.seq > times_from
    )
    by_id = {r["item_id"]: r for r in rows}
    for item_id, seq, recorded_at in conn.execute(query).all():
        row = by_id[item_id]
        if row["created_at"] != recorded_at:
            report.add(Problem("items", f"created_at {row['created_at'].isoformat()} differs from the time of "
                                        f"its first record, {recorded_at.isoformat()}", seq, item_id))  # fmt: skip
    last = select(func.max(_events.c.seq)).where(_events.c.kind == ITEM_RECORDED, _events.c.item_id.in_(ids))
    query = select(_events.c.item_id, _events.c.seq, _events.c.payload).where(
        _events.c.seq.in_(last.group_by(_events.c.item_id))
    )
    latest = {r.item_id: (r.seq, r.payload) for r in conn.execute(query)}
    for row in rows:
        if row["item_id"] not in latest:
            continue  # reported above as unrecorded
        seq, payload = latest[row["item_id"]]
        current = item_payload(row)
        if canonical_json(current) != payload:
            fields = ", ".join(_diff(current, json.loads(payload)))
            report.add(Problem("items", f"items row differs from its latest record in: {fields}", seq, row["item_id"]))


def _check_runs_jobs_reviewers(conn: Connection, report: VerifyReport, chain: _ChainState) -> None:
    runs = {r["id"]: r for r in conn.execute(select(_runs).order_by(_runs.c.id)).mappings()}
    report.runs = len(runs)
    for run_id, row in runs.items():
        _compare("runs", report, f"run {run_id}", run_payload(row), chain.runs.get(run_id))
        if run_id in chain.run_times:
            for column, recorded_at in zip(("started_at", "ended_at"), chain.run_times[run_id], strict=True):
                if row[column] != recorded_at:
                    shown = row[column].isoformat() if row[column] is not None else "null"
                    when = recorded_at.isoformat() if recorded_at is not None else "none (no run_ended event)"
                    report.add(Problem("runs", f"run {run_id}: {column} {shown} differs from its event's time, "
                                               f"{when}", chain.runs[run_id][0]))  # fmt: skip
    for run_id, (seq, _) in chain.runs.items():
        if run_id not in runs:
            report.add(Problem("runs", f"run {run_id} is missing from runs (deleted)", seq))

    for name, spec in conn.execute(select(_jobs.c.name, _jobs.c.spec).order_by(_jobs.c.name)):
        recorded = chain.specs.get(name)
        if recorded is None:
            if spec is not None:
                report.add(Problem("jobs", f"job {name!r} has a spec but no run_started event recorded one"))
        elif canonical_json(spec) != canonical_json(recorded[1]):
            report.add(Problem("jobs", f"job {name!r}: spec differs from the one its latest run recorded", recorded[0]))

    people = {r["id"]: r for r in conn.execute(select(_reviewers).order_by(_reviewers.c.id)).mappings()}
    for rid, row in people.items():
        _compare("reviewers", report, f"reviewer {row['name']!r}", reviewer_payload(row), chain.reviewers.get(rid))
    for rid, (seq, _) in chain.reviewers.items():
        if rid not in people:
            report.add(Problem("reviewers", f"reviewer id {rid} is missing from reviewers (deleted)", seq))


def _compare(check: str, report: VerifyReport, what: str, current: dict, recorded: tuple[int, Any] | None) -> None:
    if recorded is None:
        report.add(Problem(check, f"{what} has no event: the row was written outside the audit log"))
    elif canonical_json(current) != canonical_json(recorded[1]):
        fields = ", ".join(_diff(current, recorded[1]))
        report.add(Problem(check, f"{what} differs from its latest record in: {fields}", recorded[0]))


# --- pass 3: images ---------------------------------------------------------------------------------------------


def _sha256_of(uri: str) -> str | None:
    def read() -> str:
        digest = hashlib.sha256()
        with open_input(uri) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    try:
        return retry(read, what=f"read {uri}")
    except FileNotFoundError:
        return None


def _check_images(conn: Connection, report: VerifyReport) -> None:
    report.images = 0
    # Generated images, and those of records superseded by a rerun with other settings (moved under superseded/).
    query = select(_items.c.item_id, _items.c.image_uri, _items.c.image_sha256).where(
        or_(_items.c.status == "generated", and_(_items.c.status == SUPERSEDED, _items.c.image_sha256.is_not(None)))
    )
    with ThreadPoolExecutor(_IMAGE_THREADS) as pool:
        page: list[Any] = []
        for row in _pages(conn, query, _items.c.item_id):
            page.append(row)
            if len(page) == _PAGE:
                _hash_page(pool, report, page)
                page = []
        _hash_page(pool, report, page)


def _hash_page(pool: ThreadPoolExecutor, report: VerifyReport, rows: list[Any]) -> None:
    def check(row: Any) -> str | None:
        uri, recorded = row["image_uri"], row["image_sha256"]
        if not uri or not recorded:
            return "generated but no image_uri / image_sha256 recorded"
        try:
            found = _sha256_of(uri)
        except (OSError, ValueError) as exc:
            return f"image {uri} cannot be read: {exc}"
        if found is None:
            return f"image missing: {uri}"
        if found != recorded:
            return (
                f"image {uri} does not match its recorded sha256 (recorded {recorded[:16]}..., found {found[:16]}...)"
            )
        return None

    for row, outcome in zip(rows, pool.map(check, rows), strict=True):
        report.images += 1
        if outcome is not None:
            report.add(Problem("images", outcome, item_id=row["item_id"]))


# --- pass 4: anchors --------------------------------------------------------------------------------------------


def _check_anchor(conn: Connection, report: VerifyReport, chain: _ChainState, url: str, doc: Any) -> None:
    report.anchors += 1
    if not isinstance(doc, dict) or doc.get("format") != ANCHOR_FORMAT or not isinstance(doc.get("seq"), int):
        report.add(Problem("anchors", f"anchor {url} is not a {ANCHOR_FORMAT} document"))
        return
    seq, digest = doc["seq"], doc.get("hash")
    stored = conn.execute(select(_events.c.hash).where(_events.c.seq == seq)).scalar()
    if stored is None:
        head = report.head[0] if report.head else 0
        report.add(Problem("anchors", f"anchor {url}: the chain has no event seq {seq} (head is {head}): "
                                      "its tail was cut off", seq))  # fmt: skip
    elif stored != digest:
        report.add(Problem("anchors", f"anchor {url}: event seq {seq} has hash {stored[:16]}..., the anchor "
                                      f"{str(digest)[:16]}...: the chain was rewritten", seq))  # fmt: skip
    bound = chain.times_text
    anchored = doc.get("row_times_from_seq")
    if anchored is not None and str(anchored) != bound:
        report.add(Problem("anchors", f"anchor {url}: audit_settings.{ROW_TIMES_FROM_SEQ} is {bound}, the anchor "
                                      f"{anchored}: the boundary of the row-time checks was moved", seq))  # fmt: skip
