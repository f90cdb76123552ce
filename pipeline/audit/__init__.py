"""The audit log: jobs, runs, one record per item, reviewers and reviews, in SQLite or PostgreSQL, with every
change hash-chained in ``events`` (tamper evidence).

Modules, each with one entry point:
    schema      the tables (SQLAlchemy models); migrations/ brings a database to them (``migrate.upgrade``)
    store       ``AuditStore``: every read and write the pipeline and the review page make
    chain       canonical JSON, the event hash, ``append_events`` (under the chain lock)
    reviews     reviewer accounts, review events, effective decisions (``AuditStore`` delegates here)
    verify      ``verify(store, images=, anchors=)`` -> ``VerifyReport``: chain, rows, images, anchors
    anchor      ``write_chain_anchor(store, job_root, job)``: chain_head.json next to a job's images
    query       ``iter_records(store, QueryFilters)`` (one parameterised SELECT), ``export_approved``
    formats     table / json / csv / parquet writers that stream, ``open_output`` (atomic, fsspec)
    records     the public record shape (``item_to_record``) and results.parquet
    cli         ``genpipe audit migrate | verify | query | export | history | add-reviewer | review``
"""

from pipeline.audit.anchor import write_chain_anchor
from pipeline.audit.records import RESULTS_SCHEMA, item_to_record, write_results_parquet
from pipeline.audit.store import AuditStore, AuditStoreError
from pipeline.audit.verify import VerifyReport, verify

__all__ = [
    "RESULTS_SCHEMA",
    "AuditStore",
    "AuditStoreError",
    "VerifyReport",
    "item_to_record",
    "verify",
    "write_chain_anchor",
    "write_results_parquet",
]
