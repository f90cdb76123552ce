"""What the review pages show: the queue (filters -> one parameterised query per page), one item with its
history, job overviews (counts and score histograms), and images read by item id through ``pipeline.storage``.

Every value a client sends is validated here and reaches the database only as a bound parameter of the
audit query (``pipeline.audit.query.select_records``); nothing a client sends ever names a file.
"""

from __future__ import annotations

import hashlib
import io
import math
import posixpath
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import numpy as np
from sqlalchemy import func, select

from pipeline.audit.query import DECISIONS, QueryFilters, ScoreRange, row_to_record, select_records
from pipeline.audit.reviews import effective_decision_expr, latest_decision_subquery
from pipeline.audit.schema import EventRow, ItemRow, JobRow
from pipeline.storage import Storage
from schemas.record import Item

ITEM_ID = re.compile(r"[0-9a-f]{32}")  # pipeline.identity: 32 lower-case hex characters
QUEUE_DECISIONS = ("review", "escalated")  # what waits for a reviewer
DECISION_CHOICES = ("queue", "any", *DECISIONS)
SORTS = {  # name shown -> (QueryFilters.sort, descending)
    "oldest": ("created_at", False),
    "newest": ("created_at", True),
    "nsfw": ("nsfw", True),
    "clipscore": ("clipscore", False),
    "item_id": ("item_id", False),
}
PAGE_SIZES = (25, 50, 100, 200)
MAX_TEXT = 500  # filter text fields
SCORE_COLUMNS = ("nsfw", "clipscore", "clip_cosine")  # shown in the queue and histogrammed
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

_items = ItemRow.__table__
_events = EventRow.__table__
_jobs = JobRow.__table__


# --- the queue -----------------------------------------------------------------------------------------------


@dataclass
class QueueParams:
    """The queue's filters, parsed from the query string; ``raw`` keeps what was typed, to show it back."""

    job: str = ""
    campaign: str = ""
    decision: str = "queue"
    min_nsfw: float | None = None
    max_nsfw: float | None = None
    max_clipscore: float | None = None
    q: str = ""
    sort: str = "oldest"
    per_page: int = 50
    page: int = 1
    raw: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    FIELDS = ("job", "campaign", "decision", "min_nsfw", "max_nsfw", "max_clipscore", "q", "sort", "per_page", "page")

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> QueueParams:
        p = cls(raw={k: params[k] for k in cls.FIELDS if k in params and params[k] != ""})
        for name, label in (("job", "job"), ("campaign", "campaign"), ("q", "search")):
            value = p.raw.get(name, "").strip()
            if len(value) > MAX_TEXT or "\x00" in value:
                p.errors.append(f"{label}: at most {MAX_TEXT} characters and no NUL characters")
            else:
                setattr(p, name, value)
        for name, label in (("min_nsfw", "min NSFW"), ("max_nsfw", "max NSFW"), ("max_clipscore", "max CLIPScore")):
            if name in p.raw:
                try:
                    value = float(p.raw[name])
                except ValueError:
                    value = math.nan
                if math.isfinite(value):
                    setattr(p, name, value)
                else:
                    p.errors.append(f"{label}: {p.raw[name]!r} is not a number")
        if p.min_nsfw is not None and p.max_nsfw is not None and p.min_nsfw > p.max_nsfw:
            p.errors.append(f"NSFW range is empty (min {p.min_nsfw} > max {p.max_nsfw})")
        for name, allowed in (("decision", DECISION_CHOICES), ("sort", tuple(SORTS))):
            value = p.raw.get(name, getattr(p, name))
            if value in allowed:
                setattr(p, name, value)
            else:
                p.errors.append(f"{name}: {value!r} is not one of {', '.join(allowed)}")
        for name, ok, allowed in (("per_page", lambda n: n in PAGE_SIZES, ", ".join(map(str, PAGE_SIZES))),
                                  ("page", lambda n: 1 <= n <= 1_000_000, "1 to 1,000,000")):  # fmt: skip
            if name in p.raw:
                text = p.raw[name]
                if text.isascii() and text.isdigit() and len(text) <= 9 and ok(int(text)):  # not "²", not 10**5000
                    setattr(p, name, int(text))
                else:
                    p.errors.append(f"{name.replace('_', ' ')}: {text!r} is not allowed (one of {allowed})")
        return p

    def filters(self) -> QueryFilters:
        decisions = {"queue": list(QUEUE_DECISIONS), "any": []}.get(self.decision, [self.decision])
        scores = []
        if self.min_nsfw is not None or self.max_nsfw is not None:
            scores.append(ScoreRange("nsfw", self.min_nsfw, self.max_nsfw))
        if self.max_clipscore is not None:
            scores.append(ScoreRange("clipscore", None, self.max_clipscore))
        sort, descending = SORTS[self.sort]
        return QueryFilters(
            jobs=[self.job] if self.job else [],
            campaigns=[self.campaign] if self.campaign else [],
            decisions=decisions,
            scores=scores,
            search=self.q or None,
            sort=sort,
            descending=descending,
        )

    def query_string(self, **changes: Any) -> str:
        """The query string of these filters (as typed) with ``changes``; ``page`` is dropped unless given."""
        values = {k: v for k, v in self.raw.items() if k != "page"}
        values.update({k: str(v) for k, v in changes.items() if v is not None})
        return urlencode(values)


@dataclass
class QueuePage:
    records: list[dict[str, Any]]
    total: int
    pages: int


def queue_page(store: Any, params: QueueParams) -> QueuePage:
    """One page of the queue and the number of matching items; nothing when the filters have errors."""
    if params.errors:
        return QueuePage([], 0, 0)
    query = select_records(params.filters(), store.dialect)
    with store.engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(query.order_by(None).subquery())).scalar_one()
        offset = (params.page - 1) * params.per_page
        rows = conn.execute(query.limit(params.per_page).offset(offset)).mappings().all()
    return QueuePage([row_to_record(r) for r in rows], total, max(1, -(-total // params.per_page)))


def job_names(store: Any) -> list[str]:
    with store.engine.connect() as conn:
        return list(conn.execute(select(_jobs.c.name).order_by(_jobs.c.name)).scalars())


# --- one item ------------------------------------------------------------------------------------------------


@dataclass
class ItemView:
    item: Item
    effective: str | None
    history: list[dict[str, Any]]


def item_view(store: Any, item_id: str) -> ItemView | None:
    if not ITEM_ID.fullmatch(item_id):
        return None
    item = store.get_items([item_id]).get(item_id)
    if item is None:
        return None
    return ItemView(item, store.effective_decision(item_id), store.history(item_id))


# --- images --------------------------------------------------------------------------------------------------


class ImageUnavailable(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def read_image(store: Any, item_id: str) -> tuple[bytes, str, Item]:
    """The stored bytes of an item's image and their content type.

    The location comes from the item's audit record only; the bytes must match its recorded sha256, so the
    page never shows an image other than the one the record (and any review of it) is about.
    """
    item = store.get_items([item_id]).get(item_id) if ITEM_ID.fullmatch(item_id) else None
    if item is None or item.status != "generated" or not item.image_uri:
        raise ImageUnavailable(404, "no image for this item id")
    uri = item.image_uri
    try:
        data = Storage(posixpath.dirname(uri)).read(posixpath.basename(uri))
    except FileNotFoundError:
        raise ImageUnavailable(404, "the image of this item is missing from storage") from None
    if item.image_sha256 and hashlib.sha256(data).hexdigest() != item.image_sha256:
        raise ImageUnavailable(409, "the stored image does not match the sha256 in its audit record")
    return data, CONTENT_TYPES.get(item.format, "application/octet-stream"), item


class ThumbnailCache:
    """JPEG thumbnails by (item id, image sha256), least recently used first out."""

    def __init__(self, size: int = 192, entries: int = 1024) -> None:
        self.size, self.entries = size, entries
        self._cache: OrderedDict[tuple[str, str | None], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, item: Item, data: bytes) -> bytes:
        key = (item.item_id, item.image_sha256)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im.thumbnail((self.size, self.size))
            out = io.BytesIO()
            im.convert("RGB").save(out, "JPEG", quality=85)
        thumb = out.getvalue()
        with self._lock:
            self._cache[key] = thumb
            while len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        return thumb


# --- job overview --------------------------------------------------------------------------------------------


@dataclass
class Histogram:
    key: str
    lo: float
    hi: float
    counts: list[int]

    @property
    def n(self) -> int:
        return sum(self.counts)

    def bars(self, width: int = 300, height: int = 70) -> list[dict[str, Any]]:
        """SVG rectangles (x, y, w, h) and a label per bin, heights scaled to the fullest bin."""
        top = max(self.counts) or 1
        step = (self.hi - self.lo) / len(self.counts)
        w = width / len(self.counts)
        bars = []
        for i, count in enumerate(self.counts):
            h = round(height * count / top, 1)
            low = self.lo + i * step
            bars.append(
                {"x": round(i * w, 1), "y": round(height - h, 1), "w": round(w - 1, 1), "h": h, "count": count,
                 "label": f"{low:.3g} to {low + step:.3g}: {count}"}
            )  # fmt: skip
        return bars


def histogram(key: str, values: list[float], bins: int = 20) -> Histogram | None:
    if not values:
        return None
    lo, hi = (0.0, 1.0) if key == "nsfw" else (min(values), max(values))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    counts, _ = np.histogram(np.asarray(values, dtype=float), bins=bins, range=(lo, hi))
    return Histogram(key, lo, hi, [int(c) for c in counts])


@dataclass
class JobOverview:
    name: str
    by_status: dict[str, int] = field(default_factory=dict)
    by_decision: dict[str, int] = field(default_factory=dict)
    histograms: list[Histogram] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.by_status.values())


def job_overviews(store: Any, job: str | None = None) -> list[JobOverview]:
    """Per job: items by status and by effective decision (SQL counts), histograms of the generated items'
    scores (their ``scores`` column streamed once), and its runs."""
    latest = latest_decision_subquery()
    review = _events.alias("review")
    effective = effective_decision_expr(review.c.kind, _items.c.decision).label("effective")
    per_item = select(_items.c.job, _items.c.status, effective).select_from(
        _items.outerjoin(latest, latest.c.item_id == _items.c.item_id).outerjoin(review, review.c.seq == latest.c.seq)
    )
    scores = select(_items.c.job, _items.c.scores).where(_items.c.status == "generated")
    if job is not None:
        per_item, scores = per_item.where(_items.c.job == job), scores.where(_items.c.job == job)
    per_item = per_item.subquery()
    # Grouped outside the subquery: PostgreSQL will not match a CASE with bound parameters in GROUP BY.
    counts = select(per_item.c.job, per_item.c.status, per_item.c.effective, func.count()).group_by(
        per_item.c.job, per_item.c.status, per_item.c.effective
    )
    jobs: dict[str, JobOverview] = {}
    values: dict[str, dict[str, list[float]]] = {}
    with store.engine.connect() as conn:
        for name, status, effective, n in conn.execute(counts):
            view = jobs.setdefault(name, JobOverview(name))
            view.by_status[status] = view.by_status.get(status, 0) + n
            decision = effective or "none"
            view.by_decision[decision] = view.by_decision.get(decision, 0) + n
        for name, item_scores in conn.execution_options(stream_results=True, yield_per=2000).execute(scores):
            per_key = values.setdefault(name, {k: [] for k in SCORE_COLUMNS})
            for key in SCORE_COLUMNS:
                value = (item_scores or {}).get(key)
                if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                    per_key[key].append(float(value))
    for name, view in sorted(jobs.items()):
        view.histograms = [h for k in SCORE_COLUMNS if (h := histogram(k, values.get(name, {}).get(k, [])))]
        view.runs = store.runs(name)
    return [jobs[k] for k in sorted(jobs)]
