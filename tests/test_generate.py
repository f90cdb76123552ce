"""DiffusersGenerator: pixels are a function of the item alone; failures stay with their group; models fail fast."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.models.diffusers_loader import ModelError, check_model, model_fingerprint, resolve_model
from pipeline.stages.base import Resources
from pipeline.stages.generate import DiffusersGenerator
from schemas.spec import LoraSpec, ModelSpec
from tests import fixtures_models as fm
from tests.fixtures_models import make_generator, make_item, pixels_of

tiny_models = fm.tiny_models  # the shared session fixture

# 64x64 at 20 steps: the default image size and step count, where batched CPU math visibly rounds differently.
FULL = {"width": 64, "height": 64, "steps": 20, "guidance_scale": 7.5}
BATCH = [
    ("a red ceramic mug on a wooden table", 11, None),
    ("a white sneaker, studio light", 12, "blurry, low quality"),
    ("spring sale banner", 13, None),
    ("a red ceramic mug on a wooden table", 14, None),
]


def full_items() -> list:
    return [make_item(p, seed=s, negative_prompt=n, **FULL) for p, s, n in BATCH]


@pytest.fixture(scope="module")
def generator(tiny_models):
    return make_generator(batch_size=4)


def test_pixels_do_not_depend_on_batch_size_or_stage_instance(tiny_models):
    by_four = pixels_of(make_generator(batch_size=4).process(full_items()))
    by_one = pixels_of(make_generator(batch_size=1).process(full_items()))
    other_instance = pixels_of(make_generator(batch_size=4).process(full_items()))
    alone = pixels_of(make_generator(batch_size=4).process([full_items()[2]]))
    for a, b, c in zip(by_four, by_one, other_instance, strict=True):
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert np.array_equal(alone[0], by_four[2])
    # Same prompt, different seed: a different image.
    assert not np.array_equal(by_four[0], by_four[3])


def test_batched_mode_trades_the_last_bit_for_throughput(tiny_models, monkeypatch):
    # batch_invariant=False runs four images per call: same images up to rounding in the last bit of the float math
    # (a pixel may move by one level), which is why it is not the default.
    exact = pixels_of(make_generator(batch_size=1).process(full_items()))
    batched_gen = make_generator(batch_size=4, batch_invariant=False)
    calls = []
    pipe_cls = type(batched_gen._pipe)
    real_call = pipe_cls.__call__
    monkeypatch.setattr(
        pipe_cls, "__call__", lambda self, **kw: calls.append(len(kw["prompt"])) or real_call(self, **kw)
    )
    batched = pixels_of(batched_gen.process(full_items()))
    assert calls == [4]
    for a, b in zip(exact, batched, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_different_seeds_give_different_images(generator):
    a, b = pixels_of(generator.process([make_item(seed=1), make_item(seed=2)]))
    assert not np.array_equal(a, b)


def test_negative_prompt_and_guidance_change_the_image(generator):
    base, negative, low_guidance, no_guidance = pixels_of(
        generator.process(
            [
                make_item(seed=5),
                make_item(seed=5, negative_prompt="blurry, watermark"),
                make_item(seed=5, guidance_scale=2.0),
                make_item(seed=5, guidance_scale=1.0),
            ]
        )
    )
    assert not np.array_equal(base, negative)
    assert not np.array_equal(base, low_guidance)
    assert not np.array_equal(low_guidance, no_guidance)
    # An empty negative prompt is no negative prompt.
    [empty] = pixels_of(generator.process([make_item(seed=5, negative_prompt="")]))
    assert np.array_equal(base, empty)


def test_records_time_and_keeps_items_pending(generator):
    items = generator.process([make_item(seed=1), make_item(seed=2)])
    for it in items:
        assert it.status == "pending" and it.error is None
        assert 0 < it.timings["generate_s"] < 60


def test_a_failing_group_fails_only_its_items(generator):
    good = [make_item(seed=1), make_item(seed=2)]
    bad = [make_item(seed=3, width=36), make_item(seed=4, width=36)]  # not a multiple of 8: the pipeline refuses
    out = generator.process([bad[0], good[0], bad[1], good[1]])
    assert [it.item_id for it in out] == [bad[0].item_id, good[0].item_id, bad[1].item_id, good[1].item_id]
    for it in bad:
        assert it.status == "failed" and it.pixels is None
        assert "divisible by 8" in it.error
        assert it.reasons == [{"code": "failed", "stage": "generate", "exception": "ValueError"}]
    pixels_of(good)


def test_an_unknown_sampler_fails_its_group(generator):
    bad, good = make_item(seed=1, sampler="no_such_sampler"), make_item(seed=1)
    generator.process([bad, good])
    assert bad.status == "failed" and "unknown sampler 'no_such_sampler'" in bad.error
    pixels_of([good])


def test_items_that_are_not_pending_pass_through_untouched(generator):
    items = [make_item(seed=1) for _ in range(3)]
    items[0].reject("invalid_row", "prompt: empty")
    items[1].status = "failed"
    items[1].error = "earlier"
    items[2].status = "generated"
    items[2].image_uri = "file:///x.png"
    before = [json.dumps(it.as_dict(), sort_keys=True) for it in items]
    out = generator.process(items)
    assert out == items
    assert [json.dumps(it.as_dict(), sort_keys=True) for it in out] == before
    assert all(it.pixels is None for it in out)


def test_an_item_without_a_seed_or_for_another_model_fails(generator):
    no_seed, other_model, fine = make_item(seed=None), make_item(seed=1, model="other/model"), make_item(seed=1)
    generator.process([no_seed, other_model, fine])
    assert no_seed.status == "failed" and "no seed" in no_seed.error
    assert other_model.status == "failed" and "'other/model'" in other_model.error and "'tiny'" in other_model.error
    pixels_of([fine])


def test_stage_is_cheap_to_pickle_before_and_after_setup(generator):
    fresh = DiffusersGenerator(ModelSpec(), batch_size=2, resources=Resources(num_gpus=0))
    assert fresh._pipe is None
    clone = pickle.loads(pickle.dumps(fresh))
    assert clone.model == fresh.model and clone.batch_size == 2
    shipped = pickle.dumps(generator)  # after setup: the recipe travels, not the weights
    assert len(shipped) < 10_000
    assert pickle.loads(shipped)._pipe is None


# --- models fail fast -----------------------------------------------------------------------------------------


def test_check_model_errors_name_the_problem(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        check_model(ModelSpec(id=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        check_model(ModelSpec(id=str(tmp_path / "empty")))
    pickled = tmp_path / "pickled"
    (pickled / "unet").mkdir(parents=True)
    (pickled / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelError, match=r"component 'unet' has only pickle weights \(diffusion_pytorch_model.bin\)"):
        check_model(ModelSpec(id=str(pickled)))
    # Pickle files next to safetensors ones are left alone: from_pretrained(use_safetensors=True) ignores them.
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert check_model(ModelSpec(id=str(pickled))) == str(pickled)


def test_a_broken_model_fails_the_run_with_one_line_naming_it(tiny_models, make_spec, tmp_path, capsys):
    # check_model sees the files; only loading finds a truncated safetensors file, inside the stage's setup().
    import shutil

    from pipeline.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_models["sd"], model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    spec = make_spec([{"prompt_id": "p0", "prompt": "a red mug"}], model={"id": str(model)})
    assert main(["run", spec, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"genpipe: error: {str(model)!r}: cannot load the pipeline: ") and "Traceback" not in err
    assert "diffusion_pytorch_model.safetensors" in err and len(err.strip().splitlines()) == 1


def test_check_model_offline_hf_id_and_lora_errors(tiny_models, tmp_path):
    with pytest.raises(ModelError, match="not in the local HF cache, and HF_HUB_OFFLINE is set"):
        check_model(ModelSpec(id="some-org/some-model-that-is-not-cached"))
    with pytest.raises(ModelError, match="LoRA adapter .* does not exist"):
        check_model(ModelSpec(lora=(LoraSpec(path=str(tmp_path / "missing")),)))
    (tmp_path / "ckpt_lora").mkdir()
    (tmp_path / "ckpt_lora" / "lora.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="has no .safetensors file"):
        check_model(ModelSpec(lora=(LoraSpec(path=str(tmp_path / "ckpt_lora")),)))


def test_resolve_model(tiny_models, monkeypatch, tmp_path):
    assert resolve_model(ModelSpec()) == str(tiny_models["sd"])
    assert resolve_model(ModelSpec(id="stabilityai/stable-diffusion-xl-base-1.0")) == (
        "stabilityai/stable-diffusion-xl-base-1.0"
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model(ModelSpec(id="~/models/sd")) == str(tmp_path / "models" / "sd")


def test_model_fingerprint_hashes_every_weight_and_config_file(tiny_models):
    sd = Path(tiny_models["sd"])
    prints = model_fingerprint(sd)
    assert {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    } <= set(prints)
    assert all(k.endswith((".safetensors", ".json", ".txt", ".model")) for k in prints)
    assert (
        prints["unet/diffusion_pytorch_model.safetensors"]
        == hashlib.sha256((sd / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    )


def test_model_fingerprint_reuses_a_cached_digest_until_the_file_changes(tmp_path, monkeypatch):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    weights = model / "unet" / "w.safetensors"
    weights.write_bytes(b"first weights")
    cache = tmp_path / "fingerprints.json"
    first = model_fingerprint(model, cache=cache)
    assert first == {"unet/w.safetensors": hashlib.sha256(b"first weights").hexdigest()}

    hashed: list[str] = []
    real_sha = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: hashed.append("x") or real_sha(*a))
    assert model_fingerprint(model, cache=cache) == first and hashed == []  # from the cache: no read

    # Same size, mtime put back: ctime still moves, so the new bytes are hashed.
    st = weights.stat()
    time.sleep(0.02)  # past a coarse (jiffy) timestamp tick, as any real rewrite of model weights is
    weights.write_bytes(b"other weights")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_fingerprint(model, cache=cache) == {"unet/w.safetensors": real_sha(b"other weights").hexdigest()}
    assert hashed == ["x"]

    monkeypatch.setenv("GENPIPE_FINGERPRINT_CACHE", "0")
    hashed.clear()
    model_fingerprint(model, cache=cache)
    assert hashed == ["x"]


@pytest.mark.timeout(180)
def test_sdxl_without_a_negative_prompt_matches_the_diffusers_call_without_one(tmp_path):
    # SDXL zeroes the unconditional embedding for negative_prompt=None (force_zeros_for_empty_prompt), not for [""]:
    # genpipe passed [""] for "no negative prompt", so its images differed from a plain diffusers call.
    import torch

    from benchmarks.gpu import build_sdxl_random
    from pipeline.samplers import make_scheduler

    model = str(build_sdxl_random(tmp_path / "sdxl", "float32", "cpu", arch="sdxl-tiny"))
    generator = make_generator(ModelSpec(id=model), batch_size=2)
    setting = {"model": model, "sampler": "euler", "steps": 2, "guidance_scale": 5.0, "width": 64, "height": 64}
    items = [make_item("a red mug", seed=7, **setting), make_item("a blue mug", seed=8, **setting),
             make_item("a red mug", seed=7, negative_prompt="blurry", **setting)]  # fmt: skip
    plain, other, negative = pixels_of(generator.process(items))

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)

    def bare(**extra):
        out = pipe(prompt=["a red mug"], num_inference_steps=2, guidance_scale=5.0, width=64, height=64,
                   generator=[torch.Generator("cpu").manual_seed(7)], output_type="np", **extra).images[0]  # fmt: skip
        return (np.asarray(out) * 255).round().clip(0, 255).astype(np.uint8)

    assert np.array_equal(plain, bare()) and not np.array_equal(bare(), bare(negative_prompt=[""]))
    assert np.array_equal(negative, bare(negative_prompt=["blurry"]))
