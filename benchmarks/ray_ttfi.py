"""Time to the first recorded image of a Ray run on a big manifest: does generation wait for the planner?

``run_job`` (``executor: ray``, tiny model, scoring off) runs in a child process on an N-row manifest; this process
polls the audit database and reports when the first ``generated`` record appears, then stops the child (the rest
of the job is not the question). ``--repo DIR`` runs another checkout's code, e.g. a ``git worktree`` of an older
revision, with this checkout's venv:

    python -m benchmarks.ray_ttfi --rows 200000
    git worktree add /tmp/base REV && python -m benchmarks.ray_ttfi --rows 200000 --repo /tmp/base
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

from benchmarks.common import REPO, git_revision, loadavg, update_json

CHILD = "import sys; from pipeline.config import load_spec; from pipeline.runner import run_job; " \
        "run_job(load_spec(sys.argv[1]), quiet=True)"  # fmt: skip


def write_inputs(workdir: str, rows: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    manifest = os.path.join(workdir, "manifest.parquet")
    table = pa.table({"prompt_id": [f"sku-{i:07d}" for i in range(rows)],
                      "prompt": [f"a studio shot of product {i}, white background" for i in range(rows)]})  # fmt: skip
    pq.write_table(table, manifest)
    spec = {"name": "ttfi", "manifest": manifest, "output": os.path.join(workdir, "out"), "executor": "ray",
            "database": f"sqlite:///{workdir}/audit.db", "scoring": {"enabled": False},
            "image": {"width": 32, "height": 32}, "sampler": {"name": "euler", "steps": 2, "guidance_scale": 5.0},
            "resources": {"cpus_per_actor": 0.5, "batch_size": 8}}  # fmt: skip
    path = os.path.join(workdir, "spec.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    return path


def first_record_s(repo: str, spec: str, db: str, limit_s: float) -> float | None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": repo}
    t0 = time.monotonic()
    # A process group of its own: the local Ray it starts goes down with it.
    child = subprocess.Popen([sys.executable, "-c", CHILD, spec], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        while time.monotonic() - t0 < limit_s and child.poll() is None:
            if os.path.exists(db):
                try:
                    with sqlite3.connect(db, timeout=1) as conn:
                        if conn.execute("SELECT 1 FROM items WHERE status = 'generated' LIMIT 1").fetchone():
                            return round(time.monotonic() - t0, 1)
                except sqlite3.Error:
                    pass  # the schema is not there yet
            time.sleep(0.25)
        return None
    finally:
        os.killpg(child.pid, 9)
        child.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_ttfi", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--repo", default=REPO, help="the checkout whose code runs (default: this one)")
    p.add_argument("--limit-s", type=float, default=400.0, help="give up after this long")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="genpipe-ttfi-")
    try:
        spec = write_inputs(workdir, args.rows)
        load0 = loadavg()
        ttfi = first_record_s(os.path.abspath(args.repo), spec, os.path.join(workdir, "audit.db"), args.limit_s)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rev = git_revision() if os.path.abspath(args.repo) == REPO else args.repo
    print(f"Ray, {args.rows:,} rows, code {rev}: first generated record after {ttfi} s "
          f"(load average {load0} → {loadavg()})")  # fmt: skip
    if args.json_path:
        update_json(args.json_path, {f"ray_ttfi_{args.rows}_rows_s": ttfi})
    return 0 if ttfi is not None else 1


if __name__ == "__main__":
    sys.exit(main())
