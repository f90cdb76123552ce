"""End to end on the in-process executor with the tiny model: records, images, results, resume."""

from __future__ import annotations

import io
import os
import threading

import pyarrow.parquet as pq
import pytest

from pipeline.audit import AuditStore
from pipeline.config import load_spec
from pipeline.errors import ManifestError, SpecError
from pipeline.runner import plan_job, run_job
from pipeline.stages.write import image_key
from pipeline.storage import Storage
from tests import fixtures_models as fm
from tests.conftest import write_manifest
from tests.invariants import check_invariants

tiny_models = fm.tiny_models  # the shared session fixture

ROWS = [
    {"prompt_id": "mug", "prompt": "a red ceramic mug", "seed": 5, "num_images": 2, "campaign": "c1"},
    {"prompt_id": "shoe", "prompt": "a white sneaker", "negative_prompt": "blurry", "campaign": "c1"},
    {"prompt_id": "banner", "prompt": "a spring banner", "width": 48, "height": 24, "sampler": "ddim"},
    {"prompt_id": "../evil", "prompt": "traversal"},
    {"prompt_id": "mug", "prompt": "duplicate id"},
    {"prompt_id": "empty", "prompt": "  "},
]
EXPECTED_ITEMS = 2 + 1 + 1 + 3  # rejected rows: one record per sample (images_per_prompt=1)


def _images(root):
    return [p for prefix in ("images", "review", "quarantine") for p in (root / prefix).rglob("*.png")]


def _db(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/audit.db"


def test_local_run_writes_images_records_and_results(make_spec, tmp_path):
    spec = load_spec(make_spec(ROWS, database=_db(tmp_path)))
    summary = run_job(spec, quiet=True)
    assert summary.status == "succeeded"
    assert summary.counts == {"generated": 4, "rejected": 3}
    assert summary.rows == 6 and summary.rows_rejected == 3 and summary.generated_now == 4
    counts = check_invariants(_db(tmp_path), str(tmp_path / "out" / "test-job"), "test-job", EXPECTED_ITEMS)
    assert counts == {"generated": 4, "rejected": 3}

    store = AuditStore(_db(tmp_path))
    all_items = list(store.iter_items("test-job"))
    runs = store.runs("test-job")
    store.dispose()
    items = {(it.prompt_id, it.sample_index): it for it in all_items if it.status != "rejected"}
    items.update({(it.prompt_id, it.sample_index): it for it in all_items if it.prompt_id == "../evil"})
    assert [items[("mug", 0)].seed, items[("mug", 1)].seed] == [5, 6]
    assert items[("banner", 0)].sampler == "ddim" and items[("banner", 0)].width == 48
    assert items[("shoe", 0)].seed_source == "derived" and items[("shoe", 0)].negative_prompt == "blurry"
    evil = items[("../evil", 0)]
    assert evil.status == "rejected" and evil.reasons[0]["field"] == "prompt_id"
    dup = [it for it in all_items if it.reasons and "duplicate of row 1" in it.reasons[0]["message"]]
    assert len(dup) == 1
    assert runs[0]["status"] == "succeeded" and runs[0]["model_info"]["weights_sha256"]
    assert not os.path.exists(tmp_path / "out" / "evil") and not os.path.exists(tmp_path / "evil")

    results = pq.read_table(io.BytesIO(Storage(str(tmp_path / "out" / "test-job")).read("results.parquet")))
    for column in ("item_id", "job", "prompt_id", "prompt", "sample_index", "seed", "model", "sampler", "steps",
                   "guidance_scale", "width", "height", "status", "decision", "reasons", "image_uri",
                   "image_sha256", "scores", "created_at"):  # fmt: skip
        assert column in results.column_names, column


def test_rerun_resumes_without_new_images_or_records(make_spec, tmp_path):
    path = make_spec(ROWS, database=_db(tmp_path))
    run_job(load_spec(path), quiet=True)
    root = tmp_path / "out" / "test-job"
    before = {p: p.stat().st_mtime_ns for p in _images(root)}
    second = run_job(load_spec(path), quiet=True)
    assert second.skipped_done == 4 and second.generated_now == 0 and second.rejected_now == 0
    assert {p: p.stat().st_mtime_ns for p in _images(root)} == before
    check_invariants(_db(tmp_path), str(root), "test-job", EXPECTED_ITEMS)

    # An image that no longer matches its sha256 is regenerated — to identical bytes, since seeds are data.
    victim = sorted(before)[0]
    original = victim.read_bytes()
    victim.write_bytes(b"corrupted")
    third = run_job(load_spec(path), quiet=True)
    assert third.generated_now == 1 and third.skipped_done == 3
    assert victim.read_bytes() == original
    check_invariants(_db(tmp_path), str(root), "test-job", EXPECTED_ITEMS)


def test_memory_output_with_local_executor(make_spec, tmp_path):
    spec = load_spec(make_spec(ROWS[:2], output="memory://genpipe-run-test", database=_db(tmp_path)))
    summary = run_job(spec, quiet=True)
    assert summary.counts == {"generated": 3}
    check_invariants(_db(tmp_path), "memory://genpipe-run-test/test-job", "test-job", 3)


def test_bad_input_fails_before_launch(make_spec, tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        run_job(load_spec(make_spec(manifest=str(tmp_path / "missing.parquet"), database=_db(tmp_path))))
    with pytest.raises(SpecError, match="model.id: .*does not exist"):
        run_job(load_spec(make_spec(ROWS, model={"id": str(tmp_path / "no-model")}, database=_db(tmp_path))))
    with pytest.raises(SpecError, match="sampler.name: .*flow_match_euler"):
        run_job(load_spec(make_spec(ROWS, sampler={"name": "flow_match_euler"}, database=_db(tmp_path))))
    with pytest.raises(SpecError, match="^model.lora: LoRA adapter .* does not exist"):  # named as the key it is
        run_job(
            load_spec(make_spec(ROWS, model={"lora": [{"path": str(tmp_path / "no-lora")}]}, database=_db(tmp_path)))
        )


def test_scored_run_routes_by_decision_and_records_every_score(make_spec, tmp_path):
    rows = [
        {"prompt_id": "mug", "prompt": "a red ceramic mug on a table", "num_images": 2},
        {"prompt_id": "poster", "prompt": "a p0rn0 poster for the shop window"},  # screened: never generated
    ]
    db = _db(tmp_path)
    spec = load_spec(make_spec(rows, database=db, scoring={"enabled": True}, policy={"regenerate_tries": 0}))
    summary = run_job(spec, quiet=True)
    assert summary.counts == {"generated": 2, "blocked": 1}
    counts = check_invariants(db, str(tmp_path / "out" / "test-job"), "test-job", 3)
    assert counts == {"generated": 2, "blocked": 1}
    store = AuditStore(db)
    items = {(it.prompt_id, it.sample_index): it for it in store.iter_items("test-job")}
    store.dispose()
    blocked = items[("poster", 0)]
    assert blocked.decision == "block" and blocked.image_uri is None
    assert blocked.reasons[0]["code"] == "prompt_blocklist" and blocked.reasons[0]["rule"]
    for k in (0, 1):
        scores = items[("mug", k)].scores
        for key in ("clip_cosine", "clipscore", "nsfw", "nsfw_open_nsfw", "bias_person", "clip_rank"):
            assert key in scores, key
        assert scores["clipscore"] == pytest.approx(2.5 * max(scores["clip_cosine"], 0.0))
        assert 0.0 <= scores["nsfw"] < 0.3  # benign tiny-model output stays under the review threshold
    assert sorted(items[("mug", k)].scores["clip_rank"] for k in (0, 1)) == [1, 2]
    assert summary.decisions == {"pass": 2}
    assert (tmp_path / "out" / "test-job" / "reports" / "bias" / "bias.md").exists()


STREAM_ROWS = [{"prompt_id": f"sku-{i:02d}", "prompt": f"a packshot of product {i}"} for i in range(12)]


def test_generation_starts_before_the_plan_is_complete(make_spec, tmp_path, monkeypatch):
    """The last plan shard is only written once a generated record is in the database: without streamed
    planning the run would wait here (and fail the assertion below)."""
    from pipeline import runner

    monkeypatch.setattr(runner, "PLAN_SHARD_ITEMS", 4)
    recorded = threading.Event()
    original_write, original_flush = AuditStore.write_items, runner._Planner._flush_shard

    def write_items(self, items, run_id):
        original_write(self, items, run_id)
        if any(it.status == "generated" for it in items):
            recorded.set()

    waited: list[bool] = []

    def flush_shard(self):
        if len(self.shards) == 2 and self._pending:  # the third and last shard
            waited.append(recorded.wait(timeout=60))
        original_flush(self)

    monkeypatch.setattr(AuditStore, "write_items", write_items)
    monkeypatch.setattr(runner._Planner, "_flush_shard", flush_shard)
    summary = run_job(load_spec(make_spec(STREAM_ROWS, database=_db(tmp_path))), quiet=True)
    assert waited == [True] and summary.generated_now == 12 and summary.rows == 12
    check_invariants(_db(tmp_path), str(tmp_path / "out" / "test-job"), "test-job", 12)


def test_a_planning_error_mid_manifest_stops_the_run_and_is_raised(make_spec, tmp_path, plan_fails_after_one_shard):
    with pytest.raises(OSError, match="plan storage is full"):
        run_job(load_spec(make_spec(STREAM_ROWS, database=_db(tmp_path))), quiet=True)
    store = AuditStore(_db(tmp_path))
    try:
        (run,) = store.runs("test-job")
        assert run["status"] == "failed" and run["summary"]["rows"] >= 8
        # The first shard, planned before the error, was generated and recorded in full; nothing else ran.
        assert store.counts("test-job") == {"generated": 4} and run["summary"]["generated_now"] == 4
    finally:
        store.dispose()
    assert len(_images(tmp_path / "out" / "test-job")) == 4  # every image written has its record
    plan_fails_after_one_shard()  # heal: the rerun plans normally
    rerun = run_job(load_spec(make_spec(STREAM_ROWS, database=_db(tmp_path))), quiet=True)
    assert rerun.status == "succeeded" and rerun.counts == {"generated": 12}


def test_an_execution_error_stops_the_planner_at_the_next_row(make_spec, tmp_path, monkeypatch):
    import time

    from pipeline import runner
    from pipeline.manifest import ManifestPlanner

    monkeypatch.setattr(runner, "PLAN_SHARD_ITEMS", 4)
    original_plan_row, original_write = ManifestPlanner.plan_row, AuditStore.write_items

    def slow_plan_row(self, row_number, raw):
        time.sleep(0.002)  # 3,000 rows: 6 s of planning
        return original_plan_row(self, row_number, raw)

    def failing_write(self, items, run_id):
        if any(it.status == "generated" for it in items):
            raise RuntimeError("database went away")
        return original_write(self, items, run_id)

    monkeypatch.setattr(ManifestPlanner, "plan_row", slow_plan_row)
    monkeypatch.setattr(AuditStore, "write_items", failing_write)
    # After two shards every row is bad: no shard is written again, so only a per-row check can stop the planner.
    rows = [{"prompt_id": f"p{i}", "prompt": f"a mug, colour {i}" if i < 8 else "  "} for i in range(3000)]
    with pytest.raises(RuntimeError, match="database went away"):
        run_job(load_spec(make_spec(rows, database=_db(tmp_path))), quiet=True)
    monkeypatch.setattr(AuditStore, "write_items", original_write)
    store = AuditStore(_db(tmp_path))
    try:
        (run,) = store.runs("test-job")
        assert run["status"] == "failed" and 4 <= run["summary"]["rows"] < 3000  # stopped, not planned to the end
        # The failed run's summary agrees with its records (it said "items: 0" next to their counts).
        counts = store.counts("test-job")
        assert run["summary"]["items_total"] == sum(counts.values()) > 0 and run["summary"]["counts"] == counts
        assert run["summary"]["images"].endswith("/test-job/images")
    finally:
        store.dispose()


def test_a_database_error_at_the_runs_end_still_releases_the_lease(make_spec, tmp_path, monkeypatch):
    import sqlalchemy.exc

    real_end_run = AuditStore.end_run
    calls = []

    def end_run(self, *args, **kwargs):
        calls.append(args[1])
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError("UPDATE runs", {}, Exception("database is locked"))
        return real_end_run(self, *args, **kwargs)

    monkeypatch.setattr(AuditStore, "end_run", end_run)
    path = make_spec(ROWS[:3], database=_db(tmp_path))
    # The run itself went well: the database error is the outcome, and it is not swallowed ...
    with pytest.raises(sqlalchemy.exc.OperationalError, match="database is locked"):
        run_job(load_spec(path), quiet=True)
    # ... but the lease was released (a second run in the same process gets it at once, not after its TTL) and the
    # summary next to the images was written.
    assert Storage(str(tmp_path / "out" / "test-job")).exists("summary.json")
    rerun = run_job(load_spec(path), quiet=True)
    assert rerun.status == "succeeded" and rerun.generated_now == 0 and rerun.skipped_done == rerun.items_total
    # The first run could not close itself, so the rerun closed it (as failed) before its own end.
    assert calls == ["succeeded", "failed", "succeeded"]


def test_a_database_error_at_the_end_of_a_failing_run_does_not_mask_its_error(make_spec, tmp_path, monkeypatch):
    import sqlalchemy.exc

    from pipeline import runner

    def end_run(self, *args, **kwargs):
        raise sqlalchemy.exc.OperationalError("UPDATE runs", {}, Exception("database is locked"))

    def broken_execute(*args, **kwargs):
        raise RuntimeError("the executor broke")

    monkeypatch.setattr(AuditStore, "end_run", end_run)
    monkeypatch.setattr(runner, "_execute", broken_execute)
    with pytest.raises(RuntimeError, match="the executor broke"):
        run_job(load_spec(make_spec(ROWS[:3], database=_db(tmp_path))), quiet=True)
    monkeypatch.undo()
    rerun = run_job(load_spec(make_spec(ROWS[:3], database=_db(tmp_path))), quiet=True)  # the lease is free
    assert rerun.status == "succeeded" and rerun.generated_now == rerun.items_total > 0


def test_a_rejected_row_is_recorded_again_when_the_edited_manifest_says_something_else(make_spec, tmp_path):
    # A rejected row's id is its position (its prompt id may be missing or unsafe): a rerun with another bad row
    # there must not leave the first row's record standing for it.
    db = _db(tmp_path)
    run_job(load_spec(make_spec([{"prompt_id": "a", "prompt": "   "}], database=db)), quiet=True)
    edited = make_spec([{"prompt_id": "../../x", "prompt": "a mug"}], database=db)
    summary = run_job(load_spec(edited), quiet=True)
    assert summary.rejected_now == 1
    store = AuditStore(db)
    try:
        [record] = store.iter_items("test-job")
        assert (record.prompt_id, record.prompt) == ("../../x", "a mug")
        assert [r["code"] for r in record.reasons] == ["invalid_row"] and "prompt_id" in record.reasons[0]["message"]
    finally:
        store.dispose()
    assert run_job(load_spec(edited), quiet=True).rejected_now == 0  # the same manifest again: nothing new


def test_a_fixed_row_supersedes_its_rejected_records(make_spec, tmp_path):
    # A rejected row's records are keyed by its position. Once the row is fixed, the job's items are the fixed
    # row's: the old records become `superseded` (history, still in the chain), not a second outcome of the row.
    db, good = _db(tmp_path), {"prompt_id": "mug", "prompt": "a red ceramic mug"}
    broken_rows = [good, {"prompt_id": "lamp", "prompt": "   ", "num_images": 2}]
    bad = load_spec(make_spec(manifest=write_manifest(tmp_path / "broken.parquet", broken_rows), database=db))
    assert run_job(bad, quiet=True).rejected_now == 2
    fixed_rows = [good, {"prompt_id": "lamp", "prompt": "a brass desk lamp"}]
    fixed = load_spec(make_spec(manifest=write_manifest(tmp_path / "fixed.parquet", fixed_rows), database=db))
    dry = plan_job(fixed)
    assert dry.superseded == 2 and "superseded: 2 earlier records (rows fixed" in dry.render()
    store = AuditStore(db)
    try:
        assert store.counts("test-job") == {"generated": 1, "rejected": 2}  # a dry run writes nothing
    finally:
        store.dispose()
    summary = run_job(fixed, quiet=True)
    assert (summary.superseded_now, summary.generated_now, summary.items_total) == (2, 1, 2)
    assert summary.counts == {"generated": 2, "superseded": 2} and "2 superseded records" in summary.render()
    check_invariants(db, str(tmp_path / "out" / "test-job"), "test-job", expected_items=2)
    store = AuditStore(db)
    try:
        old = [it for it in store.iter_items("test-job") if it.status == "superseded"]
        assert sorted(it.sample_index for it in old) == [0, 1] and {it.row_number for it in old} == {2}
        assert "now as prompt_id 'lamp'" in old[0].reasons[-1]["message"]
        assert [r["code"] for r in old[0].reasons] == ["invalid_row", "superseded"]
        events = store.history(old[0].item_id)
        assert [e["kind"] for e in events] == ["item_recorded", "item_recorded"], events
        assert [e["payload"]["status"] for e in events] == ["rejected", "superseded"]
    finally:
        store.dispose()
    again = run_job(fixed, quiet=True)
    assert again.superseded_now == 0 and again.skipped_done == 2
    # Broken again: the position is rejected again, under the same ids, and counts as rejected once more.
    relapse = run_job(bad, quiet=True)
    assert relapse.rejected_now == 2 and relapse.counts == {"generated": 2, "rejected": 2}


def test_a_row_planned_again_with_other_settings_supersedes_its_earlier_outputs(make_spec, tmp_path, monkeypatch):
    # `--set sampler.steps=3` on a rerun (or a reworded prompt) plans a row's samples under new item ids; the old
    # records stayed current and their images public: two outcomes for one row × sample (I1).
    db = _db(tmp_path)
    rows = [{"prompt_id": "mug", "prompt": "a red ceramic mug", "num_images": 2},
            {"prompt_id": "lamp", "prompt": "a nude model holding a lamp"}]  # fmt: skip
    first = run_job(load_spec(make_spec(rows, database=db, sampler={"steps": 2})), quiet=True)
    assert first.counts == {"generated": 2, "blocked": 1}
    root = Storage(str(tmp_path / "out" / "test-job"))
    old_images = sorted(root.walk("images"))
    assert len(old_images) == 2

    rows[1]["prompt"] = "a brass desk lamp"
    changed = load_spec(make_spec(rows, database=db, sampler={"steps": 3}))
    assert plan_job(changed).superseded == 3  # two generated samples and the blocked prompt
    rerun = run_job(changed, quiet=True)
    assert (rerun.superseded_now, rerun.generated_now, rerun.items_total) == (3, 3, 3)
    assert rerun.counts == {"generated": 3, "superseded": 3}
    check_invariants(db, root.root, "test-job", expected_items=3)
    assert sorted(root.walk("superseded")) == [f"superseded/{key}" for key in old_images]  # moved, not deleted
    assert len(list(root.walk("images"))) == 3
    store = AuditStore(db)
    try:
        old = {it.item_id: it for it in store.iter_items("test-job") if it.status == "superseded"}
    finally:
        store.dispose()
    assert sorted(it.reasons[0]["code"] for it in old.values()) == ["prompt_blocklist", "superseded", "superseded"]
    assert all("was planned again with other settings" in it.reasons[-1]["message"] for it in old.values())
    assert all(it.image_uri.startswith(root.url("superseded/images")) for it in old.values() if it.image_sha256)
    assert run_job(changed, quiet=True).superseded_now == 0  # the same settings again: nothing more to supersede

    # A crash between moving an image and recording its record: the rerun finds the image where it was moved.
    back = load_spec(make_spec(rows, database=db, sampler={"steps": 2}))
    store_write = AuditStore.write_items

    def crash_once(self, items, run_id):
        if any(it.status == "superseded" for it in items):
            monkeypatch.setattr(AuditStore, "write_items", store_write)
            raise RuntimeError("killed")
        return store_write(self, items, run_id)

    monkeypatch.setattr(AuditStore, "write_items", crash_once)
    with pytest.raises(RuntimeError, match="killed"):
        run_job(back, quiet=True)
    recovered = run_job(back, quiet=True)
    assert recovered.counts["generated"] == 3 and recovered.items_total == 3
    check_invariants(db, root.root, "test-job", expected_items=3)


def test_a_screen_rule_added_later_holds_done_images_for_review(make_spec, tmp_path):
    # A `block` rule added later blocked done items on the next run, but a `review` rule left their images public.
    db = _db(tmp_path)
    rows = [{"prompt_id": "mug", "prompt": "a red mug on a table"}, {"prompt_id": "lamp", "prompt": "a desk lamp"}]
    run_job(load_spec(make_spec(rows, database=db)), quiet=True)
    root = Storage(str(tmp_path / "out" / "test-job"))
    assert len(list(root.walk("images"))) == 2
    rules = tmp_path / "brand.yaml"
    rules.write_text("version: brand-1\ncategories:\n  brand_risk:\n    action: review\n    terms: [mug]\n")
    screened = load_spec(make_spec(rows, database=db, scoring={"enabled": False, "screen": {"blocklist": str(rules)}}))
    rerun = run_job(screened, quiet=True)
    assert rerun.generated_now == 0 and rerun.skipped_done == 2 and rerun.decisions == {"review": 1, "unscored": 1}
    assert [k.split("/")[0] for k in root.walk("review")] == ["review"] and len(list(root.walk("images"))) == 1
    check_invariants(db, root.root, "test-job", expected_items=2)
    store = AuditStore(db)
    try:
        mug = next(it for it in store.iter_items("test-job") if it.prompt_id == "mug")
    finally:
        store.dispose()
    assert mug.decision == "review" and [r["rule"] for r in mug.reasons] == ["brand_risk:mug"]
    assert run_job(screened, quiet=True).decisions == {"review": 1, "unscored": 1}
    store = AuditStore(db)
    try:  # once: the finding is on the record now, so the third run neither adds it again nor rewrites the record
        again = next(it for it in store.iter_items("test-job") if it.prompt_id == "mug")
        assert again.reasons == mug.reasons and len(store.history(mug.item_id)) == 2
    finally:
        store.dispose()


def test_a_model_changed_under_the_same_name_is_refused_until_its_revision_label_changes(
    make_spec, tmp_path, tiny_models
):
    # item_id holds the model's id and revision, not its bytes: after the model was replaced in place a rerun
    # skipped every image as done and made the rest with the new model.
    import json
    import shutil

    model = tmp_path / "brand-model"
    shutil.copytree(tiny_models["sd"], model)
    rows = [{"prompt_id": f"p{i}", "prompt": f"a red mug {i}"} for i in range(2)]
    db = f"sqlite:///{tmp_path}/audit.db"
    path = make_spec(rows, database=db, model={"id": str(model)}, sampler={"steps": 2})
    first = run_job(load_spec(path), quiet=True)
    assert first.generated_now == 2
    assert run_job(load_spec(path), quiet=True).skipped_done == 2  # unchanged: resumes

    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "timestep_spacing": "trailing"}))
    for attempt in (lambda: run_job(load_spec(path), quiet=True), lambda: plan_job(load_spec(path))):
        with pytest.raises(SpecError, match=r"is not the model run 2 of job test-job used "
                                            r"\(scheduler/scheduler_config.json changed\)"):  # fmt: skip
            attempt()
    with pytest.raises(SpecError, match=r"dtype float32 → bfloat16"):
        config.write_text(json.dumps({**json.loads(config.read_text()), "timestep_spacing": "leading"}))
        run_job(load_spec(path, ["model.dtype=bfloat16"]), quiet=True)

    again = run_job(load_spec(path, ["model.revision=v2"]), quiet=True)  # a new version of the model: new items
    assert again.generated_now == 2 and again.skipped_done == 0
    store = AuditStore(db)
    try:
        info = store.runs("test-job")[-1]["model_info"]
    finally:
        store.dispose()
    assert info["revision"] == "v2" and info["dtype"] == "float32"
    assert info["weights_sha256"]["scheduler/scheduler_config.json"]


def test_a_row_the_model_cannot_honour_counts_as_a_rejected_row(make_spec, tmp_path):
    # A sampler of the wrong family rejected the row's items, but the summary said "(0 rejected)" rows.
    rows = [
        {"prompt_id": "ok", "prompt": "a red mug"},
        {"prompt_id": "flow", "prompt": "a mug", "sampler": "flow_match_euler"},
    ]
    dry = plan_job(load_spec(make_spec(rows, database=_db(tmp_path))))
    assert (dry.rows, dry.rows_rejected, dry.rejected, dry.pending) == (2, 1, 1, 1)


def test_samples_a_row_no_longer_asks_for_are_superseded(make_spec, tmp_path):
    db = _db(tmp_path)
    rows = [{"prompt_id": "mug", "prompt": "a red mug", "num_images": 2}]
    run_job(load_spec(make_spec(rows, database=db)), quiet=True)
    rows[0]["num_images"] = 1
    fewer = run_job(load_spec(make_spec(rows, database=db)), quiet=True)
    assert (fewer.superseded_now, fewer.skipped_done, fewer.items_total) == (1, 1, 1)
    root = Storage(str(tmp_path / "out" / "test-job"))
    check_invariants(db, root.root, "test-job", expected_items=1)
    assert [k.rsplit("/", 1)[-1][:9] for k in root.walk("superseded")] == ["mug-0001-"]


def test_a_crash_after_planning_never_leaves_a_new_item_beside_the_record_it_replaces(make_spec, tmp_path, monkeypatch):
    # The superseding records were written after the chunk's new items could reach the executor (a shard is
    # flushed inside the chunk): a kill in between left both current, and no later run looked again.
    from pipeline import runner

    db = _db(tmp_path)
    rows = [{"prompt_id": "mug", "prompt": "a red mug"}]
    run_job(load_spec(make_spec(rows, database=db)), quiet=True)
    monkeypatch.setattr(runner, "PLAN_SHARD_ITEMS", 1)
    real = runner._Planner._record_changes
    shards_before = []

    def killed(self, changed, rejected):
        shards_before.append(len(self.shards))
        raise RuntimeError("killed")

    monkeypatch.setattr(runner._Planner, "_record_changes", killed)
    changed = load_spec(make_spec(rows, database=db, sampler={"steps": 3}))
    with pytest.raises(RuntimeError, match="killed"):
        run_job(changed, quiet=True)
    assert shards_before == [0]  # nothing of the chunk was handed to the executor yet
    monkeypatch.setattr(runner._Planner, "_record_changes", real)
    rerun = run_job(changed, quiet=True)
    assert rerun.superseded_now == 1 and rerun.counts == {"generated": 1, "superseded": 1}
    check_invariants(db, str(tmp_path / "out" / "test-job"), "test-job", expected_items=1)


def test_a_screen_rule_added_later_reaches_the_regeneration_tries_too(make_spec, tmp_path, monkeypatch):
    # The first try was held by a scorer and regenerated; the second passed and was published. A screen rule
    # added later held or blocked the first try's record only: the public second try stayed public.
    from pipeline import runner
    from pipeline.stages.base import Stage

    class HoldFirstTries(Stage):
        name = "hold_first_tries"

        def process(self, items):
            for it in items:
                if it.status == "pending":
                    it.decision = "review" if it.attempt == 1 else (it.decision or "pass")
                    if it.attempt == 1:
                        it.reasons.append({"code": "nsfw_threshold", "stage": "score", "action": "review"})
            return items

    real_build = runner.build_stages
    monkeypatch.setattr(runner, "build_stages", lambda spec: [real_build(spec)[0], HoldFirstTries(),
                                                              *real_build(spec)[1:]])  # fmt: skip
    db, policy = _db(tmp_path), {"regenerate_tries": 1, "regenerate_on": ["review"]}
    rows = [{"prompt_id": "mug", "prompt": "a red mug on a table"}]
    run_job(load_spec(make_spec(rows, database=db, policy=policy)), quiet=True)
    root = Storage(str(tmp_path / "out" / "test-job"))
    assert len(list(root.walk("images"))) == 1 and len(list(root.walk("review"))) == 1
    for action, prefix in (("review", "review"), ("block", "quarantine")):
        rules = tmp_path / f"{action}.yaml"
        rules.write_text(f"version: b-1\ncategories:\n  brand_{action}:\n    action: {action}\n    terms: [mug]\n")
        screened = make_spec(rows, database=db, policy=policy,
                             scoring={"enabled": False, "screen": {"blocklist": str(rules)}})  # fmt: skip
        run_job(load_spec(screened), quiet=True)
        assert list(root.walk("images")) == [], action  # nothing of the prompt stays public
        store = AuditStore(db)
        try:
            second = next(it for it in store.iter_items("test-job") if it.attempt == 2)
        finally:
            store.dispose()
        assert second.decision == action and image_key(second).startswith(prefix)
        assert f"brand_{action}:mug" in [r.get("rule") for r in second.reasons]
        check_invariants(db, root.root, "test-job", expected_items=1)
