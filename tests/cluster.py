"""A real two-node Ray cluster for submission tests: ``ray start --head`` + one worker node, token auth on.

Other suites on this machine run their own Ray (``ray.init``), so this cluster must never touch theirs:
- it uses its own ``--temp-dir`` (one per node) and free ports for everything that has a fixed default (GCS
  6379, dashboard 8265, dashboard agent 52365, client server 10001), so it neither collides with nor attaches to
  another Ray;
- it is never stopped with ``ray stop`` (that kills every Ray process of the user). Each node runs as
  ``ray start --block`` in its own session; teardown SIGTERMs those two processes, whose handlers stop their
  GCS, raylet, dashboard and agents, then SIGKILLs whatever is left of the process tree they had (workers,
  job drivers), identified by pid *and* start time so a recycled pid is never hit;
- each ``ray start`` gets PR_SET_PDEATHSIG, so a killed pytest takes its cluster with it.

Ray rewrites ``--node-ip-address=127.0.0.1`` to the machine's reachable address (``resolve_ip_for_localhost``),
so GCS and raylets listen on it; the dashboard listens on 127.0.0.1 only, and every port wants the token.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 180.0
#: Logical CPUs per node: the machine has two cores, shared with other suites; jobs use fractional CPUs.
CPUS_PER_NODE = 1


@dataclass
class LocalCluster:
    dashboard_url: str
    gcs_address: str
    token: str
    temp_dir: str
    env: dict[str, str]
    """The environment a client of this cluster needs (token set, no RAY_ADDRESS)."""
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for log in self.logs:
            with contextlib.suppress(OSError):
                out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def start_cluster(num_cpus_per_node: int = CPUS_PER_NODE, object_store_bytes: int = 150_000_000) -> LocalCluster:
    """Start the head (no GPUs) and one worker node; return when the dashboard sees both alive."""
    temp_dir = tempfile.mkdtemp(prefix="gpc-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        HF_HUB_OFFLINE="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    gcs_port, dash_port = free_port(), free_port()
    # Each node its own temp dir: nodes sharing one would share runtime_resources/, and the worker node's
    # runtime-env agent re-extracting a job's working_dir there pulls the directory from under the driver.
    common = [
        f"--num-cpus={num_cpus_per_node}",
        "--num-gpus=0",
        f"--object-store-memory={object_store_bytes}",
        "--disable-usage-stats",
    ]
    cluster = LocalCluster(f"http://127.0.0.1:{dash_port}", f"127.0.0.1:{gcs_port}", token, temp_dir, env)
    try:
        head = [
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={temp_dir}/h",
            *common,
        ]
        cluster.logs.append(Path(temp_dir) / "head.log")
        cluster.procs.append(_start_node(head, env, cluster.logs[-1]))
        _wait_for(cluster, nodes=1)
        worker = [
            f"--address={cluster.gcs_address}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={temp_dir}/w",
            *common,
        ]
        cluster.logs.append(Path(temp_dir) / "worker.log")
        cluster.procs.append(_start_node(worker, env, cluster.logs[-1]))
        _wait_for(cluster, nodes=2)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def _wait_for(cluster: LocalCluster, nodes: int) -> None:
    headers = {"Authorization": f"Bearer {cluster.token}"}
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        dead = [p for p in cluster.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"ray start exited with {dead[0].returncode}\n{cluster.log_tail()}")
        with contextlib.suppress(requests.RequestException, ValueError):
            r = requests.get(
                f"{cluster.dashboard_url}/api/v0/nodes",
                params={"limit": 100, "detail": "true"},
                headers=headers,
                timeout=5,
            )
            rows = r.json()["data"]["result"]["result"] if r.status_code == 200 else []
            if sum(row.get("state") == "ALIVE" for row in rows) >= nodes:
                return
        time.sleep(1.0)
    raise RuntimeError(f"the cluster did not show {nodes} alive node(s) in {START_TIMEOUT_S:g} s\n{cluster.log_tail()}")


def _process_tree(roots: list[int]) -> list[tuple[int, str]]:
    """(pid, start time) of ``roots`` and all their descendants, from /proc."""
    parent: dict[int, int] = {}
    started: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parent[int(entry.name)], started[int(entry.name)] = int(fields[1]), fields[19]
    tree, todo = [], [p for p in roots if p in started]
    while todo:
        pid = todo.pop()
        tree.append((pid, started[pid]))
        todo += [child for child, ppid in parent.items() if ppid == pid]
    return tree


def _same_process(pid: int, start: str) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19] == start
    except (OSError, IndexError):
        return False


def stop_cluster(cluster: LocalCluster, grace_s: float = 15.0) -> None:
    """Stop this cluster's processes, and only them (see the module docstring)."""
    tree = _process_tree([p.pid for p in cluster.procs])
    for proc in reversed(cluster.procs):  # the worker node first, then the head
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in cluster.procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    while time.monotonic() < deadline and any(_same_process(pid, start) for pid, start in tree):
        time.sleep(0.5)
    for pid, start in tree:
        if _same_process(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    for proc in cluster.procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster():
    """A two-node local cluster (CPUS_PER_NODE logical CPUs each, no GPUs, token auth on) for one test module."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
