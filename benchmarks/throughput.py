"""Throughput, side by side in one process: the same N items through a bare diffusers loop and through genpipe.

Scenarios (``--scenarios``, in this order by default):

  bare               (a)  the pipeline object called directly, ``batch`` images per call
  noscore            (b)  genpipe ``run_job``, executor local, scoring off, ``batch_invariant: false`` (batched
                          like the bare loop: b/a is the orchestration overhead)
  full               (c)  as (b) with full scoring (CLIP embed once + NSFW + bias + alignment heads + policy)
  bare_per_image     (a') the bare loop with one call per image and oneDNN off: the work genpipe's default
                          ``batch_invariant: true`` mode does
  noscore_invariant  (b') genpipe, scoring off, ``batch_invariant: true`` (the default): b'/a' is its
                          orchestration overhead, b'/b what batch invariance costs
  ray1, ray2         (d)  genpipe on Ray Data (``executor: ray``), scoring off, batched, 1 and 2 generator
                          actors with fractional CPUs (1 torch thread each)

Every scenario uses the same prompts, the same per-image seeds (``torch.Generator`` per image), steps, guidance,
size, device and torch thread count. genpipe is timed through ``run_job`` as a user runs it (spec check,
planning, model load, generation, writing, audit DB, results.parquet, summary); the bare loop is timed from
model load to the last image. Per-stage time comes from timing hooks put on genpipe's functions from outside
(``benchmarks.common.Hooks``, timed per thread) and, for Ray actors, from the per-item timings genpipe records in
the audit DB. The local executor runs planning, shard reads and each stage in its own thread, so per-stage busy
seconds overlap; the driver's critical path (the calling thread's time, adding up to wall) is reported apart.

    python -m benchmarks.throughput --repeat 3 --json benchmarks/results.json --md benchmarks/results-throughput.md
    python -m benchmarks.throughput -n 16 --steps 4 --scenarios bare,noscore      # a quick smoke run

Wall-clock numbers on a shared machine are only as good as its load average, recorded before and after every
scenario; CPU seconds per image (and the model call's own thread CPU) are the load-insensitive cross-check.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.common import (
    DRIVER,
    ChildSampler,
    Hooks,
    cpu_seconds,
    library_versions,
    loadavg,
    machine_info,
    md_table,
    peak_rss_mb,
    quiet_env,
    ratio,
    reset_peak_rss,
    rss_mb,
    update_json,
    write_text,
)

ALL_SCENARIOS = ("bare", "noscore", "full", "bare_per_image", "noscore_invariant", "ray1", "ray2")
DESCRIPTIONS = {
    "bare": "(a) bare diffusers loop, batched",
    "noscore": "(b) genpipe local, scoring off, batched",
    "full": "(c) genpipe local, full scoring, batched",
    "bare_per_image": "(a') bare loop, 1 image per call, oneDNN off",
    "noscore_invariant": "(b') genpipe local, scoring off, batch_invariant (default)",
    "ray1": "(d1) genpipe Ray, 1 generator actor, scoring off, batched",
    "ray2": "(d2) genpipe Ray, 2 generator actors, scoring off, batched",
}

#: (module[.Class], attribute, stage key) — what the hooks time in the driver process, in whichever thread runs it.
#: A key ``group:detail`` is kept whole in the JSON and summed by group in the tables. A function imported by name
#: (``from pipeline.executors.shards import iter_batches``) is hooked where it is looked up (``pipeline.runner``):
#: patching its home module would not change the caller's reference.
HOOK_TARGETS = [
    ("pipeline.runner", "check_spec", "check_spec"),
    ("pipeline.runner", "model_fingerprint", "check_spec:fingerprint"),
    ("pipeline.audit.store.AuditStore", "__init__", "db:open"),
    ("pipeline.audit.lease.JobLease", "acquire", "db:lease"),
    ("pipeline.audit.lease.JobLease", "release", "db:lease"),
    ("pipeline.audit.store.AuditStore", "begin_run", "db:run"),
    ("pipeline.audit.store.AuditStore", "end_run", "db:run"),
    ("pipeline.audit.store.AuditStore", "get_items", "db:get_items"),
    ("pipeline.audit.store.AuditStore", "iter_records", "db:iter_items"),
    ("pipeline.audit.store.AuditStore", "counts", "db:counts"),
    ("pipeline.audit.store.AuditStore", "write_items", "db_write"),
    # Planning runs in the ``genpipe-planner`` thread while the stages execute (local) or Ray starts and runs waves.
    ("pipeline.runner._Planner", "run", "plan"),
    ("pipeline.runner._Planner", "plan_items", "plan:regenerate"),
    ("pipeline.runner", "write_shard", "shard_write"),  # pipeline.executors.shards.write_shard
    ("pipeline.storage.Storage", "delete", "plan:delete_shards"),
    # The ``genpipe-source`` thread: each step of iter_batches reads one record batch of a shard (Arrow IPC) into
    # items; nested in it, each step of _PlanningThread.waves is the wait for the planner's next shard.
    ("pipeline.runner", "iter_batches", "shard_read"),  # pipeline.executors.shards.iter_batches
    ("pipeline.runner._PlanningThread", "waves", "plan_wait"),
    ("pipeline.runner._PlanningThread", "has_work", "plan_wait"),  # Ray: the driver waiting for a first shard
    ("pipeline.runner._PlanningThread", "settle", "plan_wait"),  # Ray: ... and for a nearly finished plan
    ("pipeline.runner", "shard_rows", "shard_read:rows"),  # regeneration rounds
    ("pipeline.runner", "shard_batches", "shard_read:count"),  # Ray: the work units, in the driver
    ("pipeline.executors.ray_data", "items_from_table", "ray:to_items"),
    ("pipeline.runner", "build_stages", "check_spec:build_stages"),
    ("pipeline.runner", "library_versions", "db:run_info"),
    # The driver's wait for the stage threads (run_local less the sink's db_write nested in it).
    ("pipeline.executors.local", "run_local", "executor:local"),
    ("pipeline.executors.ray_data", "init_ray", "ray:init"),
    ("pipeline.executors.ray_data", "run_ray", "ray:execute"),
    # Stage threads (``genpipe-generate``, ``genpipe-score``, ``genpipe-write``): setup, then one call per batch.
    ("pipeline.stages.generate.DiffusersGenerator", "setup", "model_load:generator"),
    ("pipeline.stages.generate.DiffusersGenerator", "process", "generate:process"),
    ("pipeline.stages.generate.DiffusersGenerator", "_generate", "generate"),
    ("pipeline.stages.score.Scorer", "setup", "model_load:scorer"),
    ("pipeline.stages.score.Scorer", "process", "score_other"),
    # These run in ``genpipe-scorer-call`` helpers that the score thread starts and joins at once (Hooks.joined).
    ("pipeline.scoring.clip.ClipEmbedder", "embed_images", "embed:images"),
    ("pipeline.scoring.clip.ClipEmbedder", "embed_texts", "embed:texts"),
    ("pipeline.scoring.nsfw.OpenNsfw", "score", "heads:open_nsfw"),
    ("pipeline.scoring.nsfw.ClipNsfwHead", "score", "heads:clip_nsfw"),
    ("pipeline.scoring.nsfw.SdSafetyChecker", "score", "heads:sd_safety_checker"),
    ("pipeline.scoring.bias.BiasScorer", "score", "heads:bias"),
    ("pipeline.scoring.alignment.AlignmentHead", "score", "heads:alignment"),
    ("pipeline.stages.write.ImageWriter", "process", "write"),
    ("pipeline.stages.write", "encode_image", "encode"),
    ("pipeline.storage.Storage", "write_atomic", "write:storage"),
    ("pipeline.runner", "rank_job", "post_run:rank_job"),
    ("pipeline.runner", "reconcile_orphans", "post_run:orphans"),
    ("pipeline.runner", "write_results_parquet", "post_run:results_parquet"),
    ("pipeline.runner", "write_bias_report", "post_run:bias_report"),
    ("pipeline.runner", "write_chain_anchor", "post_run:chain_anchor"),
    ("pipeline.runner", "_decision_counts", "post_run:decision_counts"),
    ("pipeline.runner", "_write_summary", "post_run:summary"),
]
#: Columns of the per-stage busy table, in pipeline order: each stage's exclusive seconds in the thread that ran
#: it, all threads together. Stages overlap in time, so they do not add up to the wall time.
STAGE_COLUMNS = ("check_spec", "plan", "shard_write", "model_load", "shard_read", "generate", "embed", "heads",
                 "score_other", "encode", "write", "db_write", "db", "post_run", "ray")  # fmt: skip
#: Keys or groups that are a thread waiting for another, not work: shown as "waiting" in the per-thread table.
WAIT_KEYS = ("plan_wait", "executor", "ray:execute")
#: Columns of the driver's critical path (the calling thread's exclusive seconds; they add up to the wall time).
CRITICAL_COLUMNS = ("check_spec", "db", "plan", "shard_read", "model_load", "generate", "executor", "ray", "db_write",
                    "post_run", "other")  # fmt: skip


def is_wait(key: str) -> bool:
    return key in WAIT_KEYS or key.split(":")[0] in WAIT_KEYS


PROMPT_SUBJECTS = (
    "leather handbag",
    "running shoe",
    "ceramic mug",
    "wrist watch",
    "desk lamp",
    "denim jacket",
    "espresso machine",
    "sunglasses",
    "backpack",
    "table lamp",
    "wool scarf",
    "bicycle helmet",
)
PROMPT_STYLES = ("studio product shot, white background", "lifestyle photo, morning light",
                 "flat lay, pastel colours", "banner, seasonal campaign, bold typography space")  # fmt: skip


@dataclass
class Config:
    n: int
    model: str
    width: int
    height: int
    steps: int
    batch: int
    guidance: float
    sampler: str
    device: str
    dtype: str
    threads: int
    ray_cpus_per_actor: float
    ray_num_cpus: float | None
    clip_arch: str
    workdir: str
    scoring_cpus: float | None = None


def manifest_rows(n: int) -> list[dict[str, Any]]:
    """N distinct e-commerce prompts with explicit seeds, so genpipe and the bare loop use the same ones."""
    rows = []
    for i in range(n):
        subject = PROMPT_SUBJECTS[i % len(PROMPT_SUBJECTS)]
        style = PROMPT_STYLES[(i // len(PROMPT_SUBJECTS)) % len(PROMPT_STYLES)]
        rows.append({"prompt_id": f"bench-{i:05d}", "prompt": f"{subject} #{i}, {style}", "seed": 1000 + i,
                     "campaign": "bench", "sku": f"SKU-{i:05d}"})  # fmt: skip
    return rows


def write_manifest(path: str, rows: list[dict[str, Any]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def resolved_model(model: str) -> str:
    if model == "tiny":
        from pipeline.models.tiny import ensure_tiny

        return str(ensure_tiny()["sd"])
    return model


def _gpu_reset(cfg: Config) -> None:
    if cfg.device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak_mb(cfg: Config) -> float | None:
    """Peak GPU memory allocated by tensors since ``_gpu_reset`` (this process: the bare loop or genpipe local)."""
    if cfg.device != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _torch_setup(cfg: Config, onednn: bool) -> None:
    import torch

    torch.set_num_threads(cfg.threads)
    torch.backends.mkldnn.enabled = onednn  # genpipe's invariant mode turns it off process-wide; reset each time


def warm_up(cfg: Config) -> dict[str, float]:
    """Imports, tiny-model build and one throwaway call, so no scenario pays for them."""
    t0 = time.perf_counter()
    import diffusers
    import torch
    import transformers

    # Loading bars off for the bare loop's loads too (genpipe's loader turns them off while it loads): log clutter.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    import pipeline.runner  # noqa: F401  (imports the scoring stack too)

    imports = time.perf_counter() - t0
    path = resolved_model(cfg.model)
    _torch_setup(cfg, onednn=True)
    t1 = time.perf_counter()
    pipe = _load_bare(cfg, path)
    gen = [torch.Generator(device="cpu").manual_seed(0)]
    pipe(prompt=["warm-up"], num_inference_steps=2, guidance_scale=cfg.guidance,
         width=cfg.width, height=cfg.height, generator=gen, output_type="np")  # fmt: skip
    del pipe
    gc.collect()
    # genpipe records the sha256 of the model's files once per version of them (kept by file stat in
    # {cache}/fingerprints.json): the first run of a new model pays for it (SDXL: ~7 GB), later runs do not. Paid
    # here, so that whichever genpipe scenario runs first does not carry it; reported on its own.
    from pipeline.models.diffusers_loader import model_fingerprint

    t2 = time.perf_counter()
    if os.path.isdir(path):
        model_fingerprint(path)
    return {"imports_s": round(imports, 2), "model_warmup_s": round(t2 - t1, 2),
            "model_fingerprint_s": round(time.perf_counter() - t2, 2)}  # fmt: skip


def _load_bare(cfg: Config, path: str):
    import diffusers
    import torch

    from pipeline.samplers import make_scheduler  # the scheduler genpipe would use: set-up, not per-image work

    dtype_kwarg = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"
    pipe = diffusers.AutoPipelineForText2Image.from_pretrained(
        path, **{dtype_kwarg: getattr(torch, cfg.dtype)}, use_safetensors=True
    ).to(cfg.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(cfg.sampler, pipe.scheduler.config)
    return pipe


# --- (a) the bare loop ----------------------------------------------------------------------------------------
def run_bare(cfg: Config, rows: list[dict[str, Any]], per_image: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    _torch_setup(cfg, onednn=not per_image)
    path = resolved_model(cfg.model)
    gc.collect()
    _gpu_reset(cfg)
    reset_peak_rss()
    rss_start, cpu0, load0 = rss_mb(), cpu_seconds(), loadavg()
    t0 = time.perf_counter()
    pipe = _load_bare(cfg, path)
    load_s = time.perf_counter() - t0
    size = 1 if per_image else cfg.batch
    pixels: dict[str, Any] = {}
    marks: list[tuple[float, int]] = []
    loop_cpu0 = time.thread_time()
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        images = pipe(
            prompt=[r["prompt"] for r in chunk],
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            width=cfg.width,
            height=cfg.height,
            generator=[torch.Generator(device="cpu").manual_seed(int(r["seed"])) for r in chunk],
            output_type="np",
        ).images
        out = (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)
        for r, img in zip(chunk, out, strict=True):
            pixels[r["prompt_id"]] = img
        marks.append((time.perf_counter() - t0, len(chunk)))
    loop_cpu = time.thread_time() - loop_cpu0
    wall = time.perf_counter() - t0
    result = {
        "scenario": "bare_per_image" if per_image else "bare",
        "images": len(pixels),
        "wall_s": round(wall, 3),
        "images_per_s": round(len(pixels) / wall, 4),
        "images_per_s_excl_load": round(len(pixels) / (wall - load_s), 4),
        "steady_images_per_s": _steady(marks, waves=1),
        "ttfi_s": round(marks[0][0], 3) if marks else None,
        "model_load_s": round(load_s, 3),
        "cpu_s_per_image": round((cpu_seconds() - cpu0) / max(1, len(pixels)), 4),
        "driver_rss_start_mb": rss_start,
        "driver_peak_rss_mb": peak_rss_mb(),
        "gpu_peak_mb": _gpu_peak_mb(cfg),
        "stages_s": {"model_load": round(load_s, 3), "generate": round(wall - load_s, 3)},
        "stages_cpu_s": {"generate": round(loop_cpu, 3)},
        "critical_path_s": {"model_load": round(load_s, 3), "generate": round(wall - load_s, 3), "other": 0.0},
        "loadavg_before": load0,
        "loadavg_after": loadavg(),
        "images_per_call": size,
    }
    del pipe
    gc.collect()
    return {"result": result, "pixels": pixels}


def _steady(marks: list[tuple[float, int]], waves: int) -> float | None:
    """Images per second after the first ``waves`` deliveries (one per actor): model load and warm-up excluded.

    With several actors the window starts when the last of the first batches arrived, while the others' second
    batches were already running, so this reads slightly high; with one actor it is exact."""
    if len(marks) < waves + 2:  # too few deliveries after the first wave to call anything steady
        return None
    t_first = marks[waves - 1][0]
    n_after = sum(n for _, n in marks[waves:])
    span = marks[-1][0] - t_first
    return round(n_after / span, 4) if span > 0 else None


# --- (b, c, d) genpipe -----------------------------------------------------------------------------------------
def run_genpipe(cfg: Config, name: str, manifest: str, *, executor: str, scoring: bool, invariant: bool,
                actors: int = 1, hooks: Hooks) -> dict[str, Any]:  # fmt: skip
    from pipeline.audit import AuditStore
    from pipeline.runner import run_job
    from schemas.spec import JobSpec

    out = os.path.join(cfg.workdir, name)
    shutil.rmtree(out, ignore_errors=True)
    cuda = cfg.device == "cuda"
    cpus = cfg.ray_cpus_per_actor if executor == "ray" else float(cfg.threads)
    spec = JobSpec.model_validate({
        "name": f"bench-{name}",
        "manifest": manifest,
        "output": out,
        "database": f"sqlite:///{out}/genpipe.db",
        "executor": executor,
        "model": {"id": cfg.model, "dtype": cfg.dtype},
        "sampler": {"name": cfg.sampler, "steps": cfg.steps, "guidance_scale": cfg.guidance},
        "image": {"width": cfg.width, "height": cfg.height, "images_per_prompt": 1, "format": "png"},
        "resources": {"generator_actors": actors, "cpus_per_actor": cpus, "gpus_per_actor": 1 if cuda else 0,
                      "batch_size": cfg.batch, "batch_invariant": invariant},
        "scoring": {"enabled": scoring, "clip": {"architecture": cfg.clip_arch},
                    **({"cpus_per_actor": cfg.scoring_cpus} if cfg.scoring_cpus else {})},
    })  # fmt: skip
    _torch_setup(cfg, onednn=True)  # as a fresh process finds it; the invariant mode turns it off itself
    gc.collect()
    _gpu_reset(cfg)
    hooks.reset()
    reset_peak_rss()
    rss_start, cpu0, load0 = rss_mb(), cpu_seconds(), loadavg()
    sampler = ChildSampler() if executor == "ray" else None
    t0m = time.monotonic()
    t0 = time.perf_counter()
    with hooks.installed():
        if sampler is not None:
            with sampler:
                summary = run_job(spec, quiet=True)
        else:
            summary = run_job(spec, quiet=True)
    wall = time.perf_counter() - t0
    cpu_driver = cpu_seconds() - cpu0
    driver_peak = peak_rss_mb()

    store = AuditStore(spec.database_url())
    try:
        items = list(store.iter_items(spec.name))
    finally:
        store.dispose()
    generated = [it for it in items if it.status == "generated"]
    timing_sums: dict[str, float] = {}
    for it in generated:
        for k, v in (it.timings or {}).items():
            timing_sums[k] = timing_sums.get(k, 0.0) + float(v)

    # The sink's writes of generated items, in order: time to first image and the steady rate.
    # (Not the post-run rewrites: ranking re-records every scored item after the last batch.)
    marks = [(e.end - t0m, e.summary) for e in hooks.events
             if e.key == "db_write" and e.summary and not (e.parent or "").startswith("post_run")]  # fmt: skip
    stats = hooks.stats
    # Stage threads load their models at once, overlapping each other (and planning): the time any model was
    # loading, overlaps counted once.
    load_s = hooks.union_s("model_load")
    # Busy seconds per hook: exclusive wall time in the thread that ran it, all threads together (they overlap).
    stages = {k: round(v.exclusive_s, 4) for k, v in stats.items()}
    # "other": the calling thread's wall time that no hook covers (only its own frames: never negative).
    other = round(wall - hooks.covered_s(DRIVER), 4)
    stages["other"] = other
    stages_cpu = {k: round(v.exclusive_cpu_s, 4) for k, v in stats.items()}
    # The driver's critical path: what the calling thread spent its wall time on (adds up to wall).
    critical = {k: round(v.exclusive_s, 4) for k, v in hooks.lanes.get(DRIVER, {}).items()}
    critical["other"] = other
    threads = {}
    for lane, lane_stats in hooks.lanes.items():
        waits = sum(v.exclusive_s for k, v in lane_stats.items() if is_wait(k))
        threads[lane] = {"busy_s": round(sum(v.exclusive_s for v in lane_stats.values()) - waits, 4),
                         "wait_s": round(waits, 4),
                         "cpu_s": round(sum(v.exclusive_cpu_s for v in lane_stats.values()), 4),
                         "stages_s": {k: round(v.exclusive_s, 4) for k, v in sorted(lane_stats.items())}}  # fmt: skip
    result: dict[str, Any] = {
        "scenario": name,
        "images": len(generated),
        "items": len(items),
        "status": summary.status,
        "wall_s": round(wall, 3),
        "images_per_s": round(len(generated) / wall, 4),
        "images_per_s_excl_load": round(len(generated) / (wall - load_s), 4) if executor == "local" else None,
        "steady_images_per_s": _steady(marks, waves=actors),
        "ttfi_s": round(marks[0][0], 3) if marks else None,
        "model_load_s": round(load_s, 3) if executor == "local" else None,
        "cpu_s_per_image": round(cpu_driver / max(1, len(generated)), 4),
        "driver_rss_start_mb": rss_start,
        "driver_peak_rss_mb": driver_peak,
        "gpu_peak_mb": _gpu_peak_mb(cfg) if executor == "local" else None,
        "stages_s": stages,
        "stages_cpu_s": stages_cpu,
        "critical_path_s": critical,
        "threads_s": threads,
        "hooks": hooks.table(),
        "hooks_by_thread": hooks.lane_table(),
        "hooks_missing": list(hooks.missing),
        "item_timings_sum_s": {k: round(v, 3) for k, v in sorted(timing_sums.items())},
        "run_summary_images_per_s": round(summary.images_per_s, 4),
        "loadavg_before": load0,
        "loadavg_after": loadavg(),
        "executor": executor,
        "scoring": scoring,
        "batch_invariant": invariant,
        "generator_actors": actors,
        "decisions": summary.decisions,
    }
    if sampler is not None:
        actors_seen = sampler.actors()
        result["actors"] = actors_seen
        result["ray_processes_cpu_s"] = sampler.cpu_seconds()
        result["cpu_s_per_image"] = round((cpu_driver + sampler.cpu_seconds()) / max(1, len(generated)), 4)
        # This run's generator actors (a previous run's actor may still be shutting down when this one starts).
        gen = [a for a in actors_seen if "_StageActor" in a["title"] and "_StageActor" not in a["title_at_start"]]
        result["actor_peak_rss_mb"] = max((a["peak_rss_mb"] for a in gen), default=None)
    return {"result": result, "items": generated, "job_root": os.path.join(out, spec.name)}


def _compare_arrays(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    keys = sorted(set(a) & set(b))
    diffs = [int(np.abs(a[k].astype(np.int16) - b[k].astype(np.int16)).max()) for k in keys]
    return {"compared": len(keys), "identical": sum(d == 0 for d in diffs), "max_abs_diff": max(diffs, default=0)}


def compare_pixels(job_root: str, items: list, reference: dict[str, Any]) -> dict[str, Any]:
    """Decode genpipe's stored images and compare them with the bare loop's pixels for the same prompt and seed."""
    import numpy as np
    from PIL import Image

    from pipeline.stages.write import image_key
    from pipeline.storage import Storage

    storage = Storage(job_root)
    same = compared = 0
    worst = 0
    for it in items:
        ref = reference.get(it.prompt_id)
        if ref is None:
            continue
        with Image.open(io.BytesIO(storage.read(image_key(it)))) as img:
            got = np.asarray(img.convert("RGB"))
        compared += 1
        diff = int(np.abs(got.astype(np.int16) - ref.astype(np.int16)).max())
        worst = max(worst, diff)
        same += diff == 0
    return {"compared": compared, "identical": same, "max_abs_diff": worst}


# --- the run ---------------------------------------------------------------------------------------------------
#: Scenarios ``--repeat`` runs again (interleaved, after the first round): every in-process one (Ray runs once).
REPEATED = ("bare", "noscore", "full", "bare_per_image", "noscore_invariant")


def run(cfg: Config, scenarios: list[str], repeat: int = 1) -> dict[str, Any]:
    rows = manifest_rows(cfg.n)
    manifest = write_manifest(os.path.join(cfg.workdir, "manifest.parquet"), rows)
    print(f"# warming up (imports, model build, one call) — load average {loadavg()}", flush=True)
    warm = warm_up(cfg)
    hooks = Hooks(HOOK_TARGETS)
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    bare_pixels: dict[str, dict[str, Any]] = {}
    ray_init_s = None
    runs: dict[str, list[dict[str, Any]]] = {}
    schedule = list(scenarios) + [s for _ in range(repeat - 1) for s in scenarios if s in REPEATED]
    for name in schedule:
        print(f"# {name}: {DESCRIPTIONS[name]} — load average {loadavg()}", flush=True)
        try:
            if name in ("bare", "bare_per_image"):
                out = run_bare(cfg, rows, per_image=name == "bare_per_image")
                bare_pixels.setdefault(name, out["pixels"])
                other = bare_pixels.get("bare" if name == "bare_per_image" else "bare_per_image")
                if other is not None and other is not out["pixels"]:
                    # Does batching change pixels here? (The price of batch_invariant buys exactly this.)
                    out["result"]["pixels_vs_other_bare_mode"] = _compare_arrays(out["pixels"], other)
                runs.setdefault(name, []).append(out["result"])
            else:
                executor = "ray" if name.startswith("ray") else "local"
                if executor == "ray" and cfg.device == "cuda":
                    import torch

                    if torch.cuda.device_count() < int(name[3:]):
                        raise RuntimeError(
                            f"{name} needs {name[3:]} GPUs; this machine has {torch.cuda.device_count()}"
                        )
                if executor == "ray" and ray_init_s is None:
                    ray_init_s = _start_ray(cfg)
                out = run_genpipe(cfg, name, manifest, executor=executor, scoring=name == "full",
                                  invariant=name == "noscore_invariant",
                                  actors=int(name[3:]) if executor == "ray" else 1, hooks=hooks)  # fmt: skip
                ref = bare_pixels.get("bare_per_image" if name == "noscore_invariant" else "bare")
                if ref:
                    out["result"]["pixels_vs_bare"] = compare_pixels(out["job_root"], out["items"], ref)
                runs.setdefault(name, []).append(out["result"])
            r = runs[name][-1]
            print(
                f"  {r['images']} images in {r['wall_s']:.1f} s: {r['images_per_s']:.3f} images/s "
                f"(steady {r.get('steady_images_per_s')}), load average {r['loadavg_after']}",
                flush=True,
            )
        except Exception as exc:  # one broken scenario must not hide the others' numbers
            import traceback

            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"[:1000]
    if ray_init_s is not None:
        import ray

        ray.shutdown()
    for name, rs in runs.items():
        # The run with the median throughput stands for the scenario (its fields belong together); all are kept.
        ranked = sorted(rs, key=lambda r: r["images_per_s"])
        results[name] = {**ranked[(len(ranked) - 1) // 2], "repeats": len(rs),
                         "runs_images_per_s": [r["images_per_s"] for r in rs],
                         "runs_steady_images_per_s": [r.get("steady_images_per_s") for r in rs],
                         "runs_cpu_s_per_image": [r.get("cpu_s_per_image") for r in rs],
                         "runs_loadavg_after": [r["loadavg_after"][0] for r in rs]}  # fmt: skip
    return {"results": results, "errors": errors, "warmup": warm, "ray_init_s": ray_init_s}


def _start_ray(cfg: Config) -> float:
    from pipeline.executors.ray_data import init_ray

    t0 = time.perf_counter()
    init_ray(num_cpus=cfg.ray_num_cpus)
    return round(time.perf_counter() - t0, 2)


def summarise(run_out: dict[str, Any]) -> dict[str, Any]:
    r = run_out["results"]

    def ips(name: str, key: str = "images_per_s") -> float | None:
        return r.get(name, {}).get(key)

    def cpu(name: str) -> float | None:
        return r.get(name, {}).get("cpu_s_per_image")

    b_wall, c_wall = r.get("noscore", {}).get("wall_s"), r.get("full", {}).get("wall_s")
    out = {
        # The keys the issue names.
        "bare_images_per_s": ips("bare"),
        "pipeline_noscore_images_per_s": ips("noscore"),
        "pipeline_full_images_per_s": ips("full"),
        "ratio_noscore_vs_bare": ratio(ips("noscore"), ips("bare")),
        "ratio_full_vs_noscore": ratio(ips("full"), ips("noscore")),
        "scaling_2_vs_1": ratio(ips("ray2"), ips("ray1")),
        # The same comparisons from other angles.
        "ratio_noscore_vs_bare_excl_load": ratio(
            ips("noscore", "images_per_s_excl_load"), ips("bare", "images_per_s_excl_load")
        ),  # fmt: skip
        "ratio_noscore_vs_bare_steady": ratio(
            ips("noscore", "steady_images_per_s"), ips("bare", "steady_images_per_s")
        ),
        "ratio_noscore_vs_bare_cpu": ratio(cpu("bare"), cpu("noscore")),
        "scoring_overhead_pct": round((c_wall / b_wall - 1) * 100, 2) if b_wall and c_wall else None,
        "ratio_full_vs_noscore_cpu": ratio(cpu("noscore"), cpu("full")),
        "bare_per_image_images_per_s": ips("bare_per_image"),
        "pipeline_noscore_invariant_images_per_s": ips("noscore_invariant"),
        "ratio_invariant_vs_bare_per_image": ratio(ips("noscore_invariant"), ips("bare_per_image")),
        "ratio_invariant_vs_batched": ratio(ips("noscore_invariant"), ips("noscore")),
        "ratio_bare_per_image_vs_bare": ratio(ips("bare_per_image"), ips("bare")),
        "scaling_2_vs_1_steady": ratio(ips("ray2", "steady_images_per_s"), ips("ray1", "steady_images_per_s")),
        "ratio_ray1_vs_local": ratio(ips("ray1"), ips("noscore")),
    }
    return out


def render_markdown(cfg: Config, payload: dict[str, Any]) -> str:
    r = payload["scenarios"]
    m = payload["machine"]
    lines = [
        f"## Throughput — {m['date']}",
        "",
        f"`{m['command']}`",
        "",
        f"Machine: {m['cpus']} CPUs, {m.get('mem_total_gb', '?')} GB; {m['platform']}; git {m['git']}.",
        f"Load average (1/5/15 min) at start: {m['loadavg_1_5_15']}; at end: {payload['loadavg_end']}.",
        f"Model `{cfg.model}` {cfg.width}×{cfg.height}, {cfg.steps} steps ({cfg.sampler}), guidance {cfg.guidance}, "
        f"batch {cfg.batch}, N = {cfg.n}, device {cfg.device} ({cfg.dtype}), torch threads {cfg.threads} "
        f"(Ray: {cfg.ray_cpus_per_actor} CPU per actor → 1 thread); scoring: CLIP `{cfg.clip_arch}`, "
        f"scoring.cpus_per_actor {cfg.scoring_cpus or 'default'}.",
        "",
    ]
    gpu = cfg.device == "cuda"
    header = ["scenario", "images", "wall s", "images/s", "excl. load", "steady", "TTFI s", "CPU s/image",
              "driver peak MB", "actor peak MB", *(["GPU peak MB"] if gpu else []), "load avg after"]  # fmt: skip
    rows = []
    for name in ALL_SCENARIOS:
        if name not in r:
            continue
        x = r[name]
        rows.append([DESCRIPTIONS[name], x["images"], x["wall_s"], x["images_per_s"], x.get("images_per_s_excl_load"),
                     x.get("steady_images_per_s"), x.get("ttfi_s"), x.get("cpu_s_per_image"),
                     x.get("driver_peak_rss_mb"), x.get("actor_peak_rss_mb"), *([x.get("gpu_peak_mb")] if gpu else []),
                     "/".join(f"{v:g}" for v in x["loadavg_after"][:1])])  # fmt: skip
    lines += [md_table(header, rows), ""]
    repeated = []
    for n in ALL_SCENARIOS:
        if n in r and r[n].get("repeats", 1) > 1:
            rates = ", ".join(f"{v:.3f}" for v in r[n]["runs_images_per_s"])
            loads = ", ".join(f"{v:g}" for v in r[n]["runs_loadavg_after"])
            repeated.append(f"{n}: {rates} (load {loads})")
    if repeated:
        lines += [
            "Repeated scenarios (images/s of each run, interleaved; the table shows the median run): "
            + "; ".join(repeated),
            "",
        ]
    s = payload["summary"]

    def pct(v: float | None) -> str:
        return f"{v:.3f}" if v is not None else "–"

    lines += [md_table(["ratio", "value", "goal"], [
        ["b/a: genpipe (scoring off, batched) ÷ bare loop, whole run", pct(s["ratio_noscore_vs_bare"]), "≥ 0.95"],
        ["b/a excluding model load", pct(s["ratio_noscore_vs_bare_excl_load"]), ""],
        ["b/a steady state (after the first batch)", pct(s["ratio_noscore_vs_bare_steady"]), ""],
        ["b/a by CPU seconds per image (less sensitive to load)", pct(s["ratio_noscore_vs_bare_cpu"]), ""],
        ["c/b: full scoring ÷ scoring off", pct(s["ratio_full_vs_noscore"]), "≥ 0.87 (≤ 15 % added; GPU ≤ 3 %)"],
        ["scoring overhead, % of wall time", pct(s["scoring_overhead_pct"]), "≤ 15"],
        ["b'/a': genpipe invariant ÷ bare 1-image loop", pct(s["ratio_invariant_vs_bare_per_image"]), "≥ 0.95"],
        ["b'/b: cost of batch invariance (invariant ÷ batched)", pct(s["ratio_invariant_vs_batched"]), "report"],
        ["a'/a: bare 1-image loop ÷ bare batched loop", pct(s["ratio_bare_per_image_vs_bare"]), "report"],
        ["d₂/d₁: 2 ÷ 1 generator actors, whole job", pct(s["scaling_2_vs_1"]), "≤ 2, bounded by cores"],
        ["d₂/d₁ steady state", pct(s["scaling_2_vs_1_steady"]), ""],
        ["d₁/b: Ray 1 actor ÷ local", pct(s["ratio_ray1_vs_local"]), "report"],
    ]), ""]  # fmt: skip

    def grouped(stages: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, v in stages.items():
            out[key.split(":")[0]] = out.get(key.split(":")[0], 0.0) + v
        return out

    stage_rows, critical_rows, thread_rows = [], [], []
    for name in ALL_SCENARIOS:
        if name not in r:
            continue
        busy = grouped(r[name]["stages_s"])
        stage_rows.append([name, r[name]["wall_s"], *[busy.get(c) for c in STAGE_COLUMNS]])
        critical_rows.append((name, r[name]["wall_s"], grouped(r[name].get("critical_path_s", {}))))
        for lane, t in sorted(r[name].get("threads_s", {}).items(), key=lambda kv: (kv[0] != DRIVER, kv[0])):
            top = sorted(grouped(t["stages_s"]).items(), key=lambda kv: -kv[1])[:4]
            thread_rows.append([name, lane, t["busy_s"], t["wait_s"], t["cpu_s"],
                                ", ".join(f"{k} {v:.3f}" for k, v in top if v > 0)])  # fmt: skip
    lines += [
        "Per-stage **busy** seconds (driver process, all threads: each hooked stage's exclusive wall time in the "
        "thread that ran it, nested stages subtracted within that thread). The local executor runs planning, "
        "shard reads, generate, score and write in their own threads at once, so these columns **overlap in time "
        "and do not add up to wall**; for Ray, generation runs in the actors (see below) and `ray` is the driver "
        "waiting for it:",
        "",
        md_table(["scenario", "wall", *STAGE_COLUMNS], stage_rows),
        "",
    ]
    # The driver's hooks that ran in some scenario, in pipeline order; any unexpected group just before "other".
    crit_cols = [c for c in CRITICAL_COLUMNS[:-1] if any(g.get(c) for _, _, g in critical_rows)]
    crit_cols += sorted({k for _, _, g in critical_rows for k, v in g.items() if v and k not in CRITICAL_COLUMNS})
    crit_cols.append("other")
    lines += [
        "The driver's **critical path**: what the thread that called `run_job` spent the wall time on (its own "
        "hooks' exclusive seconds; these add up to wall). `executor` = waiting for the local stage threads' results "
        "(what generate/score/write could not hide behind the sink), `ray` = waiting for Ray, `db_write` = the sink "
        "writing results, `other` = time no hook covers in this thread:",
        "",
        md_table(
            ["scenario", "wall", *crit_cols], [[n, w, *[g.get(c) for c in crit_cols]] for n, w, g in critical_rows]
        ),
        "",
    ]
    if thread_rows:
        lines += [
            "Per thread (genpipe runs; `driver` = the thread that called `run_job`, the others are genpipe's): hooked "
            "busy seconds, seconds waiting for another thread (`plan_wait`: the shard reader waiting for the "
            "planner's next shard; `executor`, `ray:execute`: the driver waiting for the stages), thread CPU seconds "
            "inside hooks, and the biggest stages (waits included):",
            "",
            md_table(["scenario", "thread", "busy s", "waiting s", "CPU s", "top stages (s)"], thread_rows),
            "",
        ]
    cpu_rows = []
    for name in ALL_SCENARIOS:
        x = r.get(name)
        if x and x.get("stages_cpu_s", {}).get("generate"):
            gen_wall, gen_cpu = x["stages_s"].get("generate"), x["stages_cpu_s"]["generate"]
            rest = sum(v for k, v in x["stages_cpu_s"].items() if k != "generate")
            cpu_rows.append([name, gen_wall, gen_cpu, round(gen_cpu / gen_wall, 3) if gen_wall else None,
                             round(gen_cpu / max(1, x["images"]), 4), round(rest, 3)])  # fmt: skip
    if cpu_rows:
        lines += ["The model call's own CPU time (thread CPU of the thread that calls it): the same work costs the "
                  "same CPU on both sides; where wall time differs at equal CPU, the process was waiting for a core "
                  "(load from other processes), not working:", "",
                  md_table(["scenario", "generate wall s", "generate CPU s", "CPU/wall", "generate CPU s/image",
                            "CPU s in all other hooked stages (all threads)"], cpu_rows), ""]  # fmt: skip
    actor_rows = []
    for name in ALL_SCENARIOS:
        x = r.get(name)
        if x and x.get("item_timings_sum_s"):
            t = x["item_timings_sum_s"]
            actor_rows.append([name, t.get("generate_s"), t.get("score_s"), t.get("write_s")])
    if actor_rows:
        lines += ["Per-stage seconds as genpipe records them on each item (`Item.timings`, summed; for Ray these are "
                  "the actors' own times):", "",
                  md_table(["scenario", "generate_s", "score_s", "write_s"], actor_rows), ""]  # fmt: skip
    pix = [[n, *r[n]["pixels_vs_bare"].values()] for n in ALL_SCENARIOS if n in r and "pixels_vs_bare" in r[n]]
    for n in ("bare_per_image", "bare"):
        if n in r and "pixels_vs_other_bare_mode" in r[n]:
            pix.append(["bare batched vs bare 1-image (oneDNN off)", *r[n]["pixels_vs_other_bare_mode"].values()])
            break
    if pix:
        lines += ["Same work? genpipe's stored images against the bare loop's pixels (same prompt and seed):", "",
                  md_table(["scenario", "compared", "identical", "max |Δ| (0–255)"], pix), ""]  # fmt: skip
    for name in ("ray1", "ray2"):
        if name in r and r[name].get("actors"):
            acts = "; ".join(f"{a['title'][:60]} {a['peak_rss_mb']:.0f} MB, {a['cpu_s']:.1f} CPU s"
                             for a in r[name]["actors"])  # fmt: skip
            lines += [f"Ray worker processes in {name}: {acts}", ""]
    if payload["errors"]:
        lines += ["Errors: " + "; ".join(f"{k}: {v}" for k, v in payload["errors"].items()), ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--n", type=int, default=64, help="items (default 64)")
    p.add_argument("--model", default="tiny", help="`tiny`, a local diffusers directory or an HF id (default tiny)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="images per pipeline call (default 8)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="default float32 on CPU, float16 on CUDA")  # fmt: skip
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the bare loop and the local runs (genpipe: cpus_per_actor; default 1)",
    )
    p.add_argument("--ray-cpus-per-actor", type=float, default=0.5, help="CPUs per Ray generator actor (0.5)")
    p.add_argument("--ray-num-cpus", type=float, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--clip-arch", default="tiny", help="open_clip architecture for full scoring (default tiny)")
    p.add_argument(
        "--scoring-cpus",
        type=float,
        default=None,
        help="scoring.cpus_per_actor (ONNX and preprocessing threads; default: the spec's 0.25 → 1 thread)",
    )
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS), help=f"comma list of {', '.join(ALL_SCENARIOS)}")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help=f"run {', '.join(REPEATED)} this many times, interleaved; report the median run (default 1)",
    )
    p.add_argument("--mfu", action="store_true", help="add UNet FLOPs and MFU (always on with --device cuda)")
    p.add_argument("--workdir", default=None, help="where runs write (default: a temp dir, removed after)")
    p.add_argument("--json", dest="json_path", default=None, help="merge the results into this JSON file")
    p.add_argument("--md", dest="md_path", default=None, help="also write the markdown tables here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    quiet_env()
    args = parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in ALL_SCENARIOS]
    if unknown:
        print(f"error: unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(ALL_SCENARIOS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.device == "cuda":
        from benchmarks.gpu import require_cuda

        require_cuda()
    workdir = args.workdir or tempfile.mkdtemp(prefix="genpipe-bench-")
    os.makedirs(workdir, exist_ok=True)
    cfg = Config(n=args.n, model=args.model, width=args.width, height=args.height, steps=args.steps,
                 batch=args.batch, guidance=args.guidance, sampler=args.sampler, device=args.device,
                 dtype=args.dtype or ("float16" if args.device == "cuda" else "float32"), threads=args.threads,
                 ray_cpus_per_actor=args.ray_cpus_per_actor, ray_num_cpus=args.ray_num_cpus,
                 clip_arch=args.clip_arch, workdir=workdir, scoring_cpus=args.scoring_cpus)  # fmt: skip
    machine = machine_info()
    try:
        run_out = run(cfg, scenarios, args.repeat)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    payload = {
        "machine": machine,
        "libraries": library_versions(),
        "config": asdict(cfg),
        "scenarios": run_out["results"],
        "errors": run_out["errors"],
        "warmup": run_out["warmup"],
        "ray_init_s": run_out["ray_init_s"],
        "loadavg_end": loadavg(),
    }
    payload["summary"] = summarise(run_out)
    md = render_markdown(cfg, payload)
    print(md)
    # Written before the FLOP count, so that the measured numbers survive its failure (or a time limit).
    write_text(args.md_path, md + "\n")
    if args.json_path:
        update_json(args.json_path, {**payload["summary"], "throughput": payload})
    mfu_failed = False
    if args.device == "cuda" or args.mfu:
        from benchmarks.gpu import add_mfu, render_mfu

        try:
            add_mfu(cfg, payload)
        except Exception as exc:  # the scenarios' numbers stand without it
            import traceback

            traceback.print_exc()
            payload["mfu_error"] = f"{type(exc).__name__}: {exc}"[:1000]
            mfu_failed = True
        else:
            mfu_md = render_mfu(payload)
            print(mfu_md)
            write_text(args.md_path, md + "\n" + mfu_md + "\n")
        if args.json_path:
            update_json(args.json_path, {"throughput": payload})
    return 1 if run_out["errors"] or mfu_failed else 0


if __name__ == "__main__":
    sys.exit(main())
