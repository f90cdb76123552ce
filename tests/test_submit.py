"""``genpipe submit | status | logs | stop`` against a real two-node Ray cluster (``ray start --head`` on
127.0.0.1 + one worker node, token authentication on), started and stopped by ``tests.cluster``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pipeline.config import load_spec
from tests import cluster as local_cluster
from tests.invariants import check_invariants

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

ray_cluster = local_cluster.ray_cluster  # the module-scoped fixture

REPO = Path(__file__).resolve().parents[1]
DEMO = "jobs/demo/spec.yaml"
DEMO_ITEMS = 31  # as in test_run_ray: 26 generated + 4 rejected rows + 1 prompt blocked by the screen


def genpipe(cluster, *args: str, env: dict[str, str] | None = None, timeout: float = 280):
    """Run the CLI as an operator would, with the cluster's token in the environment."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args, "--address", cluster.dashboard_url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**cluster.env, **(env or {})},
    )


def cluster_jobs(cluster) -> list[dict]:
    r = requests.get(
        f"{cluster.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {cluster.token}"}, timeout=10
    )
    r.raise_for_status()
    return r.json()


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("genpipe: error: "), err
    return err


def test_gpu_spec_on_a_cpu_only_cluster_is_refused_before_submitting(ray_cluster, tmp_path):
    start = time.monotonic()
    done = genpipe(
        ray_cluster, "submit", DEMO, "--set", f"output={tmp_path}/out", "--set", "resources.gpus_per_actor=1"
    )
    err = one_line_error(done)
    assert err.startswith(
        f"genpipe: error: the cluster at {ray_cluster.dashboard_url} cannot run demo-spring-catalogue: "
        "the spec asks for 2.25 GPUs (2 generator actors × 1 GPU + 1 scorer actor × 0.25 GPU)"
    )
    assert "but the cluster has no GPUs" in err and "--no-precheck" in err
    assert time.monotonic() - start < 60
    assert cluster_jobs(ray_cluster) == []


def test_without_the_token_or_with_a_wrong_one(ray_cluster, tmp_path):
    args = ("submit", DEMO, "--set", f"output={tmp_path}/out")
    err = one_line_error(genpipe(ray_cluster, *args, env={"RAY_AUTH_MODE": "disabled"}))
    assert err == (
        f"genpipe: error: the Ray cluster at {ray_cluster.dashboard_url} requires a token (token "
        "authentication is on) and none was sent (RAY_AUTH_MODE=disabled); set RAY_AUTH_TOKEN or "
        "RAY_AUTH_TOKEN_PATH (see infra/README.md)"
    )
    done = genpipe(ray_cluster, *args, env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert "rejected the token from RAY_AUTH_TOKEN" in one_line_error(done)
    assert "not-the-token" not in done.stderr + done.stdout


def test_demo_job_runs_to_succeeded_through_genpipe_submit(ray_cluster, tmp_path):
    out = tmp_path / "out"
    # Fewer steps than the demo's 20: this machine's two cores are shared with other suites.
    sets = ["--set", f"output={out}", "--set", "resources.cpus_per_actor=0.25", "--set", "sampler.steps=8"]
    done = genpipe(ray_cluster, "submit", DEMO, *sets, "--wait", env={"GENPIPE_TEST_SECRET_TOKEN": "hunter2"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sid = done.stdout.split()[1]
    assert done.stdout.startswith(f"submitted {sid} to {ray_cluster.dashboard_url}")
    assert f"{sid}: SUCCEEDED" in done.stdout and "generated 26, rejected 4, blocked 1, failed 0" in done.stdout
    spec = load_spec(str(REPO / DEMO), [f"output={out}", "sampler.steps=8"])
    check_invariants(spec.database_url(), str(out / spec.name), spec.name, DEMO_ITEMS)

    status = genpipe(ray_cluster, "status", sid)
    assert status.returncode == 0 and status.stdout.startswith(f"{sid}: SUCCEEDED"), status.stderr
    assert f"job:        demo-spring-catalogue (spec {DEMO})" in status.stdout
    logs = genpipe(ray_cluster, "logs", sid)
    assert logs.returncode == 0 and "job demo-spring-catalogue (run 1): succeeded" in logs.stdout
    (info,) = [j for j in cluster_jobs(ray_cluster) if j["submission_id"] == sid]
    assert info["entrypoint"] == f"python -m jobs.generate {DEMO} " + " ".join(sets)
    assert info["metadata"]["genpipe_job"] == "demo-spring-catalogue"
    assert "hunter2" not in json.dumps(info) and ray_cluster.token not in json.dumps(info) + logs.stdout


def test_a_running_job_name_is_refused_and_stop_ends_it(ray_cluster, tmp_path):
    # GPU actors on a CPU-only cluster never start: with the precheck off the job waits, RUNNING, burning nothing.
    sets = ["--set", f"output={tmp_path}/out", "--set", "resources.gpus_per_actor=1", "--no-precheck"]
    first = genpipe(ray_cluster, "submit", DEMO, *sets)
    assert first.returncode == 0, first.stderr
    sid = first.stdout.split()[1]
    assert _wait_for_status(ray_cluster, sid, {"RUNNING"}) == "RUNNING"

    err = one_line_error(genpipe(ray_cluster, "submit", DEMO, *sets))
    assert f"job demo-spring-catalogue is already running on {ray_cluster.dashboard_url} as {sid}" in err
    assert f"genpipe stop {sid} --address {ray_cluster.dashboard_url}" in err

    status = genpipe(ray_cluster, "status", sid)
    assert status.returncode == 0 and status.stdout.startswith(f"{sid}: RUNNING")
    stop = genpipe(ray_cluster, "stop", sid)
    assert stop.returncode == 0 and stop.stdout.strip() == f"stop requested for {sid}; status now STOPPED", stop
    assert genpipe(ray_cluster, "status", sid).stdout.startswith(f"{sid}: STOPPED")
    follow = genpipe(ray_cluster, "logs", sid, "--follow", timeout=60)  # a finished job's stream ends by itself
    assert follow.returncode == 0 and f"Running entrypoint for job {sid}" in follow.stdout
    again = genpipe(ray_cluster, "stop", sid)
    assert again.returncode == 0 and again.stdout.strip() == f"{sid} had already finished: STOPPED"
    assert "no job nope on the cluster" in one_line_error(genpipe(ray_cluster, "status", "nope"))


def _wait_for_status(cluster, sid: str, wanted: set[str], timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    status = "?"
    while time.monotonic() < deadline:
        status = next(j["status"] for j in cluster_jobs(cluster) if j["submission_id"] == sid)
        if status in wanted:
            return status
        time.sleep(1.0)
    return status
