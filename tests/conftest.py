"""Shared test set-up: offline hub, a per-session tiny-model cache, helpers to write manifests and specs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

pytest_plugins = ["tests.pg"]


def write_manifest(path, rows: list[dict], schema: pa.Schema | None = None) -> str:
    # from_pylist takes its columns from the first row only; give every row every key.
    keys = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows], schema=schema)
    pq.write_table(table, str(path))
    return str(path)


@pytest.fixture
def make_spec(tmp_path):
    """Write a spec YAML for a small local job and return its path; keyword args override top-level keys."""

    def _make(rows: list[dict] | None = None, **overrides) -> str:
        manifest = overrides.pop("manifest", None)
        if manifest is None:
            manifest = write_manifest(tmp_path / "manifest.parquet", rows or [])
        data = {
            "name": "test-job",
            "manifest": manifest,
            "output": str(tmp_path / "out"),
            "executor": "local",
            "sampler": {"name": "euler", "steps": 4, "guidance_scale": 5.0},
            "image": {"width": 32, "height": 32},
            "resources": {"batch_size": 4},
            # Scoring is its own concern (tests/test_scoring_*, test_run_local's scored run, the demo test);
            # run tests about orchestration and faults without it, so they stay fast on 2 cores.
            "scoring": {"enabled": False},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return _make


@pytest.fixture
def plan_fails_after_one_shard(monkeypatch):
    """Plan shards of 4 items, and make writing the second one fail with ``OSError("plan storage is full")``.
    Returns ``heal()``, which makes planning work again (for a rerun)."""
    from pipeline import runner

    monkeypatch.setattr(runner, "PLAN_SHARD_ITEMS", 4)
    original_flush = runner._Planner._flush_shard

    def flush_shard(self):
        if len(self.shards) == 1 and self._pending:
            raise OSError("plan storage is full")
        original_flush(self)

    monkeypatch.setattr(runner._Planner, "_flush_shard", flush_shard)
    return lambda: monkeypatch.setattr(runner._Planner, "_flush_shard", original_flush)
