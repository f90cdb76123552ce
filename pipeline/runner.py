"""Running a job: check → plan (validate, expand, resume) → execute the stage list → results and summary.

``run_job`` is the one entry point behind ``genpipe run``, ``genpipe demo`` and ``python -m jobs.generate``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import platform
import posixpath
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audit import AuditStore, write_chain_anchor
from pipeline.audit.lease import JobLease
from pipeline.audit.records import write_results_parquet
from pipeline.audit.store import OUTPUT_STATUSES, EmptyAuditDatabase, sqlite_file, sqlite_in_memory
from pipeline.errors import JobFailed, SpecError
from pipeline.executors.shards import SHARD_SUFFIX, iter_batches, shard_batches, shard_rows, write_shard
from pipeline.manifest import ManifestPlanner, read_rows
from pipeline.metrics import record_items
from pipeline.models.diffusers_loader import (
    ModelError,
    check_model,
    is_local,
    model_directory,
    model_fingerprint,
)
from pipeline.progress import Progress
from pipeline.report.bias import write_bias_report
from pipeline.samplers import ModelTraits, model_family, model_traits
from pipeline.scoring.alignment import rank_job
from pipeline.scoring.check import check_scoring
from pipeline.scoring.policy import most_severe, plan_regeneration, wants_regeneration
from pipeline.scoring.screen import PromptScreen
from pipeline.stages.base import Resources, Stage
from pipeline.stages.generate import DiffusersGenerator
from pipeline.stages.score import build_scoring_stages
from pipeline.stages.write import (
    PUBLIC_PREFIX,
    QUARANTINE_PREFIX,
    REVIEW_PREFIX,
    SUPERSEDED_PREFIX,
    ImageWriter,
    image_key,
)
from pipeline.storage import TMP_PREFIX, Storage, StorageError, local_path
from schemas.record import SUPERSEDED, Item
from schemas.spec import JobSpec

PLAN_PREFIX = "_plan"
PLAN_SHARD_ITEMS = 1024
RESUME_CHUNK = 500
WRITE_CHECK_KEY = ".genpipe-write-check"
RESULTS_KEY = "results.parquet"


@dataclass
class RunSummary:
    job: str
    run_id: int
    status: str
    rows: int = 0
    rows_rejected: int = 0
    items_total: int = 0
    generated_now: int = 0
    failed_now: int = 0
    rejected_now: int = 0
    skipped_done: int = 0
    orphans_quarantined: int = 0
    regenerated_now: int = 0
    blocked_now: int = 0
    superseded_now: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    bias_report: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    images: str = ""
    results: str = ""
    database: str = ""

    def render(self) -> str:
        c = self.counts
        lines = [
            f"job {self.job} (run {self.run_id}): {self.status}",
            f"  manifest rows: {self.rows} ({self.rows_rejected} rejected)",
            f"  items: {self.items_total} — generated {c.get('generated', 0)}, rejected {c.get('rejected', 0)}, "
            f"blocked {c.get('blocked', 0)}, failed {c.get('failed', 0)}"
            + (
                f" (and {c[SUPERSEDED]} superseded records: rows fixed or planned with other settings)"
                if c.get(SUPERSEDED)
                else ""
            ),
            f"  this run: generated {self.generated_now}, failed {self.failed_now}, "
            f"skipped {self.skipped_done} already done (resumed)",
            "  decisions: " + (", ".join(f"{k} {v}" for k, v in sorted(self.decisions.items())) or "none"),
            *([f"  regenerated: {self.regenerated_now} flagged images tried again"] if self.regenerated_now else []),
            f"  throughput: {self.images_per_s:.2f} images/s over {self.elapsed_s:.1f} s",
            *(
                [f"  orphans:  {self.orphans_quarantined} images without a record moved to quarantine/orphans/"]
                if self.orphans_quarantined
                else []
            ),
            f"  images:   {self.images}",
            f"  results:  {self.results}",
            f"  database: {self.database}",
            *([f"  bias report: {self.bias_report}"] if self.bias_report else []),
        ]
        return "\n".join(lines)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("genpipe", "torch", "diffusers", "transformers", "peft", "open_clip_torch", "ray", "pyarrow"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def check_spec(spec: JobSpec, storage: bool = True) -> tuple[str, ModelTraits]:
    """Fail fast, before anything launches: the model must exist as safetensors and the sampler fit it, the
    audit database must be named where it cannot default, and (``storage``: on the machine that runs the job)
    the output's filesystem must be installed. Returns (resolved model path or id, what the model allows a row)."""
    try:
        spec.database_url()
    except ValueError as exc:
        raise SpecError(f"{exc} (output {spec.output!r})") from None
    if storage:
        try:
            Storage(job_root(spec))
        except (ValueError, ImportError) as exc:  # an unknown protocol, or its fsspec backend is not installed
            raise SpecError(f"output: {spec.output!r}: {exc}") from None
        if (root := local_path(job_root(spec))) is not None:  # what can be seen without writing anything
            found = Path(root)
            while not found.exists() and found != found.parent:
                found = found.parent
            if not found.is_dir():
                raise SpecError(f"output: {spec.output!r} cannot be written: {str(found)!r} is a file")
            if not os.access(found, os.W_OK | os.X_OK):
                raise SpecError(f"output: {spec.output!r} cannot be written: no permission in {str(found)!r}")
    try:
        resolved = check_model(spec.model)
    except ModelError as exc:
        key = "model.lora" if str(exc).startswith("LoRA adapter") else "model.id"
        raise SpecError(f"{key}: {exc}") from None
    check_scoring(spec)
    if spec.database and sqlite_in_memory(spec.database):
        # SQLAlchemy gives each thread its own in-memory database; the planner, the sink and the lease heartbeat
        # are threads, so they would not see each other's tables.
        raise SpecError(
            "database: an in-memory SQLite database is per connection; use a file, e.g. sqlite:///runs/genpipe.db"
        )
    if spec.executor == "local" and spec.resources.gpus_per_actor > 0:
        import torch

        if not torch.cuda.is_available():  # the generator would quietly run on the CPU, hours instead of minutes
            raise SpecError(
                f"resources.gpus_per_actor: {spec.resources.gpus_per_actor:g} GPU(s) asked for, but torch sees no "
                "CUDA device here; set it to 0 to run on the CPU"
            )
    if spec.executor == "ray" and spec.output.startswith("memory://"):
        raise SpecError("output: memory:// lives in one process; use executor: local, a path or an object store")
    family = model_family(resolved) if spec.model.family == "auto" else spec.model.family
    traits = model_traits(resolved, family)
    if problems := traits.row_problems(spec.sampler.name, spec.image.width, spec.image.height, None):
        field, _, reason = problems[0].partition(":")  # the row field, named as the spec key that sets it
        raise SpecError(f"{'sampler.name' if field == 'sampler' else 'image.' + field}:{reason}")
    return resolved, traits


def job_root(spec: JobSpec) -> str:
    return posixpath.join(spec.output.rstrip("/"), spec.name)


class _Planner:
    """Streams the manifest into plan shards of pending items; records rejected rows; skips done items.

    With ``dry_run`` it writes nothing (no shard, no record) and only counts; ``store`` may then be None (no
    audit database yet: nothing is done)."""

    def __init__(
        self,
        spec: JobSpec,
        traits: ModelTraits,
        store: AuditStore | None,
        storage: Storage,
        run_id: int,
        progress: Progress | None = None,
        dry_run: bool = False,
    ) -> None:
        self.spec, self.traits, self.store, self.storage, self.run_id = spec, traits, store, storage, run_id
        self.dry_run = dry_run
        self.progress = progress
        self.on_shard: Callable[[str], None] | None = None  # told each key as it is written (streamed execution)
        self.stop = threading.Event()  # set from another thread: planning ends at the next row
        self.summary_counts: Counter[str] = Counter()
        self.shards: list[str] = []
        self._pending: list[Item] = []
        self._chunk: list[Item] = []
        self.screen = PromptScreen.from_spec(spec)
        # Manifest positions with `rejected` records from earlier runs: one this run plans again gets them marked
        # `superseded` (a rejected row's id is its position, so a fixed row's new items never replace them).
        self._stale_rows = store.rejected_rows(spec.name) if store is not None else np.empty(0, np.int64)
        # Whether earlier runs left outputs: only then can a prompt planned with other settings replace some.
        self._had_outputs = store is not None and store.has_outputs(spec.name)

    def run(self) -> None:
        planner = ManifestPlanner(self.spec)
        for row_number, raw in read_rows(self.spec.manifest):
            if self.stop.is_set():
                raise _PlanningStopped
            outcome = planner.plan_row(row_number, raw)
            self.summary_counts["rows"] += 1
            rejected = bool(outcome.problems)
            for item in outcome.items:
                if item.status == "pending":
                    for problem in self.traits.row_problems(item.sampler, item.width, item.height,
                                                            item.negative_prompt):  # fmt: skip
                        item.reject("invalid_row", problem, field=problem.split(":", 1)[0])
                        rejected = True  # what the model cannot honour rejects the row too
                self._chunk.append(item)
            self.summary_counts["rows_rejected"] += rejected
            if self.screen is not None:
                self.screen.screen(outcome.items)  # a blocked prompt is never generated
            if len(self._chunk) >= RESUME_CHUNK:
                self._flush_chunk()
        self._flush_chunk()
        self._flush_shard()
        if self.progress is not None:
            self.progress.planning = False  # the total is final from here on

    def _flush_chunk(self, manifest_rows: bool = True) -> None:
        if not self._chunk:
            return
        chunk, self._chunk = self._chunk, []
        self.summary_counts["items"] += len(chunk)
        existing = self.store.get_items([it.item_id for it in chunk]) if self.store is not None else {}
        new_rejected = self._superseded(chunk) if manifest_rows and len(self._stale_rows) else []
        changed = self._earlier_outputs(chunk) if manifest_rows and self._had_outputs else []
        pending = []
        for item in chunk:
            old = existing.get(item.item_id)
            if item.status in ("rejected", "blocked"):  # terminal before generation: recorded, never planned
                # Recorded again when it says something else now: a rejected row's id is its position, and an
                # edited manifest can put another bad row (or another reason) there.
                if old is None or _terminal_view(old) != _terminal_view(item):
                    new_rejected.append(item)
                    self.summary_counts[f"{item.status}_now"] += 1
                continue
            if old is not None and old.status == "generated" and self._image_intact(old):
                self.summary_counts["skipped_done"] += 1
                if (held := self._screen_verdict(old, item)) is not None:
                    changed.append(held)
                continue
            pending.append(item)
        # Recorded before any of this chunk's new items can reach the executor: a crash in between must not
        # leave a new item current beside the record it replaces.
        if (new_rejected or changed) and not self.dry_run:
            self._record_changes(changed, new_rejected)
        for item in pending:
            self._pending.append(item)
            self.summary_counts["held_now"] += item.decision == "review"  # the prompt screen holds it for review
            if len(self._pending) >= PLAN_SHARD_ITEMS:
                self._flush_shard()

    def _superseded(self, chunk: list[Item]) -> list[Item]:
        """The earlier `rejected` records at the manifest positions of ``chunk`` that its items do not rewrite,
        marked `superseded` (each chunk holds whole rows, so every item now at a position is in it)."""
        rows = np.unique(np.fromiter((it.row_number for it in chunk), np.int64, len(chunk)))
        stale = rows[np.isin(rows, self._stale_rows, assume_unique=True)]
        if not len(stale):
            return []
        planned = {it.item_id for it in chunk}
        now_at = {it.row_number: it.prompt_id for it in chunk}
        out = [
            old.supersede(
                f"manifest row {old.row_number} was planned again, now as prompt_id {now_at[old.row_number]!r}"
            )  # fmt: skip
            for old in self.store.rejected_at(self.spec.name, stale.tolist())
            if old.item_id not in planned
        ]
        self.summary_counts["superseded_now"] += len(out)
        return out

    def _earlier_outputs(self, chunk: list[Item]) -> list[tuple[Item, str | None]]:
        """What this chunk changes in the job's earlier ``generated``, ``blocked`` and ``failed`` records of its
        prompts, each with the key its image had:

        - a record that is neither planned now nor a regeneration try of a planned item becomes `superseded`: its
          row's settings changed (another id) or the row asks for fewer samples (I1: one current record per
          manifest row × sample);
        - a regeneration try of a prompt the screen now blocks or holds gets the finding and the stricter
          decision (its first try is rerecorded as blocked, or held by ``_screen_verdict``).

        One light query per chunk; whole records are read only for what may change."""
        prompts = sorted({it.prompt_id for it in chunk if it.status != "rejected"})
        if not prompts:
            return []
        planned = {it.item_id for it in chunk}
        rows = self.store.outputs_of_prompts(self.spec.name, prompts)
        wanted = [item_id for item_id, attempt in rows if attempt > 1 or item_id not in planned]
        if not wanted:
            return []
        flagged = {it.item_id: it for it in chunk if _screen_findings(it)}
        new_at = {(it.prompt_id, it.sample_index): it.item_id for it in chunk if it.status != "rejected"}
        out: list[tuple[Item, str | None]] = []
        for old in self.store.get_items(wanted).values():
            if old.status not in OUTPUT_STATUSES:
                continue
            root = old.metadata.get("attempt_of", old.item_id) if old.attempt > 1 else old.item_id
            if old.item_id not in planned and root not in planned:
                new_id = new_at.get((old.prompt_id, old.sample_index))
                why = (f"was planned again with other settings, as item {new_id}" if new_id else
                       "is no longer planned (the row asks for fewer samples)")  # fmt: skip
                key = image_key(old) if old.image_sha256 else None
                out.append((old.supersede(f"prompt_id {old.prompt_id!r} sample {old.sample_index} {why}"), key))
                self.summary_counts["superseded_now"] += 1
            elif (
                old.attempt > 1
                and root in flagged
                and old.status == "generated"
                and (verdict := self._screen_verdict(old, flagged[root])) is not None
            ):
                out.append(verdict)
        return out

    def _screen_verdict(self, old: Item, planned: Item) -> tuple[Item, str] | None:
        """A done item (or a regeneration try of it) whose prompt the screen now blocks or holds — a rule added
        since it was made: ``old`` with the screen's new findings and the stricter decision, with the key its
        image had. Only findings of rules and classifier scores count: a screen that errors now says nothing."""
        seen = {_finding_key(r) for r in old.reasons}
        new = [r for r in _screen_findings(planned) if _finding_key(r) not in seen]
        if not new:
            return None
        self.summary_counts["rerouted_now"] += 1
        old_key = image_key(old)
        old.reasons.extend(new)
        old.decision = most_severe([old.decision or "pass", "block" if planned.status == "blocked" else "review"])
        return old, old_key

    def _record_changes(self, changed: list[tuple[Item, str | None]], rejected: list[Item]) -> None:
        """Record superseded and rerouted records, with their images under their new keys (``superseded/``,
        ``review/``, ``quarantine/``): copy, record, then delete the old copy. A crash before the record leaves
        an extra copy that the rerun writes again; one after it, an unrecorded old copy that reconcile_orphans
        quarantines. Neither loses an image or leaves two current records."""
        copied = []
        for item, old_key in changed:
            if old_key is None:
                continue
            new_key = image_key(item)
            if new_key != old_key and self.storage.exists(old_key):
                self.storage.write_atomic(new_key, self.storage.read(old_key))
                copied.append(old_key)
                item.image_uri = self.storage.url(new_key)
            elif self.storage.exists(new_key):  # copied there by an earlier, interrupted run
                item.image_uri = self.storage.url(new_key)
            else:  # removed by hand: the record keeps no image it cannot point at
                item.image_uri = item.image_sha256 = None
        self.store.write_items([it for it, _ in changed] + rejected, self.run_id)
        for key in copied:
            self.storage.delete(key)

    def plan_items(self, items: list[Item]) -> list[str]:
        """Plan extra items (regeneration tries) through the same resume check; returns the new shard keys."""
        first = len(self.shards)
        self._chunk.extend(items)
        self._flush_chunk(manifest_rows=False)
        self._flush_shard()
        return self.shards[first:]

    def _image_intact(self, item: Item) -> bool:
        return item.image_sha256 is not None and self.storage.sha256(image_key(item)) == item.image_sha256

    def _flush_shard(self) -> None:
        if not self._pending:
            return
        # Sorting by generation parameters lets the generator batch equal-parameter items together.
        items = sorted(self._pending, key=lambda it: (it.param_key(), it.item_id))
        self._pending = []
        if self.dry_run:
            self.summary_counts["pending"] += len(items)
            return
        key = f"{PLAN_PREFIX}/run-{self.run_id}/part-{len(self.shards):05d}{SHARD_SUFFIX}"
        with self.storage.open_atomic(key) as f:
            write_shard(f, items, self.spec.resources.batch_size)  # a record batch per generator batch
        self.shards.append(key)
        self.summary_counts["pending"] += len(items)
        if self.progress is not None:
            self.progress.add(len(items))
        if self.on_shard is not None:
            self.on_shard(key)


def build_stages(spec: JobSpec) -> list[Stage]:
    res = spec.resources
    generator = DiffusersGenerator(
        spec.model,
        batch_size=res.batch_size,
        resources=Resources(num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor, concurrency=res.generator_actors),
        batch_invariant=res.batch_invariant,
    )
    writer = ImageWriter(job_root(spec), quality=spec.image.quality)
    return [generator, *build_scoring_stages(spec), writer]


@dataclass
class PlanSummary:
    """What ``plan_job`` (``genpipe run --dry-run``) found: the run as it would start now."""

    job: str
    rows: int = 0
    rows_rejected: int = 0
    items: int = 0
    rejected: int = 0
    blocked: int = 0
    superseded: int = 0
    skipped_done: int = 0
    pending: int = 0
    held: int = 0  # of ``pending``: held for review by the prompt screen
    resumed_from: str = ""
    elapsed_s: float = 0.0
    rows_per_s: float = 0.0
    peak_rss_mb: float = 0.0

    def render(self) -> str:
        return "\n".join([
            f"job {self.job}: dry run (nothing generated or written)",
            f"  manifest rows: {self.rows} ({self.rows_rejected} rejected)",
            f"  items: {self.items} — to generate {self.pending}, already done {self.skipped_done}, "
            f"newly rejected {self.rejected}, newly blocked {self.blocked}",
            *([f"  held for review by the prompt screen: {self.held} of those to generate"] if self.held else []),
            *([f"  superseded: {self.superseded} earlier records (rows fixed, or planned with other settings)"]
              if self.superseded else []),
            f"  audit database: {self.resumed_from or 'none yet (nothing done)'}",
            f"  planned in {self.elapsed_s:.1f} s ({self.rows_per_s:,.0f} rows/s), "
            f"driver peak RSS {self.peak_rss_mb:,.0f} MB",
        ])  # fmt: skip


def plan_job(spec: JobSpec) -> PlanSummary:
    """Check the spec and plan the whole manifest as ``run_job`` would — validate, expand, dedupe, screen, look
    up finished items in the audit database if it exists — without taking the lease, starting a run, or
    writing a record, a shard or an image. Bad input raises as in ``run_job``."""
    import resource

    started = time.monotonic()
    resolved, traits = check_spec(spec)
    url = spec.database_url()
    # No database file yet, or a database without audit tables (a new PostgreSQL database, which a real run would
    # set up): nothing is done. Any other problem (unreachable server, an older schema) is an error, as in a real
    # run: a dry run must not report "nothing done" because it could not look.
    path = sqlite_file(url)
    store = None
    if path is None or os.path.exists(path):
        with contextlib.suppress(EmptyAuditDatabase):
            store = AuditStore(url, migrate=False)
    try:
        if store is not None:
            check_model_unchanged(store, spec.name, describe_model(spec, resolved))  # as the run would
        planner = _Planner(spec, traits, store, Storage(job_root(spec)), 0, dry_run=True)
        planner.run()
    finally:
        if store is not None:
            store.dispose()
    pc = planner.summary_counts
    elapsed = time.monotonic() - started
    return PlanSummary(
        job=spec.name,
        rows=pc["rows"],
        rows_rejected=pc["rows_rejected"],
        items=pc["items"],
        rejected=pc["rejected_now"],
        blocked=pc["blocked_now"],
        superseded=pc["superseded_now"],
        skipped_done=pc["skipped_done"],
        pending=pc["pending"],
        held=pc["held_now"],
        resumed_from=store.safe_url if store is not None else "",
        elapsed_s=round(elapsed, 3),
        rows_per_s=round(pc["rows"] / elapsed, 1) if elapsed > 0 else 0.0,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )


def run_job(spec: JobSpec, *, quiet: bool = False) -> RunSummary:
    """Run (or resume) a job to completion. Raises ``SpecError`` / ``ManifestError`` before launching
    anything when the input is bad, and ``JobFailed`` when failures pass the error budget."""
    started = time.monotonic()
    resolved, traits = check_spec(spec)
    storage = Storage(job_root(spec))
    try:  # a read-only or special filesystem (root passes every permission check): found now, not mid-run
        storage.write_atomic(WRITE_CHECK_KEY, b"")
        storage.delete(WRITE_CHECK_KEY)
    except (OSError, StorageError) as exc:
        raise SpecError(f"output: {spec.output!r} cannot be written: {type(exc).__name__}: {exc}") from None
    store = AuditStore(spec.database_url())
    try:
        lease = JobLease(store, spec.name).acquire()
    except BaseException:
        store.dispose()
        raise
    try:
        close_dead_runs(store, spec.name)
        model_info = describe_model(spec, resolved)
        check_model_unchanged(store, spec.name, model_info)
        run_id = store.begin_run(spec.name, spec.model_dump(mode="json"), library_versions(), model_info)
    except BaseException:
        lease.release()
        store.dispose()
        raise
    summary = RunSummary(job=spec.name, run_id=run_id, status="running", database=_masked(store),
                         images=storage.url("images"), results=storage.url(RESULTS_KEY))  # fmt: skip
    planner: _Planner | None = None
    outcome: Counter[str] = Counter()
    raising = False
    try:
        storage.delete(PLAN_PREFIX)  # shards of an interrupted earlier run are stale by definition
        progress = Progress(0, stream=io.StringIO() if quiet else None, planning=True)

        def sink(items: list[Item]) -> None:
            lease.check()  # taken over by another run: record nothing more
            store.write_items(items, run_id)
            statuses = Counter(it.status for it in items)
            outcome.update(statuses)
            record_items(spec.name, statuses, Counter(it.decision for it in items if it.decision))
            progress.update(len(items), statuses["generated"])

        gen_start = time.monotonic()
        stages = build_stages(spec)
        planner = _Planner(spec, traits, store, storage, run_id, progress)
        with _PlanningThread(planner) as planning:  # plan while execution starts
            _execute(spec, stages, storage, planning, sink)
        _plan_counts(summary, planner)
        summary.regenerated_now = _regenerate_flagged(spec, stages, store, storage, planner, sink, progress)
        progress.finish()
        gen_elapsed = time.monotonic() - gen_start
        lease.check()  # the post-run steps below (orphans, ranking, reports) are the lease holder's alone
        storage.delete(PLAN_PREFIX)
        summary.generated_now, summary.failed_now = outcome["generated"], outcome["failed"]
        summary.images_per_s = outcome["generated"] / gen_elapsed if outcome["generated"] else 0.0
        summary.orphans_quarantined = reconcile_orphans(store, storage, spec.name)
        if spec.scoring.enabled:
            rank_job(store, spec.name, run_id)  # best-of-k per prompt needs all of a prompt's samples
        with storage.open_atomic(RESULTS_KEY) as f:
            write_results_parquet(store, spec.name, f)
        summary.decisions = _decision_counts(store, spec.name)
        if spec.scoring.enabled and spec.scoring.bias.attributes:
            files = write_bias_report(store.iter_items(spec.name), storage, spec.name, spec.scoring.bias)
            summary.bias_report = files.get("bias.md", "")
        summary.counts = store.counts(spec.name)
        summary.items_total = sum(n for status, n in summary.counts.items() if status != SUPERSEDED)
        # The error budget is the job's, not this run's: failed items over every item that was to be generated.
        failed, attempted = (
            summary.counts.get("failed", 0),
            summary.counts.get("failed", 0) + summary.counts.get("generated", 0),
        )
        over_budget = attempted and failed / attempted > spec.policy.max_failure_fraction
        summary.status = "failed" if over_budget else "succeeded"
    except BaseException:
        raising = True
        summary.status = "failed"
        if planner is not None:
            _plan_counts(summary, planner)  # as far as planning got
        summary.generated_now, summary.failed_now = outcome["generated"], outcome["failed"]
        with contextlib.suppress(Exception):  # what the records say now; never mask the run's own error
            summary.counts = store.counts(spec.name)
            summary.items_total = sum(n for status, n in summary.counts.items() if status != SUPERSEDED)
            summary.decisions = _decision_counts(store, spec.name)
        with contextlib.suppress(Exception):
            if not storage.exists(RESULTS_KEY):  # not written yet: the summary must not point at nothing
                summary.results = ""
        raise
    finally:
        summary.elapsed_s = time.monotonic() - started
        try:
            try:
                store.end_run(run_id, summary.status, summary.counts, asdict(summary))
            except Exception as exc:  # raised when the run itself went well; never masks the run's own error
                if not raising:
                    raise
                print(f"genpipe: warning: the run's end was not recorded: {exc}", file=sys.stderr)
            try:  # the chain head next to the images: an anchor outside the database (covers run_ended)
                write_chain_anchor(store, storage, spec.name)
            except Exception as exc:  # never mask the job's own outcome
                print(f"genpipe: warning: chain anchor not written: {exc}", file=sys.stderr)
        finally:  # whatever the database did: the lease goes (or expires: its heartbeat stops first)
            try:
                lease.release()
            except Exception as exc:
                print(f"genpipe: warning: lease not released, it expires by itself: {exc}", file=sys.stderr)
            store.dispose()
            if summary.status != "running":
                _write_summary(storage, summary)
    if summary.status == "failed":
        failed = summary.counts.get("failed", 0)
        raise JobFailed(
            f"job {spec.name}: {failed} of {failed + summary.counts.get('generated', 0)} items failed, "
            f"over policy.max_failure_fraction={spec.policy.max_failure_fraction}\n{summary.render()}"
        )
    return summary


def _plan_counts(summary: RunSummary, planner: _Planner) -> None:
    pc = planner.summary_counts
    summary.rows, summary.rows_rejected = pc["rows"], pc["rows_rejected"]
    summary.rejected_now, summary.skipped_done = pc["rejected_now"], pc["skipped_done"]
    summary.blocked_now, summary.superseded_now = pc["blocked_now"], pc["superseded_now"]


def _regenerate_flagged(spec, stages, store, storage, planner, sink, progress) -> int:
    """Regenerate-on-flag: each round plans the next try (new derived seed, own record) of every generated
    item whose decision is in ``policy.regenerate_on`` and that has tries left, and runs it through the same
    stages. Candidates come from the store, so a resumed run picks up where the last one stopped."""
    tries, on = spec.policy.regenerate_tries, spec.policy.regenerate_on
    total = 0
    for _ in range(tries):
        candidates = [it for it in store.iter_items(spec.name) if wants_regeneration(it, tries, on)]
        shards = planner.plan_items(plan_regeneration(candidates, tries, on))
        planned = sum(shard_rows(storage, key) for key in shards)
        if not planned:
            break
        _execute(spec, stages, storage, _KnownShards(shards), sink)
        total += planned
    return total


def _decision_counts(store: AuditStore, job: str) -> dict[str, int]:
    return dict(Counter(it.decision or "unscored" for it in store.iter_items(job) if it.status == "generated"))


def describe_model(spec: JobSpec, resolved: str) -> dict[str, Any]:
    """What a run records of its model: id, revision, dtype, and (for a local directory or a cached HF snapshot,
    whose folder name is its commit) the sha256 of its weight and configuration files."""
    info: dict[str, Any] = {"id": spec.model.id, "revision": spec.model.revision, "resolved": resolved,
                            "dtype": spec.model.dtype}  # fmt: skip
    directory = model_directory(spec.model)
    if directory is not None and directory.is_dir():
        info["weights_sha256"] = model_fingerprint(directory)
        if not is_local(resolved):
            info["commit"] = directory.name  # huggingface_hub's snapshots/<commit>
    return info


def check_model_unchanged(store: AuditStore, job: str, info: dict[str, Any]) -> None:
    """Refuse to resume a job whose model changed under the same id and revision since its last run with them.

    ``item_id`` holds the model's id and revision, not its bytes, so after weights or configs were replaced in
    place (or the dtype changed) a rerun would skip every image as done and make the rest with the new model: one
    job, two models, and an audit log that cannot tell which image came from which."""
    prints = info.get("weights_sha256")
    if not prints or not store.counts(job).get("generated"):
        return
    for run in reversed(store.runs(job)):
        old = run["model_info"] or {}
        if (old.get("id"), old.get("revision")) != (info["id"], info["revision"]) or not old.get("weights_sha256"):
            continue
        before: dict[str, str] = old["weights_sha256"]
        changed = sorted(
            k for k in set(before) | set(prints)
            if (k in before and k in prints and before[k] != prints[k])
            or (k.endswith(".safetensors") and (k in before) != (k in prints))  # files hashed since only by newer runs
        )  # fmt: skip
        if "dtype" in old and old["dtype"] != info["dtype"]:
            changed.append(f"dtype {old['dtype']} → {info['dtype']}")
        if changed:
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            raise SpecError(
                f"model.id: {info['id']!r} (revision {info['revision']!r}) is not the model run {run['id']} of job "
                f"{job} used ({shown} changed), and the job's generated images were made with that one; a rerun "
                "would skip them as done. Give model.revision a new label (for a local directory it only names the "
                "version, and it is part of every item's identity) to generate the job again, or use a new job name"
            )
        return


def close_dead_runs(store: AuditStore, job: str) -> list[int]:
    """Close as ``failed`` the runs of ``job`` still marked ``running``, each with a ``run_ended`` event. Called by
    the lease holder: only it may run the job, so any other open run died (killed, crashed, its machine lost)
    before it could close itself. Returns their ids."""
    dead = [r["id"] for r in store.runs(job) if r["status"] == "running"]
    for run_id in dead:
        store.end_run(run_id, "failed", {}, {"status": "failed", "error": "the run stopped without closing (killed "
                                             "or crashed); closed by the next run of the job"})  # fmt: skip
    return dead


def reconcile_orphans(store: AuditStore, storage: Storage, job: str) -> int:
    """Move every image under the public, review and quarantine prefixes that no record points at into
    ``quarantine/orphans/`` (nothing is deleted) and return how many; delete the temporary objects of writes a
    crash cut short, anywhere under the job root. Orphans come from a crash between the
    image write and the record write whose item then changed (a rerun with the same parameters rewrites the
    same key with the same bytes and records it), or whose decision did: a rerun that passes an item a crashed
    run had blocked writes it under images/, and leaves the unrecorded quarantine/ copy to be moved here."""
    expected = {image_key(it) for it in store.iter_items(job) if it.image_sha256}
    orphans = f"{QUARANTINE_PREFIX}/orphans/"
    image_prefixes = tuple(f"{p}/" for p in (PUBLIC_PREFIX, REVIEW_PREFIX, QUARANTINE_PREFIX, SUPERSEDED_PREFIX))
    moved = 0
    for key in list(storage.walk()):  # the whole job root: results.parquet, summaries and reports are written
        if posixpath.basename(key).startswith(TMP_PREFIX):  # through temporary objects too
            storage.delete(key)  # a write cut short by a crash: partial bytes, never a finished object
        elif key.startswith(image_prefixes) and key not in expected and not key.startswith(orphans):
            storage.move(key, f"{orphans}{key}")
            moved += 1
    return moved


def _write_summary(storage: Storage, summary: RunSummary) -> None:
    """summary.json + summary.md next to the images: the run's outcome outside the database."""
    try:
        storage.write_atomic("summary.json", summary_json(summary).encode())
        storage.write_atomic("summary.md", f"# Run summary\n\n```\n{summary.render()}\n```\n".encode())
    except Exception as exc:  # the summary is a convenience copy; the DB row is the record
        print(f"genpipe: warning: could not write the run summary: {exc}", file=sys.stderr)


def _screen_findings(item: Item) -> list[dict[str, Any]]:
    """The prompt screen's findings on ``item`` (rules and classifier scores; not a screen that errored)."""
    return [r for r in item.reasons if r.get("stage") == "screen" and r.get("code") != "screen_error"]


def _finding_key(reason: dict[str, Any]) -> tuple:
    return reason.get("code"), reason.get("rule") or reason.get("classifier")


def _terminal_view(item: Item) -> tuple:
    """What a rejected or blocked record says: rerecorded when any of it changes."""
    return (item.status, item.prompt_id, item.prompt, json.dumps(item.reasons, sort_keys=True, default=str))


#: How long a Ray run, once Ray is up, waits for a plan still being written before it starts a first wave. A wait
#: saves a second model load per actor when the plan ends just after Ray's start, and delays the first image on
#: every bigger plan by more than the wait itself (200k rows on 2 CPUs: 31 s to the first image with 0, 56 s with
#: 10). Default 0: start at once; raise it where actors load big models.
RAY_PLAN_GRACE_S = float(os.environ.get("GENPIPE_RAY_PLAN_GRACE_S", "0"))


class _PlanningThread:
    """Runs the planner in a thread while execution starts, and hands its shard keys to the executor as they are
    written: ``waves()`` yields, each time it is asked, every key written since (at least one; it waits for
    one), then raises the planner's error, if any, after the shards before it. The local executor takes them
    one by one and generates from the first shard on; the Ray executor runs one Ray Data execution per wave (a
    dataset needs its whole input list when it starts). Leaving the ``with`` block stops planning at the next
    row and waits for the thread."""

    def __init__(self, planner: _Planner) -> None:
        self.planner = planner
        self._keys: queue.Queue = queue.Queue()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._plan, name="genpipe-planner", daemon=True)
        self._head: list[str | None] = []  # a key (or the end marker) taken by has_work(), not yet handed out
        self._ended = False  # the end marker has been taken: nothing more will come
        self._planned = threading.Event()  # the planner thread is done (finished, failed or stopped)

    def __enter__(self) -> _PlanningThread:
        self.planner.on_shard = self._put
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.planner.stop.set()
        self._thread.join()
        self.planner.on_shard = None

    def has_work(self) -> bool:
        """Wait for the first shard: True once one is written, False when planning ended without any."""
        if self._ended:
            return False
        if not self._head:
            self._head.append(self._keys.get())
        return self._head[0] is not None

    def settle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the planner to finish; True if it has. (A Ray run gives a nearly finished
        plan this long, rather than start a second wave — and load every model again — for its last shards.)"""
        return self._planned.wait(timeout_s)

    def waves(self, grow: bool = False) -> Iterator[list[str]]:
        """Each wave: the keys written so far, at least one (waiting for it). With ``grow``, a wave also waits
        until it holds as many keys as all the waves before it together, or planning has ended: the work done
        doubles with each wave, so a run makes at most ~log2(shards) waves however the planner and the executor
        race (each Ray wave starts its actors again)."""
        want, given, end = 1, 0, self._ended
        while not end:
            wave: list[str] = []
            while len(wave) < want:  # waiting
                key = self._head.pop() if self._head else self._keys.get()
                if key is None:
                    end = self._ended = True
                    break
                wave.append(key)
            while not end:  # and every key already written: no waiting
                try:
                    key = self._keys.get_nowait()
                except queue.Empty:
                    break
                if key is None:
                    end = self._ended = True
                else:
                    wave.append(key)
            if wave:
                yield wave
            given += len(wave)
            if grow:
                want = given
        if self._failure is not None:
            raise self._failure

    def _put(self, key: str) -> None:
        if self.planner.stop.is_set():
            raise _PlanningStopped
        self._keys.put(key)

    def _plan(self) -> None:
        try:
            self.planner.run()
        except _PlanningStopped:
            pass
        except BaseException as exc:
            self._failure = exc
        finally:
            self._keys.put(None)
            self._planned.set()


class _KnownShards:
    """A complete list of shard keys (the regeneration pass) in the shape ``_execute`` takes: one wave."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def has_work(self) -> bool:
        return bool(self.keys)

    def settle(self, timeout_s: float) -> bool:
        return True

    def waves(self, grow: bool = False) -> Iterator[list[str]]:
        if self.keys:
            yield self.keys


class _PlanningStopped(Exception):
    """Raised inside the planner thread when execution has ended early (an error): stop planning."""


def _execute(spec: JobSpec, stages: list[Stage], storage: Storage, shards: _PlanningThread | _KnownShards,
             sink) -> None:  # fmt: skip
    """Run the stages over ``shards``, which may still be being planned. The local executor starts on the first
    shard. The Ray executor starts Ray and checks the cluster once there is a first shard, then runs the shards
    planned by then, and the ones planned meanwhile after that, each wave as big as all before it together
    (each wave loads its actors' models again: on a big manifest that costs a model load or two and saves the
    planning time; a plan complete before Ray is up, the common case, is one wave)."""
    if spec.executor == "local":
        from pipeline.executors.local import run_local

        run_local(stages, iter_batches(storage, itertools.chain.from_iterable(shards.waves())), sink)
        return
    from pipeline.executors.ray_data import init_ray, run_ray

    if not shards.has_work():  # nothing to generate (a finished job's rerun): no Ray at all
        for _ in shards.waves():  # (raises the planner's error, if that is why)
            pass
        return
    init_ray()
    _precheck_cluster(spec)
    shards.settle(RAY_PLAN_GRACE_S)
    for wave in shards.waves(grow=True):
        batches = [(key, i) for key in wave for i in range(shard_batches(storage, key))]
        run_ray(stages, batches, storage, spec.resources.batch_size, sink)


def _precheck_cluster(spec: JobSpec) -> None:
    """Refuse, in one line, a job the connected cluster cannot place (e.g. GPUs on a CPU-only cluster) instead of
    letting Ray Data wait forever for resources. GENPIPE_NO_PRECHECK=1 skips it (autoscaling clusters)."""
    import ray

    from pipeline.cluster.resources import check_fit, resource_plan

    if os.environ.get("GENPIPE_NO_PRECHECK") == "1":
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problems = check_fit(resource_plan(spec), nodes)
    if problems:
        raise SpecError(
            f"resources: the Ray cluster cannot run this job: {problems[0]}; lower resources.* or add nodes "
            "(set GENPIPE_NO_PRECHECK=1 on an autoscaling cluster)",
            problems=problems[1:],
        )


def _masked(store: AuditStore) -> str:
    return store.safe_url


def summary_json(summary: RunSummary) -> str:
    return json.dumps(asdict(summary), indent=2, sort_keys=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `genpipe run SPEC` or `python -m jobs.generate SPEC`")
