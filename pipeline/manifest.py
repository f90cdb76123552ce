"""Manifest reading: a Parquet file at any fsspec URL, streamed batch by batch, rows validated and expanded.

``read_rows`` never holds the whole manifest: it yields pyarrow record batches converted row by row.
``ManifestPlanner`` turns raw rows into items (row x sample) with deterministic ids, and bad rows into
``rejected`` items carrying every reason, so a bad row never crashes a job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ManifestError
from pipeline.identity import derived_seed, item_id, rejected_item_id
from pipeline.models.lora_sources import LoraSources
from pipeline.storage import open_input
from schemas.limits import LIMITS
from schemas.manifest import UNREADABLE, ManifestRow, parse_row
from schemas.record import Item
from schemas.spec import JobSpec

READ_BATCH_ROWS = 4096


def read_rows(url: str, batch_rows: int = READ_BATCH_ROWS) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row_number, raw row) for every manifest row; row numbers start at 1.

    A missing, corrupt or truncated file raises ``ManifestError`` naming it.
    """
    try:
        f = open_input(url).open()
    except FileNotFoundError:
        raise ManifestError(f"manifest {url}: no such file") from None
    except Exception as exc:  # fsspec raises many types for bad URLs / missing backends
        raise ManifestError(f"manifest {url}: cannot open: {type(exc).__name__}: {exc}") from None
    try:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"manifest {url}: not a readable Parquet file (corrupt or truncated?): {exc}") from None
        names = pf.schema_arrow.names
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:  # a row is a dict: all but the last column of a name would vanish without a word
            raise ManifestError(f"manifest {url}: column name(s) used more than once: {', '.join(repeated)}")
        if "prompt_id" not in names or "prompt" not in names:
            missing = [c for c in ("prompt_id", "prompt") if c not in names]
            raise ManifestError(f"manifest {url}: missing required column(s) {', '.join(missing)}; has {names}")
        row_number = 0
        try:
            for batch in pf.iter_batches(batch_size=batch_rows):
                for raw in _python_rows(batch):
                    row_number += 1
                    yield row_number, raw
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(
                f"manifest {url}: unreadable after row {row_number} (corrupt or truncated?): {exc}"
            ) from None
    finally:
        f.close()


def _python_rows(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """The batch's rows as dicts. A cell Python cannot hold (a timestamp past year 9999, say) makes its row carry
    the problem under ``UNREADABLE`` (the row is rejected, naming the column) instead of failing the manifest."""
    try:
        return batch.to_pylist()
    except (ValueError, OverflowError, pa.ArrowException):
        pass
    columns = []
    for column in batch.columns:
        try:
            columns.append(column.to_pylist())
        except (ValueError, OverflowError, pa.ArrowException):
            columns.append(None)  # converted cell by cell below
    rows: list[dict[str, Any]] = []
    for i in range(batch.num_rows):
        row: dict[str, Any] = {}
        for name, values, column in zip(batch.schema.names, columns, batch.columns, strict=True):
            if values is not None:
                row[name] = values[i]
                continue
            try:
                row[name] = column[i].as_py()
            except (ValueError, OverflowError, pa.ArrowException) as exc:
                row.setdefault(UNREADABLE, []).append(f"{name}: cannot be read: {exc}")
        rows.append(row)
    return rows


def manifest_row_count(url: str) -> int | None:
    """Row count from the Parquet footer (no data read), or None when the file is unreadable."""
    try:
        with open_input(url) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except Exception:
        return None


@dataclass
class RowOutcome:
    """What became of one manifest row: its items (pending or rejected) and, if rejected, why."""

    row_number: int
    prompt_id: str
    items: list[Item]
    problems: list[str] = field(default_factory=list)


class SeenIds:
    """A map of string → first row number in ~30 bytes an entry (a dict of the strings takes ~120). Each id is
    kept as its 128-bit BLAKE2b digest: two int64 halves and the row number in NumPy arrays sorted by the first
    half, with a small dict in front for the newest ids, merged in once it holds an eighth as many (each merge is
    one linear insert, so memory stays near the arrays' own). Two distinct ids share a digest with probability
    ~n²/2¹²⁹, the same trust as the 128-bit item ids themselves."""

    MIN_MERGE = 65_536

    def __init__(self) -> None:
        self._hi = np.zeros(0, np.int64)
        self._lo = np.zeros(0, np.int64)
        self._row = np.zeros(0, np.int64)
        self._recent: dict[bytes, int] = {}  # digest → row

    def __len__(self) -> int:
        return len(self._row) + len(self._recent)

    def setdefault(self, key: str, row: int) -> int:
        """The row ``key`` was first seen at; records ``row`` for it when it is new."""
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        found = self._recent.get(digest)
        if found is not None:
            return found
        if len(self._hi):
            hi = int.from_bytes(digest[:8], "little", signed=True)
            i, n = int(self._hi.searchsorted(hi)), len(self._hi)
            if i < n and self._hi[i] == hi:  # a run of equal first halves: ~never longer than one
                lo = int.from_bytes(digest[8:], "little", signed=True)
                while i < n and self._hi[i] == hi:
                    if self._lo[i] == lo:
                        return int(self._row[i])
                    i += 1
        self._recent[digest] = row
        if len(self._recent) >= max(self.MIN_MERGE, len(self._row) // 8):
            self._merge()
        return row

    def _merge(self) -> None:
        halves = np.frombuffer(b"".join(self._recent), dtype="<i8").reshape(-1, 2)
        rows = np.fromiter(self._recent.values(), np.int64, len(self._recent))
        order = np.argsort(halves[:, 0], kind="stable")
        hi, lo, rows = halves[order, 0], halves[order, 1], rows[order]
        at = self._hi.searchsorted(hi)
        self._hi, self._lo, self._row = (
            np.insert(self._hi, at, hi),
            np.insert(self._lo, at, lo),
            np.insert(self._row, at, rows),
        )
        self._recent = {}


class ManifestPlanner:
    """Validates rows, rejects duplicates, expands rows into items with ids and seeds."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self._lora_sources = LoraSources(spec.model)
        # prompt_id → row number of its first occurrence: the one thing that grows with the manifest (~24 bytes
        # a row); everything else streams.
        self._first_seen = SeenIds()

    def plan_row(self, row_number: int, raw: dict[str, Any]) -> RowOutcome:
        parsed = parse_row(raw, self.spec.row_overrides)
        raw_id = raw.get("prompt_id")
        shown_id = raw_id if isinstance(raw_id, str) else repr(raw_id)
        if isinstance(parsed, list):
            return self._reject(row_number, raw, shown_id, parsed)
        if parsed.lora and (bad := [f"lora: {p}" for lo in parsed.lora if (p := self._lora_sources.problem(lo.path))]):
            return self._reject(row_number, raw, shown_id, bad)
        first = self._first_seen.setdefault(parsed.prompt_id, row_number)
        if first != row_number:
            return self._reject(
                row_number, raw, shown_id, [f"prompt_id: duplicate of row {first} (prompt_id {parsed.prompt_id!r})"]
            )
        return RowOutcome(row_number, parsed.prompt_id, self._expand(row_number, parsed))

    def _expand(self, row_number: int, row: ManifestRow) -> list[Item]:
        spec = self.spec
        lora = [lo.model_dump() for lo in (row.lora if row.lora is not None else spec.model.lora)]
        params = {
            "prompt": row.prompt,
            "negative_prompt": row.negative_prompt,
            "model": spec.model.id,
            "model_revision": spec.model.revision,
            "lora": lora,
            "sampler": row.sampler or spec.sampler.name,
            "steps": row.steps or spec.sampler.steps,
            "guidance_scale": float(
                row.guidance_scale if row.guidance_scale is not None else spec.sampler.guidance_scale
            ),
            "width": row.width or spec.image.width,
            "height": row.height or spec.image.height,
            "format": spec.image.format,
            "row_seed": row.seed,
        }
        items = []
        for k in range(row.num_images or spec.image.images_per_prompt):
            iid = item_id(spec.name, row.prompt_id, k, params)
            if row.seed is not None:
                seed, source = (row.seed + k) % (LIMITS.max_seed + 1), "row"
            else:
                seed, source = derived_seed(iid), "derived"
            items.append(
                Item(
                    item_id=iid,
                    job=spec.name,
                    prompt_id=row.prompt_id,
                    sample_index=k,
                    row_number=row_number,
                    prompt=row.prompt,
                    negative_prompt=row.negative_prompt,
                    seed=seed,
                    seed_source=source,
                    model=spec.model.id,
                    model_revision=spec.model.revision,
                    lora=lora,
                    sampler=params["sampler"],
                    steps=params["steps"],
                    guidance_scale=params["guidance_scale"],
                    width=params["width"],
                    height=params["height"],
                    format=spec.image.format,
                    campaign=row.campaign,
                    sku=row.sku,
                    locale=row.locale,
                    tags=list(row.tags),
                    metadata=dict(row.metadata),
                )
            )
        return items

    def _reject(self, row_number: int, raw: dict[str, Any], shown_id: str, problems: list[str]) -> RowOutcome:
        spec = self.spec
        n = raw.get("num_images")
        count = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= LIMITS.max_images_per_prompt else None
        count = count or spec.image.images_per_prompt
        prompt = raw.get("prompt")
        prompt = prompt.replace("\x00", "\ufffd") if isinstance(prompt, str) else prompt
        items = []
        for k in range(count):
            item = Item(
                item_id=rejected_item_id(spec.name, row_number, k),
                job=spec.name,
                # Stored as data only (never used in a path); truncated so a 100k-char id cannot bloat the log.
                prompt_id=str(shown_id)[: LIMITS.max_prompt_id_chars * 2].replace("\x00", "\ufffd"),
                sample_index=k,
                row_number=row_number,
                prompt=prompt[: LIMITS.max_prompt_chars] if isinstance(prompt, str) else "",
                model=spec.model.id,
                sampler=spec.sampler.name,
                steps=spec.sampler.steps,
                guidance_scale=spec.sampler.guidance_scale,
                width=spec.image.width,
                height=spec.image.height,
                format=spec.image.format,
                metadata={"prompt_truncated": isinstance(prompt, str) and len(prompt) > LIMITS.max_prompt_chars},
                **{
                    k: raw[k][:256].replace("\x00", "\ufffd")
                    for k in ("campaign", "sku", "locale")
                    if isinstance(raw.get(k), str)
                },
            )
            for p in problems:
                field_name = p.split(":", 1)[0]
                item.reject("invalid_row", p, field=field_name)
            items.append(item)
        return RowOutcome(row_number, str(shown_id), items, problems)


def plan_manifest(spec: JobSpec) -> Iterator[RowOutcome]:
    """Every row of the spec's manifest, validated and expanded, in manifest order."""
    planner = ManifestPlanner(spec)
    for row_number, raw in read_rows(spec.manifest):
        yield planner.plan_row(row_number, raw)
