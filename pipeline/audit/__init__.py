"""The audit log: jobs, runs and one record per item, in SQLite or PostgreSQL."""

from pipeline.audit.records import RESULTS_SCHEMA, item_to_record, write_results_parquet
from pipeline.audit.store import AuditStore, AuditStoreError

__all__ = ["RESULTS_SCHEMA", "AuditStore", "AuditStoreError", "item_to_record", "write_results_parquet"]
