"""Manifest scale: validate and plan a large manifest with generation skipped; driver peak memory and rows/s.

A Parquet manifest of ``--rows`` rows (default 1,000,000; every optional column, ~0.3 % bad rows) is written to a
temp dir, then each mode runs in its own child process so its peak RSS is its own (read with ``wait4``, and
VmHWM from inside):

  dry          validate + expand + dedupe: ``ManifestPlanner.plan_row`` over ``read_rows`` and the sampler
               check — what ``genpipe validate`` does, without printing (the dry run)
  dry_screen   dry + the prompt screen (blocklist) that planning applies
  validate_cli ``genpipe validate SPEC`` itself, as a user runs it (prints every bad row)
  run_dry_cli  ``genpipe run SPEC --dry-run`` itself: the planner (validate, expand, dedupe, screen, resume
               lookups) with nothing written — the product's own dry run
  plan         the real planner (``pipeline.runner._Planner``): resume lookups against an empty SQLite audit
               DB, rejected rows recorded, the prompt screen, every pending item written to plan shards — all
               of run_job's planning, without generation
  plan_noscreen  the same with ``scoring.screen.enabled: false``: what the planner costs without the screen

Peak RSS is the child's own VmHWM (``wait4``'s ru_maxrss can carry the parent's RSS over the fork, so it is
recorded but not used). RSS is also sampled every 100,000 rows to show whether memory grows with the manifest.

    python -m benchmarks.manifest_scale --rows 1000000 --json benchmarks/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.common import (
    Hooks,
    loadavg,
    machine_info,
    md_table,
    peak_rss_mb,
    quiet_env,
    rss_mb,
    update_json,
    write_text,
)

MODES = ("dry", "dry_screen", "validate_cli", "run_dry_cli", "plan_noscreen", "plan")
DEFAULT_MODES = ("dry", "validate_cli", "run_dry_cli", "plan_noscreen", "plan")
GOAL_MB = 1024
BAD_EVERY = 1000  # three kinds of bad row per thousand: empty prompt, duplicate id, absurd steps

CHILD_HOOKS = [
    ("pipeline.manifest.ManifestPlanner", "plan_row", "validate_expand"),
    ("pipeline.scoring.screen.PromptScreen", "screen", "screen"),
    ("pipeline.audit.store.AuditStore", "get_items", "db_resume_lookups"),
    ("pipeline.audit.store.AuditStore", "write_items", "db_write_rejected"),
    ("pipeline.runner._Planner", "_flush_shard", "shard_flush"),  # exclusive: sorting the shard's items
    ("pipeline.runner", "write_shard", "shard_write"),  # pipeline.executors.shards.write_shard, as runner calls it
    ("pipeline.runner._Planner", "run", "plan_total"),
]


def write_big_manifest(path: str, rows: int, chunk: int = 100_000) -> dict[str, Any]:
    """A manifest with every column genpipe reads plus a pass-through one, written chunk by chunk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("prompt_id", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
        ("seed", pa.int64()), ("steps", pa.int64()), ("campaign", pa.string()), ("sku", pa.string()),
        ("locale", pa.string()), ("tags", pa.list_(pa.string())), ("brief_id", pa.string()),
    ])  # fmt: skip
    subjects = ("leather handbag", "running shoe", "ceramic mug", "wrist watch", "desk lamp", "denim jacket")
    styles = ("studio product shot, white background", "lifestyle photo, morning light", "flat lay, pastel colours")
    bad = 0
    t0 = time.perf_counter()
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk):
            cols: dict[str, list] = {name: [] for name in schema.names}
            for i in range(start, min(rows, start + chunk)):
                kind = i % BAD_EVERY
                pid = f"sku-{i:08d}" if kind != 2 else f"sku-{i - 2:08d}"  # kind 2: duplicate of a valid row
                prompt = "" if kind == 1 else f"{subjects[i % 6]} {i}, {styles[i % 3]}"
                bad += kind in (1, 2, 3)
                cols["prompt_id"].append(pid)
                cols["prompt"].append(prompt)
                cols["negative_prompt"].append("blurry, watermark" if i % 4 == 0 else None)
                cols["seed"].append(i if i % 2 == 0 else None)
                cols["steps"].append(500 if kind == 3 else None)  # kind 3: steps over the limit
                cols["campaign"].append(f"campaign-{i % 20}")
                cols["sku"].append(f"SKU{i:08d}")
                cols["locale"].append(("en-GB", "de-DE", "fr-FR", "ja-JP")[i % 4])
                cols["tags"].append(["catalogue", f"family-{i % 50}"])
                cols["brief_id"].append(f"brief-{i // 1000}")
            writer.write_table(pa.table(cols, schema=schema), row_group_size=64 * 1024)
    return {"rows": rows, "bad_rows": bad, "bytes": os.path.getsize(path),
            "write_s": round(time.perf_counter() - t0, 2)}  # fmt: skip


def spec_dict(manifest: str, workdir: str, screen: bool = True) -> dict[str, Any]:
    out = os.path.join(workdir, "out")
    return {
        "name": "bench-scale",
        "manifest": manifest,
        "output": out,
        "database": f"sqlite:///{out}/genpipe.db",
        "executor": "local",
        "model": {"id": "tiny"},
        "sampler": {"name": "euler", "steps": 20},
        "image": {"width": 64, "height": 64, "images_per_prompt": 1},
        # Scoring off (no scorer to check before launch); the prompt screen still runs: it is part of planning.
        "scoring": {"enabled": False, "screen": {"enabled": screen}},
    }


# --- the child: one mode, its own process ----------------------------------------------------------------------
def child(mode: str, manifest: str, workdir: str, breakdown: bool) -> dict[str, Any]:
    from schemas.spec import JobSpec

    spec = JobSpec.model_validate(spec_dict(manifest, workdir, screen=mode != "plan_noscreen"))
    hooks = Hooks(CHILD_HOOKS) if breakdown else None
    if mode in ("dry", "dry_screen"):
        from pipeline.manifest import ManifestPlanner, read_rows
        from pipeline.samplers import check_sampler

        screen = None
        if mode == "dry_screen":
            from pipeline.scoring.screen import PromptScreen

            screen = PromptScreen.from_spec(spec)
        baseline = rss_mb()
        samples: list[tuple[int, float]] = []
        t0 = time.perf_counter()
        rows = items = rejected = blocked = 0
        with hooks.installed() if hooks else _null():
            planner = ManifestPlanner(spec)
            for row_number, raw in read_rows(spec.manifest):
                outcome = planner.plan_row(row_number, raw)
                rows += 1
                rejected += bool(outcome.problems)
                if not outcome.problems:
                    check_sampler(outcome.items[0].sampler, "unet")
                if screen is not None:
                    screen.screen(outcome.items)
                    blocked += sum(1 for it in outcome.items if it.status == "blocked")
                items += len(outcome.items)
                if rows % 100_000 == 0:
                    samples.append((rows, rss_mb()))
        elapsed = time.perf_counter() - t0
        extra = {"items": items, "rows_rejected": rejected, "blocked": blocked}
    elif mode in ("run_dry_cli", "validate_cli"):
        t_imp = time.perf_counter()
        import pipeline.runner  # noqa: F401  (what the CLI imports; timed apart from the rows)
        from pipeline.cli import main as cli_main

        import_s = time.perf_counter() - t_imp
        args = ["run", "--dry-run"] if mode == "run_dry_cli" else ["validate"]
        baseline = rss_mb()
        samples = []
        t0 = time.perf_counter()
        with hooks.installed() if hooks else _null():
            code, lines = _cli(cli_main, args, manifest, workdir)
        elapsed = time.perf_counter() - t0
        extra = {"exit_code": code, "import_s": round(import_s, 2)}
        if mode == "run_dry_cli":
            text = "\n".join(lines)
            rows = int(text.split("manifest rows: ")[1].split(" ")[0]) if "manifest rows: " in text else 0
            extra["summary"] = lines
        else:
            summary = lines[-1] if lines else ""
            rows = int(summary.split(": ")[-1].split(" rows")[0]) if " rows" in summary else 0
            extra["bad_row_lines"] = sum(1 for line in lines if line.startswith("row "))
            extra["summary_line"] = summary
    elif mode in ("plan", "plan_noscreen"):
        from pipeline.audit import AuditStore
        from pipeline.runner import PLAN_PREFIX, _Planner, check_spec, job_root
        from pipeline.storage import Storage

        _, traits = check_spec(spec)
        storage = Storage(job_root(spec))
        store = AuditStore(spec.database_url())
        run_id = store.begin_run(spec.name, spec.model_dump(mode="json"), {}, {})
        baseline = rss_mb()
        samples = []
        t0 = time.perf_counter()
        with hooks.installed() if hooks else _null():
            planner = _Planner(spec, traits, store, storage, run_id)
            _sample_rss_during(planner, samples)
            planner.run()
        elapsed = time.perf_counter() - t0
        pc = planner.summary_counts
        rows = pc["rows"]
        shard_bytes = sum(os.path.getsize(storage.path(k)) for k in planner.shards)
        extra = {"items": pc["items"], "pending": pc["pending"], "rows_rejected": pc["rows_rejected"],
                 "rejected_recorded": pc["rejected_now"], "blocked": pc["blocked_now"], "shards": len(planner.shards),
                 "shard_mb": round(shard_bytes / 2**20, 1), "plan_prefix": PLAN_PREFIX}  # fmt: skip
        store.end_run(run_id, "succeeded", {}, {})
        store.dispose()
    else:
        raise SystemExit(f"unknown child mode {mode!r}")
    result = {
        "mode": mode,
        "rows": rows,
        "elapsed_s": round(elapsed, 2),
        "rows_per_s": round(rows / elapsed, 1),
        "rss_after_imports_mb": baseline,
        "peak_rss_mb_self": peak_rss_mb(),
        "rss_by_rows_mb": samples,
        **extra,
    }
    if hooks:
        result["breakdown"] = hooks.table()
    return result


def _cli(cli_main: Any, args: list[str], manifest: str, workdir: str) -> tuple[int, list[str]]:
    """``genpipe ARGS[0] SPEC ARGS[1:]`` on a spec for ``manifest``, as a user runs it; (exit code, stdout lines)."""
    import contextlib

    import yaml

    spec_path = os.path.join(workdir, "spec.yaml")
    with open(spec_path, "w") as f:
        yaml.safe_dump(spec_dict(manifest, workdir), f)
    out_path = os.path.join(workdir, f"{args[0]}.out")
    with open(out_path, "w") as out, contextlib.redirect_stdout(out):
        code = cli_main([args[0], spec_path, *args[1:]])
    with open(out_path) as f:
        return code, f.read().splitlines()


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _sample_rss_during(planner: Any, samples: list[tuple[int, float]]) -> None:
    """RSS every 100,000 rows of the real planner, read through its row counter (no change to its code)."""
    counts = planner.summary_counts

    class Counting(type(counts)):
        def __setitem__(self, key: str, value: int) -> None:
            super().__setitem__(key, value)
            if key == "rows" and value % 100_000 == 0:
                samples.append((value, rss_mb()))

    planner.summary_counts = Counting(counts)


# --- the parent: build the manifest, run each mode in a child ---------------------------------------------------
def run_mode(mode: str, manifest: str, workdir: str, breakdown: bool) -> dict[str, Any]:
    shutil.rmtree(os.path.join(workdir, "out"), ignore_errors=True)
    load0 = loadavg()
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "benchmarks.manifest_scale", "--child", mode, "--manifest", manifest,
           "--workdir", workdir, *(["--breakdown"] if breakdown else [])]  # fmt: skip
    out_path = os.path.join(workdir, f"{mode}.out")
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    with open(out_path) as f:
        text = f.read()
    result: dict[str, Any] = {"mode": mode, "exit": proc.returncode, "process_wall_s": round(wall, 2),
                              "wait4_maxrss_mb": round(usage.ru_maxrss / 1024, 1),
                              "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                              "loadavg_before": load0, "loadavg_after": loadavg()}  # fmt: skip
    if proc.returncode != 0:
        result["error"] = text[-2000:]
        return result
    result.update(json.loads(text.strip().splitlines()[-1]))
    result["peak_rss_mb"] = result["peak_rss_mb_self"]
    return result


def render_markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    rows = []
    for r in payload["modes"].values():
        rows.append([r["mode"], r.get("rows"), r.get("elapsed_s"), r.get("rows_per_s"), r["process_wall_s"],
                     r.get("rss_after_imports_mb"), r.get("peak_rss_mb"),
                     ("yes" if r["peak_rss_mb"] < GOAL_MB else "NO") if r.get("peak_rss_mb") else "–",
                     "/".join(f"{v:g}" for v in r["loadavg_after"][:1]),
                     r.get("error", "")[:80] or r.get("summary_line", "").split(": ")[-1][:80]])  # fmt: skip
    lines = [
        f"## Manifest scale — {m['date']}",
        "",
        f"`{m['command']}`",
        "",
        f"Manifest: {payload['manifest']['rows']:,} rows ({payload['manifest']['bad_rows']:,} bad), "
        f"{payload['manifest']['bytes'] / 2**20:.0f} MiB Parquet. Machine: {m['cpus']} CPUs; load average at start "
        f"{m['loadavg_1_5_15']}, at end {payload['loadavg_end']}.",
        "",
        md_table(
            [
                "mode",
                "rows",
                "plan s",
                "rows/s",
                "process s",
                "RSS after imports MB",
                "peak RSS MB",
                f"< {GOAL_MB} MB",
                "load after",
                "note",
            ],
            rows,
        ),  # fmt: skip
        "",
    ]
    growth = [[r["mode"], *[f"{n // 1000}k: {mb:.0f}" for n, mb in r.get("rss_by_rows_mb", [])[::2]]]
              for r in payload["modes"].values() if r.get("rss_by_rows_mb")]  # fmt: skip
    if growth:
        width = max(len(g) for g in growth)
        lines += [
            "RSS (MB) as rows stream through (every 200k rows):",
            "",
            md_table(["mode", *[""] * (width - 1)], [g + [""] * (width - len(g)) for g in growth]),
            "",
        ]
    for r in payload["modes"].values():
        if r.get("breakdown"):
            b = r["breakdown"]
            lines += [
                f"Breakdown of `{r['mode']}` (hooked run; seconds inclusive / exclusive): "
                + ", ".join(f"{k} {v['inclusive_s']:.1f}/{v['exclusive_s']:.1f}" for k, v in b.items()),
                "",
            ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    quiet_env()
    p = argparse.ArgumentParser(prog="python -m benchmarks.manifest_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--tag", default="", help="results go under manifest_scale[_TAG] in the JSON")
    p.add_argument("--breakdown", action="store_true", help="time the planner's parts with hooks (adds ~5 %%)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--md", dest="md_path", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.manifest, args.workdir, args.breakdown)))
        return 0
    modes = [s.strip() for s in args.modes.split(",") if s.strip()]
    if unknown := [s for s in modes if s not in MODES]:
        print(f"error: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    machine = machine_info()
    workdir = args.workdir or tempfile.mkdtemp(prefix="genpipe-scale-")
    os.makedirs(workdir, exist_ok=True)
    try:
        manifest = os.path.join(workdir, "manifest.parquet")
        print(f"# writing a {args.rows:,}-row manifest — load average {loadavg()}", flush=True)
        info = write_big_manifest(manifest, args.rows)
        results = {}
        for mode in modes:
            print(f"# {mode} — load average {loadavg()}", flush=True)
            results[mode] = run_mode(mode, manifest, workdir, args.breakdown)
            r = results[mode]
            print(f"  {r.get('rows_per_s')} rows/s, peak RSS {r.get('peak_rss_mb')} MB, exit {r['exit']}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    payload = {"machine": machine, "manifest": info, "modes": results, "loadavg_end": loadavg(), "goal_mb": GOAL_MB}
    md = render_markdown(payload)
    print(md)
    write_text(args.md_path, md + "\n")
    if args.json_path:
        update_json(args.json_path, {"manifest_scale" + (f"_{args.tag}" if args.tag else ""): payload})
    return 0 if all(r["exit"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
