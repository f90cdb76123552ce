"""Manifest reading and row validation: every bad row becomes rejected items with a reason; good rows expand
into items with deterministic ids and recorded seeds."""

from __future__ import annotations

import math
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_spec
from pipeline.errors import ManifestError
from pipeline.manifest import ManifestPlanner, plan_manifest, read_rows
from schemas.limits import LIMITS
from schemas.manifest import parse_row
from tests.conftest import write_manifest

GOOD = {"prompt_id": "p1", "prompt": "a red mug on a white table"}


def _spec(**kw):
    base = {"name": "job", "manifest": "unused.parquet", "output": "out", "image": {"images_per_prompt": 2}}
    base.update(kw)
    return load_spec(None, base=base)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt_id": "p"}, "prompt: missing"),
        ({"prompt_id": "p", "prompt": ""}, "prompt: is empty or whitespace"),
        ({"prompt_id": "p", "prompt": " \t\n "}, "prompt: is empty or whitespace"),
        ({"prompt_id": "p", "prompt": "x" * 100_000}, "prompt: has 100000 characters; the limit is 2000"),
        ({"prompt": "x"}, "prompt_id: missing"),
        ({"prompt_id": "../../etc/passwd", "prompt": "x"}, "prompt_id: must be 1-128 characters"),
        ({"prompt_id": "a/b", "prompt": "x"}, "prompt_id: must be 1-128 characters"),
        ({"prompt_id": "", "prompt": "x"}, "prompt_id: must be 1-128 characters"),
        ({"prompt_id": "..", "prompt": "x"}, "prompt_id: must be 1-128 characters"),
        ({"prompt_id": "a" * 129, "prompt": "x"}, "prompt_id: must be 1-128 characters"),
        ({"prompt_id": "p1\n", "prompt": "x"}, "prompt_id: must be 1-128 characters"),  # "$" matches before \n
        ({"prompt_id": "p", "prompt": "x", "seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"prompt_id": "p", "prompt": "x", "seed": 2**63}, "seed: Input should be less than or equal to"),
        ({"prompt_id": "p", "prompt": "x", "seed": math.nan}, "seed: Value error, seed must be a finite integer"),
        ({"prompt_id": "p", "prompt": "x", "seed": 1.5}, "seed: Value error, seed must be an integer"),
        ({"prompt_id": "p", "prompt": "x", "seed": "42"}, "seed: Value error, seed must be an integer, got str"),
        ({"prompt_id": "p", "prompt": "x", "width": 100}, "width: Input should be a multiple of 8"),
        ({"prompt_id": "p", "prompt": "x", "height": 8192}, "height: Input should be less than or equal to 2048"),
        ({"prompt_id": "p", "prompt": "x", "steps": 0}, "steps: Input should be greater than or equal to 1"),
        ({"prompt_id": "p", "prompt": "x", "steps": 10_000}, "steps: Input should be less than or equal to 200"),
        ({"prompt_id": "p", "prompt": "x", "guidance_scale": -0.5}, "guidance_scale: Input should be greater"),
        ({"prompt_id": "p", "prompt": "x", "guidance_scale": math.inf}, "guidance_scale: Value error, must be finite"),
        ({"prompt_id": "p", "prompt": "x", "sampler": "warp"}, "sampler: Value error, unknown sampler 'warp'"),
        ({"prompt_id": "p", "prompt": 42}, "prompt: must be text, got int"),
        ({"prompt_id": 7, "prompt": "x"}, "prompt_id: must be text, got int"),
        ({"prompt_id": "p", "prompt": "x", "num_images": 0}, "num_images: Input should be greater than or equal"),
        ({"prompt_id": "p", "prompt": "x", "tags": "a,b"}, "tags: must be a list of strings"),
        ({"prompt_id": "p", "prompt": "a\x00b"}, "prompt: contains a NUL character"),
        ({"prompt_id": "p\x00", "prompt": "x"}, "prompt_id: contains a NUL character"),
        ({"prompt_id": "p", "prompt": "a \x1b[2Jmug"}, "prompt: contains the control character U+001B"),
        ({"prompt_id": "p", "prompt": "x", "campaign": "spring\x7f"}, "campaign: contains the control character"),
    ],
)
def test_bad_rows_are_rejected_with_a_reason(row, reason):
    problems = parse_row(row)
    assert isinstance(problems, list), f"accepted {row!r}"
    assert any(p.replace("Value error, ", "").startswith(reason.replace("Value error, ", "")) for p in problems), (
        problems
    )
    outcome = ManifestPlanner(_spec()).plan_row(5, row)
    assert outcome.problems == problems
    assert len(outcome.items) == 2 and all(it.status == "rejected" for it in outcome.items)
    assert all(it.reasons and it.reasons[0]["code"] == "invalid_row" for it in outcome.items)
    assert len({it.item_id for it in outcome.items}) == 2


def test_tabs_and_line_breaks_are_text():
    row = parse_row({"prompt_id": "p", "prompt": "a mug,\tred\r\non a table"})
    assert not isinstance(row, list) and row.prompt == "a mug,\tred\r\non a table"


def test_good_row_with_overrides_and_pass_through_columns():
    row = {**GOOD, "seed": 10, "num_images": 3, "width": 48, "steps": 7, "guidance_scale": 0.0, "sampler": "ddim",
           "campaign": "spring", "tags": ["a"], "brief_owner": "me", "seed_float": 1.0, "price": math.nan}  # fmt: skip
    outcome = ManifestPlanner(_spec()).plan_row(1, row)
    assert outcome.problems == []
    items = outcome.items
    assert [it.sample_index for it in items] == [0, 1, 2]
    assert [it.seed for it in items] == [10, 11, 12] and {it.seed_source for it in items} == {"row"}
    it = items[0]
    assert (it.width, it.height, it.steps, it.guidance_scale, it.sampler) == (48, 64, 7, 0.0, "ddim")
    assert it.campaign == "spring" and it.tags == ["a"]
    assert it.metadata == {"brief_owner": "me", "seed_float": 1.0, "price": None}
    assert all(i.status == "pending" for i in items)


def test_integral_float_seed_is_accepted_and_none_derives():
    row = parse_row({**GOOD, "seed": 42.0})
    assert not isinstance(row, list) and row.seed == 42
    items = ManifestPlanner(_spec()).plan_row(1, {**GOOD, "seed": None}).items
    assert all(it.seed_source == "derived" and 0 <= it.seed <= LIMITS.max_seed for it in items)
    assert items[0].seed != items[1].seed


def test_item_ids_and_seeds_are_deterministic_and_parameter_sensitive():
    a = ManifestPlanner(_spec()).plan_row(1, GOOD).items
    b = ManifestPlanner(_spec()).plan_row(9, GOOD).items  # row position does not matter for valid rows
    assert [i.item_id for i in a] == [i.item_id for i in b] and [i.seed for i in a] == [i.seed for i in b]
    c = ManifestPlanner(_spec(sampler={"steps": 21})).plan_row(1, GOOD).items
    d = ManifestPlanner(_spec(name="other")).plan_row(1, GOOD).items
    e = ManifestPlanner(_spec()).plan_row(1, {**GOOD, "prompt": "a blue mug"}).items
    ids = {i.item_id for i in a}
    for other in (c, d, e):
        assert ids.isdisjoint(i.item_id for i in other)


def test_duplicates_keep_the_first_and_name_it():
    planner = ManifestPlanner(_spec())
    first = planner.plan_row(1, GOOD)
    second = planner.plan_row(2, {**GOOD, "prompt": "another"})
    assert first.problems == [] and second.problems == ["prompt_id: duplicate of row 1 (prompt_id 'p1')"]
    assert {i.item_id for i in first.items}.isdisjoint(i.item_id for i in second.items)


def test_row_override_not_allowed_by_spec_is_rejected():
    spec = _spec(row_overrides=["seed"])
    outcome = ManifestPlanner(spec).plan_row(1, {**GOOD, "steps": 5})
    assert outcome.problems == ["steps: this job's spec does not allow rows to override it"]


def _lora_problems(spec, *paths: str) -> list[str]:
    return ManifestPlanner(spec).plan_row(1, {**GOOD, "lora": [{"path": p} for p in paths]}).problems


def test_row_adapters_come_only_from_the_spec_or_its_row_lora_sources(tmp_path):
    approved, other = tmp_path / "approved", tmp_path / "approved-but-not"
    for folder in (approved / "brand", other):
        folder.mkdir(parents=True)
    (approved / "link-out").symlink_to(other)
    own = str(tmp_path / "spec-own")
    spec = _spec(model={"lora": [{"path": own}], "row_lora_sources": [str(approved), "s3://brand/lora/"]})
    for ok in (own, str(approved / "brand"), str(approved), f"file://{approved}/brand",
               "s3://brand/lora/spring-v2", "S3://brand/lora/x"):  # fmt: skip
        assert _lora_problems(spec, ok) == [], ok
    outside = {
        str(other): "is neither one of the spec's adapters",  # a sibling whose name starts like the folder's
        str(approved / "brand" / ".." / ".." / "approved-but-not"): "is neither",  # .. resolves out of it
        str(approved / "link-out"): "is neither",  # a symlink inside pointing out
        "/etc/passwd": "is neither",
        "s3://brand/lora-other/x": "is neither",
        "s3://brand/lorax": "is neither",
        "http://169.254.169.254/latest/meta-data/": "is neither",
        "s3://brand/lora/../secrets/x": "'.' or '..' segments",
        "s3://brand/lora/%2e%2e/secrets": "escapes",
        "s3://brand/lora/x?versionId=1": "a query",
        # fsspec chains: the outer filesystem is local and reads the path before '::', wherever it points
        f"{approved}/../../secret/x.safetensors::memory://": "'::' chain",
        f"{approved}/brand::memory://": "'::' chain",
        f"{approved}/x://y": "'::' chain",  # a '://' that does not start a URL
    }
    for path, reason in outside.items():
        problems = _lora_problems(spec, path)
        assert len(problems) == 1 and problems[0].startswith(f"lora: adapter {path!r}") and reason in problems[0], (
            path, problems)  # fmt: skip
    # One bad adapter rejects the row, whatever the others; the row's items are `rejected` records.
    outcome = ManifestPlanner(spec).plan_row(3, {**GOOD, "lora": [{"path": own}, {"path": "/etc/passwd"}]})
    assert [it.status for it in outcome.items] == ["rejected", "rejected"]
    assert outcome.items[0].reasons[0]["field"] == "lora"


def test_without_row_lora_sources_rows_may_only_reweigh_the_spec_adapters(tmp_path):
    own = str(tmp_path / "brand")
    spec = _spec(model={"lora": [{"path": own, "scale": 1.0}]})
    outcome = ManifestPlanner(spec).plan_row(1, {**GOOD, "lora": [{"path": own, "scale": 0.4}]})
    assert outcome.problems == [] and outcome.items[0].lora[0]["scale"] == 0.4
    assert "(none)" in _lora_problems(spec, str(tmp_path / "other"))[0]


def test_read_rows_streams_in_batches(tmp_path):
    rows = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}"} for i in range(2500)]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=1000)
    got = list(read_rows(str(path), batch_rows=300))
    assert [n for n, _ in got] == list(range(1, 2501))
    assert got[-1][1]["prompt_id"] == "p2499"


def test_manifest_from_memory_and_file_urls(tmp_path):
    table = pa.Table.from_pylist([GOOD])
    with fsspec.open("memory://manifests/m.parquet", "wb") as f:
        pq.write_table(table, f)
    assert [r["prompt_id"] for _, r in read_rows("memory://manifests/m.parquet")] == ["p1"]
    path = write_manifest(tmp_path / "m.parquet", [GOOD])
    assert [r["prompt_id"] for _, r in read_rows(f"file://{path}")] == ["p1"]


def test_missing_corrupt_and_truncated_manifests_are_named(tmp_path):
    with pytest.raises(ManifestError, match=r"manifest .*nope\.parquet: no such file"):
        list(read_rows(str(tmp_path / "nope.parquet")))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet at all")
    with pytest.raises(ManifestError, match=r"junk\.parquet: not a readable Parquet file"):
        list(read_rows(str(junk)))
    good = write_manifest(tmp_path / "good.parquet", [GOOD] * 10)
    data = Path(good).read_bytes()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match=r"truncated\.parquet: not a readable Parquet file"):
        list(read_rows(str(truncated)))
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(ManifestError, match=r"empty\.parquet"):
        list(read_rows(str(empty)))
    no_prompt = write_manifest(tmp_path / "cols.parquet", [{"id": "x"}])
    with pytest.raises(ManifestError, match="missing required column"):
        list(read_rows(no_prompt))


def test_plan_manifest_on_wrongly_typed_column(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [{**GOOD, "seed": "abc"}, {"prompt_id": "p2", "prompt": "ok",
                                                                          "seed": "7"}])  # fmt: skip
    outcomes = list(plan_manifest(_spec(manifest=path)))
    assert all(o.problems and o.problems[0].startswith("seed:") for o in outcomes)


def test_seen_ids_agree_with_a_dict_across_merges(monkeypatch):
    import random

    from pipeline.manifest import SeenIds

    monkeypatch.setattr(SeenIds, "MIN_MERGE", 16)  # merge often: most lookups go through the sorted arrays
    rng = random.Random(3)
    ids = [f"sku-{rng.randrange(3000)}" for _ in range(5000)] + ["", "é", "a" * 128, "\U0001f600"]
    seen, reference = SeenIds(), {}
    for row, key in enumerate(ids, start=1):
        assert seen.setdefault(key, row) == reference.setdefault(key, row), key
    assert len(seen) == len(reference) and len(seen._row) > len(seen._recent)  # most of them merged


def test_duplicate_prompt_id_names_the_first_row_after_many_rows(monkeypatch):
    from pipeline.manifest import ManifestPlanner, SeenIds
    from schemas.spec import JobSpec

    monkeypatch.setattr(SeenIds, "MIN_MERGE", 8)
    spec = JobSpec.model_validate({"name": "j", "manifest": "m.parquet", "output": "/tmp/o"})
    planner = ManifestPlanner(spec)
    for row in range(1, 101):
        assert not planner.plan_row(row, {"prompt_id": f"p{row}", "prompt": "a mug"}).problems
    outcome = planner.plan_row(101, {"prompt_id": "p7", "prompt": "again"})
    assert outcome.problems == ["prompt_id: duplicate of row 7 (prompt_id 'p7')"]


def test_nan_inside_a_list_or_struct_column_is_recorded_as_null(tmp_path):
    # JSON has no NaN: a nested one used to fail the audit write after the images were stored.
    table = pa.table({"prompt_id": ["p1", "p2"], "prompt": ["a red mug", "a blue cup"],
                      "dims": pa.array([[1.0, math.nan], [2.0]], pa.list_(pa.float64())),
                      "box": pa.array([{"w": math.inf, "h": 2.0}, {"w": 1.0, "h": 1.0}])})  # fmt: skip
    pq.write_table(table, tmp_path / "m.parquet")
    rows = [parse_row(raw) for _, raw in read_rows(str(tmp_path / "m.parquet"))]
    assert rows[0].metadata == {"dims": [1.0, None], "box": {"w": None, "h": 2.0}}
    assert rows[1].metadata == {"dims": [2.0], "box": {"w": 1.0, "h": 1.0}}


def test_a_cell_python_cannot_hold_rejects_its_row_only(tmp_path):
    far = pa.array([0, 300_000_000_000_000], pa.timestamp("ms"))  # the second one is past year 9999
    table = pa.table({"prompt_id": ["p1", "p2"], "prompt": ["a red mug", "a blue cup"], "launch": far})
    pq.write_table(table, tmp_path / "m.parquet")
    rows = [parse_row(raw) for _, raw in read_rows(str(tmp_path / "m.parquet"))]
    assert rows[0].prompt_id == "p1" and rows[0].metadata["launch"].year == 1970
    assert isinstance(rows[1], list) and rows[1][0].startswith("launch: cannot be read:"), rows[1]


def test_a_column_name_used_twice_is_an_error_naming_it(tmp_path):
    table = pa.Table.from_arrays([pa.array(["p1", "p2"]), pa.array(["a mug", "a cup"]), pa.array(["p9", "p9"])],
                                 names=["prompt_id", "prompt", "prompt_id"])  # fmt: skip
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="column name\\(s\\) used more than once: prompt_id"):
        list(read_rows(str(tmp_path / "m.parquet")))


def test_a_parquet_lora_struct_without_a_scale_takes_the_default(tmp_path):
    # Parquet gives a struct column every field: the adapter without a scale reads back as scale=None.
    own = str(tmp_path / "brand")
    path = str(tmp_path / "m.parquet")
    pq.write_table(pa.Table.from_pylist([{**GOOD, "prompt_id": "a", "lora": [{"path": own, "scale": 0.5}]},
                                         {**GOOD, "prompt_id": "b", "lora": [{"path": own}]}]), path)  # fmt: skip
    rows = [raw for _, raw in read_rows(path)]
    assert rows[1]["lora"] == [{"path": own, "scale": None}]
    spec = _spec(model={"lora": [{"path": own}]})
    outcomes = [ManifestPlanner(spec).plan_row(n, raw) for n, raw in enumerate(rows)]
    assert [o.problems for o in outcomes] == [[], []]
    assert [o.items[0].lora[0]["scale"] for o in outcomes] == [0.5, 1.0]
