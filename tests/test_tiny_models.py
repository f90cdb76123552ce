"""The tiny offline models: safetensors only, loaded by the real loaders, the real CLIP tokenizer, a safe cache."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models import tiny
from pipeline.models.diffusers_loader import load_pipeline
from schemas.spec import ModelSpec
from tests import fixtures_models as fm

tiny_models = fm.tiny_models  # the shared session fixture

PROMPTS = ["a photo of a cat", "A Red  Ceramic Mug, studio lighting!", "Ünïcode café — 50% off", "x"]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A fresh build (not the cache), so what build_tiny writes is what is checked."""
    return tiny.build_tiny(tmp_path_factory.mktemp("tiny") / "models")


def test_build_writes_safetensors_only_and_stays_small(built):
    root = built["sd"].parent
    files = [p for p in root.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    weights = sorted(p.relative_to(root).as_posix() for p in files if p.suffix == ".safetensors")
    assert weights == [
        "clip/open_clip_model.safetensors",
        "sd/text_encoder/model.safetensors",
        "sd/unet/diffusion_pytorch_model.safetensors",
        "sd/vae/diffusion_pytorch_model.safetensors",
    ]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20


def test_pipeline_loads_through_the_real_loader(built):
    pipe = load_pipeline(ModelSpec(id=str(built["sd"])), "cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.vae_scale_factor == 8  # like SD: a 64x64 image is an 8x8 latent
    assert pipe.tokenizer.model_max_length == 77
    saved = load_file(str(built["sd"] / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    out = pipe(
        "a cat", num_inference_steps=2, width=64, height=64, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert out.shape == (1, 64, 64, 3)


def test_clip_loads_back_through_open_clip_with_the_checkpoint(built):
    import open_clip
    from PIL import Image

    name = tiny.register_tiny_clip(built["clip_config"])
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(built["clip"]))
    saved = load_file(str(built["clip"]))
    state = model.state_dict()
    assert set(state) == set(saved)
    for key, tensor in state.items():
        assert torch.equal(tensor, saved[key]), key
    image = preprocess(Image.new("RGB", (80, 60), (200, 10, 10))).unsqueeze(0)
    with torch.no_grad():
        img = model.encode_image(image)
        txt = model.encode_text(open_clip.tokenize(["a red square"]))
    assert img.shape == txt.shape == (1, 32)
    # The self-describing layout open_clip also reads: `local-dir:<dir>` with open_clip_config.json beside the weights.
    local, _, _ = open_clip.create_model_and_transforms(f"local-dir:{built['clip'].parent}")
    assert torch.equal(local.state_dict()["text_projection"], saved["text_projection"])


def test_tokenizer_is_the_real_clip_bpe(built):
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(built["sd"] / "tokenizer")
    assert hf("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    reference = open_clip.tokenize(PROMPTS)  # pads with 0; the SD tokenizer pads with <|endoftext|>
    for prompt, ref in zip(PROMPTS, reference, strict=True):
        ids = hf(prompt).input_ids
        assert ids[0] == 49406 and ids[-1] == 49407
        assert ids == ref[: len(ids)].tolist(), prompt
    # Every BPE token has open_clip's id (the two special tokens are only spelled differently).
    vocab, _ = tiny.clip_bpe()
    encoder = SimpleTokenizer().encoder
    renamed = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}
    assert len(vocab) == len(encoder) == 49408
    assert all(encoder[renamed.get(tok, tok)] == i for tok, i in vocab.items())


def test_ensure_tiny_is_idempotent(tiny_models):
    marker = tiny_models["sd"].parent / ".complete"
    before = marker.stat().st_mtime_ns
    again = tiny.ensure_tiny()
    assert again == tiny_models
    assert marker.stat().st_mtime_ns == before
    assert all(p.exists() for p in again.values())


def test_ensure_tiny_builds_once_under_concurrent_callers(tmp_path, monkeypatch):
    # flock locks belong to open file descriptions, so threads that each open the lock file contend exactly like
    # processes do; a fake builder keeps this fast and counts builds.
    monkeypatch.setenv("GENPIPE_CACHE", str(tmp_path / "cache"))
    builds = []

    def slow_build(directory):
        builds.append(directory)
        threading.Event().wait(0.3)
        for path in tiny.tiny_paths(directory).values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
        return tiny.tiny_paths(directory)

    monkeypatch.setattr(tiny, "build_tiny", slow_build)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(tiny.ensure_tiny())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert len(results) == 4 and all(r == results[0] for r in results)
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == [f"{tiny.TINY_VERSION}", f"{tiny.TINY_VERSION}.lock"]


def test_ensure_tiny_rebuilds_an_incomplete_cache_and_cleans_up_a_failed_build(tmp_path, monkeypatch):
    monkeypatch.setenv("GENPIPE_CACHE", str(tmp_path))
    (tmp_path / tiny.TINY_VERSION / "sd").mkdir(parents=True)  # a crashed build without its marker
    (tmp_path / f".{tiny.TINY_VERSION}.killed" / "sd").mkdir(parents=True)  # the temp dir of a killed build

    def failing_build(directory):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "build_tiny", failing_build)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny.ensure_tiny()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{tiny.TINY_VERSION}.lock"]

    def quick_build(directory):
        for path in tiny.tiny_paths(directory).values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
        return tiny.tiny_paths(directory)

    monkeypatch.setattr(tiny, "build_tiny", quick_build)
    paths = tiny.ensure_tiny()
    assert paths["sd"] == tmp_path / tiny.TINY_VERSION / "sd" and (tmp_path / tiny.TINY_VERSION / ".complete").exists()
