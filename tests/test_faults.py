"""Exactly-once under faults: actor kills, a crash between image write and record write, a killed driver.

Each test ends by reading the database and the storage and checking invariants I1-I4."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import text

from pipeline.audit import AuditStore
from pipeline.cli import main
from pipeline.config import load_spec
from pipeline.runner import run_job
from pipeline.storage import Storage
from tests.invariants import check_invariants

ROWS = [{"prompt_id": f"sku-{i:03d}", "prompt": f"a studio shot of product {i}"} for i in range(12)]


def _count(db: str, job: str = "test-job") -> int:
    store = AuditStore(db)
    try:
        return sum(store.counts(job).values())
    finally:
        store.dispose()


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_generator_actor_kills_still_give_exactly_once(make_spec, tmp_path, monkeypatch):
    import ray

    log = tmp_path / "kills.log"
    monkeypatch.setenv("GENPIPE_FAULT_KILL_GENERATOR", "0.3")
    monkeypatch.setenv("GENPIPE_FAULT_SEED", "7")  # a reproducible schedule of kills
    monkeypatch.setenv("GENPIPE_FAULT_LOG", str(log))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        db = f"sqlite:///{tmp_path}/audit.db"
        resources = {"generator_actors": 2, "cpus_per_actor": 0.5, "batch_size": 2}
        spec = load_spec(make_spec(ROWS, executor="ray", database=db, sampler={"steps": 2}, resources=resources))
        summary = run_job(spec, quiet=True)
    finally:
        ray.shutdown()
    assert summary.counts == {"generated": 12}
    kills = log.read_text().split()
    assert len(kills) >= 1, "no actor was killed: the drill proved nothing"
    check_invariants(db, str(tmp_path / "out" / "test-job"), "test-job", 12)


def test_crash_between_image_write_and_record_write(make_spec, tmp_path, monkeypatch):
    db = f"sqlite:///{tmp_path}/audit.db"
    path = make_spec(ROWS, database=db, sampler={"steps": 2}, resources={"batch_size": 4})
    recorded: list[int] = []
    original = AuditStore.write_items

    def crash_on_second_write(self, items, run_id):
        # The executor coalesces batches that finish together, so a write holds one batch (4) or more.
        if any(it.status == "generated" for it in items):
            if recorded:
                raise RuntimeError("simulated crash after the images were written")
            recorded.append(len(items))
        return original(self, items, run_id)

    monkeypatch.setattr(AuditStore, "write_items", crash_on_second_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(load_spec(path), quiet=True)
    monkeypatch.setattr(AuditStore, "write_items", original)
    root = Storage(str(tmp_path / "out" / "test-job"))
    done = recorded[0]
    assert 4 <= done < 12 and _count(db) == done
    # The crashed write's images are on storage without a record (the pipeline may have written more ahead).
    assert len(list(root.walk("images"))) >= done + 4

    rerun = run_job(load_spec(path), quiet=True)
    assert rerun.skipped_done == done and rerun.generated_now == 12 - done and rerun.orphans_quarantined == 0
    check_invariants(db, root.root, "test-job", 12)


def test_orphan_that_matches_no_item_is_quarantined_not_deleted(make_spec, tmp_path):
    db = f"sqlite:///{tmp_path}/audit.db"
    run_job(load_spec(make_spec(ROWS[:2], database=db, sampler={"steps": 2})), quiet=True)
    root = Storage(str(tmp_path / "out" / "test-job"))
    root.write_atomic("images/sku-999/sku-999-0000-deadbeef.png", b"left behind by an older manifest")
    rerun = run_job(load_spec(make_spec(ROWS[:2], database=db, sampler={"steps": 2})), quiet=True)
    assert rerun.orphans_quarantined == 1
    assert root.read("quarantine/orphans/images/sku-999/sku-999-0000-deadbeef.png").startswith(b"left behind")
    check_invariants(db, root.root, "test-job", 2)
    # The same under quarantine/: a crashed run blocked an item (image written, record not), the rerun passed it.
    root.write_atomic("quarantine/sku-1/sku-1-0000-0badcafe.png", b"blocked by a crashed run")
    again = run_job(load_spec(make_spec(ROWS[:2], database=db, sampler={"steps": 2})), quiet=True)
    assert again.orphans_quarantined == 1  # and the orphans already there stay where they are
    assert root.read("quarantine/orphans/quarantine/sku-1/sku-1-0000-0badcafe.png") == b"blocked by a crashed run"
    assert root.exists("quarantine/orphans/images/sku-999/sku-999-0000-deadbeef.png")
    check_invariants(db, root.root, "test-job", 2)


def test_temporary_objects_a_crash_left_at_the_job_root_are_swept_by_the_rerun(make_spec, tmp_path):
    # A kill inside open_atomic("results.parquet") (or the summary, the chain head, a report) left its .tmp- object
    # for good: only the image prefixes were swept.
    db = f"sqlite:///{tmp_path}/audit.db"
    run_job(load_spec(make_spec(ROWS[:2], database=db, sampler={"steps": 2})), quiet=True)
    root = Storage(str(tmp_path / "out" / "test-job"))
    left = [".tmp-55ce0c1e-results.parquet", "reports/bias/.tmp-0a1b-bias.json", "images/sku-000/.tmp-77-x.png"]
    for key in left:
        root.write_atomic(key, b"partial")
    run_job(load_spec(make_spec(ROWS[:2], database=db, sampler={"steps": 2})), quiet=True)
    assert [key for key in left if root.exists(key)] == []
    assert root.exists("results.parquet") and root.exists("summary.json")
    check_invariants(db, root.root, "test-job", 2)


@pytest.mark.timeout(240)
def test_killed_driver_then_rerun_completes_without_duplicates(make_spec, tmp_path):
    db = f"sqlite:///{tmp_path}/audit.db"
    rows = [{"prompt_id": f"p{i:03d}", "prompt": f"banner {i}"} for i in range(40)]
    path = make_spec(rows, database=db, sampler={"steps": 4}, resources={"batch_size": 2})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", path, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(f"{tmp_path}/audit.db") and _safe_count(db) >= 10:
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    recorded = _count(db)
    assert 10 <= recorded < 40

    rerun = run_job(load_spec(path), quiet=True)
    assert rerun.skipped_done == recorded and rerun.generated_now == 40 - recorded
    check_invariants(db, str(tmp_path / "out" / "test-job"), "test-job", 40)
    # The killed run no longer shows as running for ever: the rerun closed it, with an event in the chain.
    store = AuditStore(db)
    try:
        runs = store.runs("test-job")
        with store.engine.connect() as conn:
            sql = "SELECT run_id FROM events WHERE kind = 'run_ended' ORDER BY seq"
            ended = [r for (r,) in conn.execute(text(sql))]
    finally:
        store.dispose()
    assert [(r["id"], r["status"]) for r in runs] == [(1, "failed"), (2, "succeeded")]
    assert "stopped without closing" in runs[0]["summary"]["error"] and runs[0]["ended_at"] is not None
    assert ended == [1, 2]
    assert main(["audit", "verify", "--db", db]) == 0


def _safe_count(db: str) -> int:
    try:
        return _count(db)
    except Exception:  # the database may not have its tables yet
        return 0


def test_concurrent_runs_of_one_job_one_runs_the_other_says_already_running(make_spec, tmp_path):
    db = f"sqlite:///{tmp_path}/audit.db"
    from pipeline.audit.lease import JobAlreadyRunning

    rows = [{"prompt_id": f"p{i:03d}", "prompt": f"banner {i}"} for i in range(24)]
    path = make_spec(rows, database=db, sampler={"steps": 8}, resources={"batch_size": 2})
    first = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", path, "--quiet"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _safe_count(db) == 0 and first.poll() is None:
        time.sleep(0.3)
    assert first.poll() is None, "the first run ended before the second could collide with it"
    with pytest.raises(JobAlreadyRunning, match=r"job test-job is already running \(host .*, pid \d+\)") as info:
        run_job(load_spec(path), quiet=True)  # in-process: it collides at once, while the first is mid-run
    assert "\n" not in info.value.render()
    assert first.poll() is None, "the first run finished before the collision was checked"
    assert first.wait(timeout=180) == 0, first.stderr.read()[-2000:]
    check_invariants(db, str(tmp_path / "out" / "test-job"), "test-job", 24)
    assert run_job(load_spec(path), quiet=True).generated_now == 0  # the lease was released


def test_a_dead_holders_lease_does_not_block_a_rerun(make_spec, tmp_path):
    from pipeline.audit.lease import JobAlreadyRunning, JobLease

    db = f"sqlite:///{tmp_path}/audit.db"
    store = AuditStore(db)
    try:
        dead = JobLease(store, "test-job", ttl_s=3600)
        dead.pid = 2**22 + 12345  # no such process on this host: its holder is dead
        dead.acquire()
        dead._stop.set()
        JobLease(store, "test-job").acquire().release()  # taken over at once
        live = JobLease(store, "test-job", ttl_s=3600).acquire()
        with pytest.raises(JobAlreadyRunning, match="already running"):
            JobLease(store, "test-job").acquire()
        live.release()
        other_host = JobLease(store, "test-job", ttl_s=0.5)
        other_host.host = "some-other-node"
        other_host.acquire()
        other_host._stop.set()
        time.sleep(0.6)
        JobLease(store, "test-job").acquire().release()  # expired on its own
    finally:
        store.dispose()


def test_a_run_whose_lease_was_taken_over_stops_and_records_nothing_more(make_spec, tmp_path, monkeypatch):
    from sqlalchemy import update

    from pipeline.audit import lease
    from pipeline.audit.schema import LeaseRow

    monkeypatch.setattr(lease, "DEFAULT_TTL_S", 0.3)  # heartbeat every 0.1 s
    real_write_items = AuditStore.write_items
    writes: list[int] = []

    def write_items(self, items, run_id):
        real_write_items(self, items, run_id)
        writes.append(len(items))
        if len(writes) == 1:  # after the first batch: the lease "expired" and another run took the job over
            self._write(
                "take over",
                lambda conn: conn.execute(update(LeaseRow).values(holder="another-run", expires_at=time.time() + 3600)),
            )
            time.sleep(1.0)  # a few heartbeats: this run notices

    monkeypatch.setattr(AuditStore, "write_items", write_items)
    db = f"sqlite:///{tmp_path}/audit.db"
    path = make_spec(ROWS, database=db, resources={"batch_size": 4})
    with pytest.raises(lease.LeaseLost, match="another run took the job over"):
        run_job(load_spec(path), quiet=True)
    store = AuditStore(db)
    try:
        assert writes == [4]  # nothing recorded after the takeover was seen
        assert store.counts("test-job") == {"generated": 4}
        assert store.runs("test-job")[-1]["status"] == "failed"
        # the other run's lease is left alone: release deletes only this run's own row
        with pytest.raises(lease.JobAlreadyRunning):
            lease.JobLease(store, "test-job").acquire()
    finally:
        store.dispose()


def test_permanent_item_failures_are_recorded_and_the_error_budget_decides(make_spec, tmp_path):
    from pipeline.errors import JobFailed

    rows = [{"prompt_id": f"ok-{i}", "prompt": f"a lamp {i}"} for i in range(3)]
    rows.append({"prompt_id": "broken", "prompt": "a lamp in a missing style", "lora": str(tmp_path / "no-such")})
    db = f"sqlite:///{tmp_path}/audit.db"
    allowed = {"row_lora_sources": [str(tmp_path)]}
    with pytest.raises(JobFailed, match=r"1 of 4 items failed, over policy.max_failure_fraction=0.0"):
        run_job(load_spec(make_spec(rows, database=db, sampler={"steps": 2}, model=allowed)), quiet=True)
    store = AuditStore(db)
    try:
        items = {it.prompt_id: it for it in store.iter_items("test-job")}
        runs = store.runs("test-job")
    finally:
        store.dispose()
    failed = items["broken"]
    assert failed.status == "failed" and failed.error and failed.reasons[-1]["exception"] in failed.error
    assert all(items[f"ok-{i}"].status == "generated" for i in range(3))  # the job went on
    assert runs[-1]["status"] == "failed"
    # Within budget the same job succeeds (the rerun retries the failed item, which fails again).
    summary = run_job(load_spec(make_spec(rows, database=db, sampler={"steps": 2}, model=allowed,
                                          policy={"max_failure_fraction": 0.5})), quiet=True)  # fmt: skip
    assert summary.status == "succeeded" and summary.failed_now == 1 and summary.counts["failed"] == 1
