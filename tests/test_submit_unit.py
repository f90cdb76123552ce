"""Cluster submission without a cluster: the resource plan and its fit check (no GPUs needed), what a submission
carries (and what it must not), addresses and tokens, and the fast one-line error for an unreachable address."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.cluster import connection
from pipeline.cluster.connection import ClusterError, Dashboard, auth_token, resolve_address
from pipeline.cluster.resources import check_fit, describe, resource_plan
from pipeline.cluster.submit import build_submission, check_overrides, forwarded_env, running_jobs
from pipeline.config import load_spec
from pipeline.runner import build_stages
from pipeline.stages.score import build_scoring_stages

REPO = Path(__file__).resolve().parents[1]
DEMO = "jobs/demo/spec.yaml"
GPU_JOB = [
    "resources.generator_actors=8",
    "resources.gpus_per_actor=1",
    "resources.cpus_per_actor=4",
    "resources.scorer_gpu_fraction=0.25",
    "scoring.actors=8",
    "scoring.cpus_per_actor=0.5",
]


def spec_with(*overrides: str):
    return load_spec(str(REPO / DEMO), list(overrides))


# --- the resource plan ----------------------------------------------------------------------------------------
def test_plan_of_eight_gpu_generators_with_quarter_gpu_scorers():
    plan = resource_plan(spec_with(*GPU_JOB))
    assert plan["actors"] == {
        "generator": {"count": 8, "num_gpus": 1.0, "num_cpus": 4.0},
        "scorer": {"count": 8, "num_gpus": 0.25, "num_cpus": 0.5},
    }
    assert plan["total_gpus"] == 10.0  # 8 × 1 + 8 × 0.25
    assert plan["tasks"] == {"writer": {"num_cpus": 0.25}, "reader": {"num_cpus": 0.1}}
    assert plan["total_cpus"] == 8 * 4 + 8 * 0.5 + 0.25  # every actor + the largest task (a writer)
    assert describe(plan) == "8 generator actors × 1 GPU + 8 scorer actors × 0.25 GPU"


def test_plan_equals_what_the_stages_request():
    """The numbers checked are the numbers the executor hands to map_batches."""
    spec = spec_with(*GPU_JOB)
    plan = resource_plan(spec)
    generator, writer = build_stages(spec)[0], build_stages(spec)[-1]
    (scorer,) = build_scoring_stages(spec)
    assert plan["actors"]["generator"] == {
        "count": generator.resources.concurrency,
        "num_gpus": generator.resources.num_gpus,
        "num_cpus": generator.resources.num_cpus,
    }
    assert plan["actors"]["scorer"] == {
        "count": scorer.resources.concurrency,
        "num_gpus": scorer.resources.num_gpus,
        "num_cpus": scorer.resources.num_cpus,
    }
    assert plan["tasks"]["writer"] == {"num_cpus": writer.resources.num_cpus}


def test_cpu_jobs_and_scoring_off():
    cpu = resource_plan(spec_with("resources.generator_actors=3", "resources.cpus_per_actor=0.5"))
    assert cpu["total_gpus"] == 0.0 and cpu["actors"]["scorer"]["num_gpus"] == 0.0  # no GPU share without GPUs
    assert cpu["actors"]["generator"] == {"count": 3, "num_gpus": 0.0, "num_cpus": 0.5}
    off = resource_plan(spec_with(*GPU_JOB, "scoring.enabled=false"))
    assert set(off["actors"]) == {"generator"} and off["total_gpus"] == 8.0


# --- does it fit ---------------------------------------------------------------------------------------------
def test_fit_checks_without_gpus():
    plan = resource_plan(spec_with(*GPU_JOB))
    head = {"CPU": 0.0}  # KubeRay head: no GPUs, no tasks
    (one_node,) = check_fit(plan, [head, {"CPU": 64, "GPU": 8}])
    assert one_node == (
        "the spec asks for 10 GPUs (8 generator actors × 1 GPU + 8 scorer actors × 0.25 GPU) but the cluster has 8 GPUs"
    )
    assert check_fit(plan, [head, {"CPU": 64, "GPU": 8}, {"CPU": 8, "GPU": 2}]) == []
    assert check_fit(plan, [head, {"CPU": 40, "GPU": 5}, {"CPU": 40, "GPU": 5}]) == []
    cpu_only = check_fit(plan, [{"CPU": 1}, {"CPU": 1}])
    assert "the spec asks for 10 GPUs" in cpu_only[0] and "the cluster has no GPUs" in cpu_only[0]


def test_fit_checks_per_node_and_whole_gpus():
    two_gpu = resource_plan(spec_with("resources.generator_actors=2", "resources.gpus_per_actor=2"))
    assert check_fit(two_gpu, [{"CPU": 8, "GPU": 1}] * 5) == [
        "each generator actor asks for 2 GPUs but the largest node has 1"
    ]
    assert check_fit(two_gpu, [{"CPU": 8, "GPU": 2}] * 3) == []
    odd = resource_plan(spec_with("resources.gpus_per_actor=1.5"))
    assert "above 1 Ray needs a whole number" in check_fit(odd, [{"CPU": 8, "GPU": 8}])[0]
    big_cpu = resource_plan(spec_with("resources.cpus_per_actor=4"))
    assert "each generator actor asks for 4 CPUs but the largest node has 2" in check_fit(big_cpu, [{"CPU": 2}] * 4)


def test_fit_places_actors_the_way_ray_data_spreads_them():
    # Enough CPUs in total, but 0.6-CPU actors spread one per 1-CPU node leave 0.4 everywhere: the 4th never starts.
    four = resource_plan(
        spec_with("resources.generator_actors=4", "resources.cpus_per_actor=0.6", "scoring.enabled=false")
    )
    (problem,) = check_fit(four, [{"CPU": 1}] * 3)
    assert "a generator actor (0 GPU, 0.6 CPU) finds no node with room once the others are placed" in problem
    # Every actor starts, but what is left on each node is too little for a writer task: the job would hang.
    three = resource_plan(
        spec_with("resources.generator_actors=3", "resources.cpus_per_actor=0.8", "scoring.cpus_per_actor=0.1")
    )
    (problem,) = check_fit(three, [{"CPU": 1}] * 3)
    assert "no node has the 0.25 CPU a writer task needs, so the job would wait forever" in problem
    assert check_fit(three, [{"CPU": 1}] * 4) == []
    demo = resource_plan(spec_with("resources.cpus_per_actor=0.25"))
    assert check_fit(demo, [{"CPU": 1}, {"CPU": 1}]) == []  # the submission test's cluster


# --- what a submission carries ---------------------------------------------------------------------------------
def test_submission_of_the_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = str(tmp_path / "out")
    sub = build_submission(DEMO, spec_with(f"output={out}"), [f"output={out}"], ".")
    assert sub.entrypoint == f"python -m jobs.generate jobs/demo/spec.yaml --set output={out}"
    assert sub.runtime_env["working_dir"] == str(REPO)
    assert {".venv", ".git", "runs", "__pycache__"} <= set(sub.runtime_env["excludes"])
    assert sub.metadata == {
        "genpipe_job": "demo-spring-catalogue",
        "genpipe_spec": DEMO,
        "genpipe_submitter": "genpipe submit",
    }
    assert sub.submission_id.startswith("demo-spring-catalogue-") and len(sub.submission_id.split("-")[-1]) == 4


def test_submission_refuses_paths_the_cluster_would_not_see(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ClusterError, match="output: runs/demo is a relative local path"):
        build_submission(DEMO, spec_with(), [], ".")
    outside = tmp_path / "spec.yaml"
    outside.write_text((REPO / DEMO).read_text())
    with pytest.raises(ClusterError, match="is outside the working directory"):
        build_submission(str(outside), spec_with("output=s3://b/o"), [], ".")


def test_env_allow_list_and_secrets():
    environ = {
        "HF_HUB_OFFLINE": "1",
        "AWS_REGION": "eu-west-1",
        "GENPIPE_CACHE": "/c",
        "HOME": "/root",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "GENPIPE_DB_PASSWORD": "hunter2",
        "RAY_AUTH_TOKEN": "tok",
        "GENPIPE_FAULT_KILL_GENERATOR": "0.2",
    }
    env, skipped = forwarded_env([], environ)
    assert env == {
        "HF_HUB_OFFLINE": "1",
        "AWS_REGION": "eu-west-1",
        "GENPIPE_CACHE": "/c",
        "GENPIPE_FAULT_KILL_GENERATOR": "0.2",
    }
    assert skipped == ["GENPIPE_DB_PASSWORD"]
    env, skipped = forwarded_env(["GENPIPE_DB_PASSWORD", "AWS_SECRET_ACCESS_KEY"], environ)
    assert env["GENPIPE_DB_PASSWORD"] == "hunter2" and env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and not skipped
    with pytest.raises(ClusterError, match="--env NOPE: not set"):
        forwarded_env(["NOPE"], environ)
    with pytest.raises(ClusterError, match="own Ray token"):
        forwarded_env(["RAY_AUTH_TOKEN"], environ)


def test_overrides_with_a_password_are_refused_without_echoing_it():
    check_overrides(["database=postgresql://genpipe@db/audit", "resources.batch_size=8"])
    with pytest.raises(ClusterError) as err:
        check_overrides(["database=postgresql://genpipe:hunter2@db/audit"])
    assert "--set database: the value carries a password" in str(err.value) and "hunter2" not in str(err.value)
    for leaky in ("postgresql://genpipe:hunter/2@db/audit", "postgresql://genpipe@db/audit?password=hunter2",
                  "postgresql://db/audit?sslmode=require&PASSWORD=x", "s3://b/o?token=abc"):  # fmt: skip
        with pytest.raises(ClusterError, match="carries a password"):
            check_overrides([f"database={leaky}"])
    check_overrides(["output=s3://bucket/runs/a:b", "manifest=s3://b/m.parquet?versionId=3"])  # no secret here
    # An "@" in the path of a storage or web URL is no password (RFC 3986: the authority ends at the first "/").
    check_overrides(["model.id=http://host:8080/models/a@b", "output=s3://bucket:x/runs/v@2"])
    for leaky in ("https://u:hunter2@cdn.internal/lora", "s3://key:secret@bucket/o", "mysql+pymysql://u:p/w@db/x",
                  "snowflake://u:pa/ss@acct/db", "HTTP://u:p@h/"):  # fmt: skip
        with pytest.raises(ClusterError, match="carries a password"):
            check_overrides([f"output={leaky}"])
    with pytest.raises(ClusterError, match="carries a password"):  # inside a list of mappings too
        check_overrides(['model.lora=[{path: "https://u:hunter2@cdn.internal/lora", scale: 1}]'])


def test_running_jobs_match_by_metadata_or_id():
    class Info:
        def __init__(self, sid, status, meta=None):
            self.submission_id, self.status, self.metadata = sid, status, meta

    jobs = [
        Info("x-1", "RUNNING", {"genpipe_job": "demo"}),
        Info("demo-20260101-000000-abcd", "PENDING"),
        Info("y", "SUCCEEDED", {"genpipe_job": "demo"}),
        Info("demo-other", "RUNNING"),
    ]
    assert [j.submission_id for j in running_jobs(jobs, "demo")] == ["x-1", "demo-20260101-000000-abcd"]


# --- addresses and tokens -----------------------------------------------------------------------------------------
def test_a_relative_manifest_is_passed_relative_to_the_working_directory(tmp_path, monkeypatch):
    # Checked here from jobs/, the manifest is jobs/demo/manifest.parquet in the uploaded project.
    monkeypatch.chdir(REPO / "jobs")
    spec = spec_with("output=s3://b/o", "manifest=demo/manifest.parquet")
    sub = build_submission("demo/spec.yaml", spec, ["output=s3://b/o", "manifest=demo/manifest.parquet"], "..")
    assert sub.entrypoint.endswith("--set manifest=demo/manifest.parquet --set manifest=jobs/demo/manifest.parquet")
    assert any("passed as jobs/demo/manifest.parquet" in note for note in sub.notes)
    monkeypatch.chdir(REPO)  # from the project root the path is the same there: passed as it is
    sub = build_submission(DEMO, spec_with("output=s3://b/o"), ["output=s3://b/o"], ".")
    assert "manifest=" not in sub.entrypoint


def test_address_resolution(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a GCS address is not the dashboard
    assert resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert resolve_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://ray.internal")
    assert resolve_address(None) == "https://ray.internal"
    assert resolve_address("head-svc:8265") == "http://head-svc:8265"
    with pytest.raises(ClusterError, match="not a Ray client address"):
        resolve_address("ray://head:10001")
    for bad in ("http://127.0.0.1:99999", "127.0.0.1:abc", "http://a b:8265", "http://[::1"):
        with pytest.raises(ClusterError, match="expected the dashboard's URL"):  # not a requests traceback
            resolve_address(bad)


def test_token_sources_follow_rays_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert auth_token() == (None, "no token set")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")
    assert auth_token() == ("from-file", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert auth_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == ("from-env", "RAY_AUTH_TOKEN")
    assert Dashboard("http://h:8265").headers == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_token()[0] is None and Dashboard("http://h:8265").headers == {}
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ClusterError, match="cannot read the token file"):
        auth_token()


# --- the CLI, without a cluster ---------------------------------------------------------------------------------
def genpipe(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.mark.parametrize("command", ["submit", "status"])
def test_unreachable_address_is_one_fast_line(tmp_path, command):
    url = f"http://127.0.0.1:{closed_port()}"
    args = [DEMO, "--set", f"output={tmp_path}/out"] if command == "submit" else ["some-id"]
    start = time.monotonic()
    done = genpipe(command, *args, "--address", url)
    assert time.monotonic() - start < 60  # python + imports; the connection itself fails at once
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"genpipe: error: cannot reach the Ray dashboard at {url}: connection refused; "
        "is the cluster up? check --address"
    )


def test_a_silent_address_times_out_instead_of_hanging(monkeypatch):
    """A listener that never answers (the connection queues in its backlog, nothing reads it)."""
    monkeypatch.setattr(connection, "READ_TIMEOUT_S", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ClusterError) as err:
            Dashboard(url).version()
    assert time.monotonic() - start < 10
    assert (
        str(err.value) == f"cannot reach the Ray dashboard at {url}: no answer within 1 s; is the cluster up? "
        "check --address"
    )


def test_something_else_at_the_address_is_named(capsys):
    class NotRay(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ClusterError, match=r"answers but is not a Ray dashboard \(404 on /api/version\)"):
            Dashboard(url).version()
        capsys.readouterr()
        for command in ("status", "logs", "stop"):  # said as such, not as "no job x on the cluster"
            assert main([command, "x", "--address", url]) == 2
            assert "is not a Ray dashboard (404 on /api/version)" in capsys.readouterr().err
    finally:
        server.shutdown()


def test_dry_run_shows_names_never_values(tmp_path):
    done = genpipe(
        "submit",
        DEMO,
        "--set",
        f"output={tmp_path}/out",
        "--dry-run",
        env={"GENPIPE_DB_PASSWORD": "hunter2", "GENPIPE_CACHE_DIR": "/cache"},
    )
    assert done.returncode == 0, done.stderr
    assert "entrypoint:    python -m jobs.generate jobs/demo/spec.yaml --set output=" in done.stdout
    assert "GENPIPE_CACHE_DIR" in done.stdout and "/cache" not in done.stdout and "hunter2" not in done.stdout
    assert "not forwarding GENPIPE_DB_PASSWORD (looks secret; --env NAME forwards it)" in done.stderr


def test_a_bad_spec_fails_before_contacting_anything(tmp_path):
    done = genpipe("submit", DEMO, "--set", "sampler.stepz=3", "--address", "http://203.0.113.1:8265")
    assert done.returncode == 2 and "sampler.stepz: unknown key" in done.stderr
