"""``genpipe report bias --db URL --job NAME [--out URL]``: the set-level bias report of a job.

Registered into the main parser by ``register(subparsers)``. The report goes to ``--out``, or by default under the
job's own output root (from the spec the audit DB recorded for the job): ``{output}/{job}/reports/bias/``.
"""

from __future__ import annotations

import argparse
import os
import posixpath
from typing import Any

from pipeline.errors import GenpipeError


def job_spec(store: Any, job: str) -> dict[str, Any] | None:
    """The spec recorded for ``job`` by its latest run, or None."""
    getter = getattr(store, "job_spec", None)
    if callable(getter):
        return getter(job)
    from sqlalchemy import select

    from pipeline.audit.schema import JobRow

    with store.engine.connect() as conn:
        return conn.execute(select(JobRow.spec).where(JobRow.name == job)).scalar_one_or_none()


def _job_root(output: str, job: str) -> str:
    """The job's output root from its recorded ``output``. A relative path is relative to the directory the job
    ran in, which the audit DB does not know: used only when the job's folder is there from here too."""
    root = posixpath.join(output.rstrip("/"), job)
    if "://" in output or os.path.isabs(output) or os.path.isdir(root):
        return root
    raise GenpipeError(f"job {job!r}: its output {output!r} is relative to the directory it ran in, and "
                       f"{os.path.abspath(root)} is not a folder; run from that directory, or pass --out")  # fmt: skip


def _cmd_bias(args: argparse.Namespace) -> int:
    from pipeline.audit import AuditStore, AuditStoreError
    from pipeline.report.bias import REPORT_PREFIX, write_bias_report
    from pipeline.storage import Storage, StorageError
    from schemas.spec import BiasSpec

    try:
        store = AuditStore(args.db, migrate=False)  # a report reads: it never creates or migrates a database
    except AuditStoreError as exc:
        raise GenpipeError(str(exc)) from None
    try:
        spec = job_spec(store, args.job)
        if spec is None and not store.counts(args.job):
            raise GenpipeError(f"job {args.job!r}: no such job in {store.safe_url}")
        bias = (spec or {}).get("scoring", {}).get("bias")
        config = BiasSpec.model_validate(bias) if bias else BiasSpec()
        if args.out:
            storage, prefix = Storage(args.out), ""
        elif spec and spec.get("output"):
            storage, prefix = Storage(_job_root(spec["output"], args.job)), REPORT_PREFIX
        else:
            raise GenpipeError(f"job {args.job!r}: the audit DB has no output location for it; pass --out")
        try:
            urls = write_bias_report(store.iter_items(args.job), storage, args.job, config, prefix=prefix)
        except (OSError, StorageError) as exc:
            where = args.out or storage.url(prefix)
            raise GenpipeError(f"bias report: cannot write to {where}: {type(exc).__name__}: {exc}") from None
    finally:
        store.dispose()
    for name, url in urls.items():
        print(f"{name}: {url}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``report`` (with ``bias``) to the ``genpipe`` sub-commands; handlers are set as ``fn``."""
    report = subparsers.add_parser("report", help="set-level reports over a job's audit records")
    rsub = report.add_subparsers(dest="report_command", required=True)
    p = rsub.add_parser(
        "bias",
        help="perceived-attribute skew per job, campaign and prompt template (markdown + JSON + PNG plots)",
        description="Write the bias report of a job: bias.md, bias.json and one bias_<attribute>.png per attribute.",
    )
    p.add_argument("--db", required=True, help="SQLAlchemy URL of the audit DB")
    p.add_argument("--job", required=True, help="job name")
    p.add_argument("--out", help="directory or fsspec URL for the report (default: {output}/{job}/reports/bias)")
    p.set_defaults(fn=_cmd_bias)
    return report
