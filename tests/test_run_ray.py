"""Ray Data end to end: the tiny model on a local Ray with 2 generator actors; rerun resumes; the demo job."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.audit import AuditStore
from pipeline.config import load_spec
from pipeline.runner import run_job
from tests.invariants import check_invariants

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

ROWS = [{"prompt_id": f"p{i:02d}", "prompt": f"product shot number {i}", "campaign": "c"} for i in range(10)]
ROWS += [{"prompt_id": "p03", "prompt": "duplicate"}, {"prompt_id": "bad", "prompt": "x", "steps": -1}]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_data_run_with_two_generator_actors(ray_local, make_spec, tmp_path):
    db = f"sqlite:///{tmp_path}/audit.db"
    path = make_spec(ROWS, executor="ray", database=db, image={"images_per_prompt": 2},
                     resources={"generator_actors": 2, "cpus_per_actor": 0.5, "batch_size": 3})  # fmt: skip
    summary = run_job(load_spec(path), quiet=True)
    assert summary.counts == {"generated": 20, "rejected": 4}
    check_invariants(db, str(tmp_path / "out" / "test-job"), "test-job", 24)
    store = AuditStore(db)
    first = {it.item_id: it.image_sha256 for it in store.iter_items("test-job")}
    store.dispose()

    again = run_job(load_spec(path), quiet=True)
    assert again.generated_now == 0 and again.skipped_done == 20
    check_invariants(db, str(tmp_path / "out" / "test-job"), "test-job", 24)

    # The same items through the local executor at another batch size give byte-identical images.
    local_db = f"sqlite:///{tmp_path}/local.db"
    local = make_spec(ROWS, executor="local", database=local_db, output=str(tmp_path / "local"),
                      image={"images_per_prompt": 2}, resources={"batch_size": 1})  # fmt: skip
    run_job(load_spec(local), quiet=True)
    store = AuditStore(local_db)
    assert {it.item_id: it.image_sha256 for it in store.iter_items("test-job")} == first
    store.dispose()


def test_a_job_the_cluster_cannot_place_fails_in_one_line(ray_local, make_spec, tmp_path):
    from pipeline.errors import SpecError

    path = make_spec(ROWS, executor="ray", database=f"sqlite:///{tmp_path}/a.db", resources={"gpus_per_actor": 1})
    with pytest.raises(SpecError, match=r"resources: the Ray cluster cannot run this job: .*GPU"):
        run_job(load_spec(path), quiet=True)


@pytest.mark.timeout(420)
def test_demo_job_from_the_cli_and_its_rerun(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "pipeline.cli", "demo", "--quiet", "--set", f"output={out}",
           "--set", "resources.cpus_per_actor=0.4"]  # fmt: skip
    # From another directory: the bundled manifest is found wherever genpipe runs.
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "generated 26, rejected 4, blocked 1, failed 0" in first.stdout, first.stdout
    assert "decisions: pass 26" in first.stdout and "bias report:" in first.stdout, first.stdout
    spec = load_spec("jobs/demo/spec.yaml", [f"output={out}"])
    check_invariants(spec.database_url(), str(out / spec.name), spec.name, 31)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "this run: generated 0, failed 0, skipped 26 already done" in second.stdout, second.stdout
    check_invariants(spec.database_url(), str(out / spec.name), spec.name, 31)


def test_ray_starts_while_the_plan_is_still_being_written(ray_local, make_spec, tmp_path, monkeypatch):
    """Ray's start and the cluster check do not wait for the plan, and neither does generation: the shards planned
    by the time Ray is up run as a first wave while the planner goes on; the rest follow as a second. Here the
    planner writes its last shard only once the first wave has started (else this waits, and fails)."""
    import threading

    from pipeline import runner
    from pipeline.executors import ray_data

    monkeypatch.setattr(runner, "PLAN_SHARD_ITEMS", 4)
    monkeypatch.setattr(runner, "RAY_PLAN_GRACE_S", 0.5)  # (the planner here waits for the first wave)
    first_wave = threading.Event()
    waited: list[bool] = []
    waves: list[int] = []
    original_run, original_flush = ray_data.run_ray, runner._Planner._flush_shard

    def run_ray(stages, batches, *args, **kwargs):
        waves.append(len(batches))
        first_wave.set()
        original_run(stages, batches, *args, **kwargs)

    def flush_shard(self):
        if len(self.shards) == 2 and self._pending:  # the third and last shard
            waited.append(first_wave.wait(timeout=120))
        original_flush(self)

    monkeypatch.setattr(ray_data, "run_ray", run_ray)
    monkeypatch.setattr(runner._Planner, "_flush_shard", flush_shard)
    db = f"sqlite:///{tmp_path}/audit.db"
    path = make_spec(ROWS[:10], executor="ray", database=db, resources={"cpus_per_actor": 0.5, "batch_size": 2})
    summary = run_job(load_spec(path), quiet=True)
    # shards of 4, 4 and 2 items in batches of 2: the first two shards (4 batches), then the last (1 batch)
    assert waited == [True] and waves == [4, 1] and summary.counts == {"generated": 10}
    check_invariants(db, str(tmp_path / "out" / "test-job"), "test-job", 10)  # each item once


def test_a_planning_error_ends_the_ray_run_and_is_raised(ray_local, make_spec, tmp_path, plan_fails_after_one_shard):
    db = f"sqlite:///{tmp_path}/audit.db"
    path = make_spec(ROWS[:10], executor="ray", database=db, resources={"cpus_per_actor": 0.5, "batch_size": 2})
    with pytest.raises(OSError, match="plan storage is full"):
        run_job(load_spec(path), quiet=True)
    store = AuditStore(db)
    # The shard planned before the error ran (as on the local executor); then the error; the run is failed.
    assert store.counts("test-job") == {"generated": 4} and store.runs("test-job")[-1]["status"] == "failed"
    store.dispose()
