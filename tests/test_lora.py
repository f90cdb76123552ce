"""LoRA adapters through DiffusersGenerator: they change the image, scale 0 is the base model, per-row adapters load."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file

from pipeline.models.diffusers_loader import ModelError, check_model, lora_adapter_name
from schemas.spec import LoraSpec, ModelSpec
from tests import fixtures_models as fm
from tests.fixtures_models import make_generator, make_item, pixels_of

tiny_models = fm.tiny_models  # the shared session fixtures
tiny_lora = fm.tiny_lora

SEEDS = (3, 4)


def lora_items(lora: list[dict], **fields) -> list:
    return [make_item("a red ceramic mug", seed=s, lora=lora, **fields) for s in SEEDS]


@pytest.fixture(scope="module")
def base_pixels(tiny_models) -> list[np.ndarray]:
    return pixels_of(make_generator(batch_size=2).process(lora_items([])))


@pytest.fixture(scope="module")
def lora_generator(tiny_lora):
    return make_generator(ModelSpec(lora=(LoraSpec(path=str(tiny_lora), scale=1.0),)), batch_size=2)


def as_row(path, scale: float) -> list[dict]:
    """What the planner puts on an item: the adapter specs as plain dicts."""
    return [LoraSpec(path=str(path), scale=scale).model_dump()]


def test_adapter_is_saved_as_diffusers_lora_safetensors(tiny_lora):
    files = sorted(p.name for p in tiny_lora.iterdir())
    assert files == ["pytorch_lora_weights.safetensors"]
    state = load_file(str(tiny_lora / "pytorch_lora_weights.safetensors"))
    assert state and all(k.startswith("unet.") and ".lora_" in k for k in state)
    assert all(t.abs().sum() > 0 for t in state.values())  # random A and B: the adapter is not a no-op
    assert check_model(ModelSpec(lora=(LoraSpec(path=str(tiny_lora)),))) == str(fm.ensure_tiny()["sd"])


def test_adapter_changes_the_image_and_scale_zero_is_the_base_model(tiny_lora, lora_generator, base_pixels):
    full = pixels_of(lora_generator.process(lora_items(as_row(tiny_lora, 1.0))))
    half = pixels_of(lora_generator.process(lora_items(as_row(tiny_lora, 0.5))))
    zero = pixels_of(lora_generator.process(lora_items(as_row(tiny_lora, 0.0))))
    without = pixels_of(lora_generator.process(lora_items([])))
    for b, f, h, z, w in zip(base_pixels, full, half, zero, without, strict=True):
        assert not np.array_equal(b, f)
        assert not np.array_equal(f, h) and not np.array_equal(b, h)
        assert np.array_equal(b, z)  # exact, like the determinism test
        assert np.array_equal(b, w)  # loaded but inactive: the base model exactly
    # Switching back and forth gives the same images again.
    again = pixels_of(lora_generator.process(lora_items(as_row(tiny_lora, 1.0))))
    assert all(np.array_equal(a, f) for a, f in zip(again, full, strict=True))


def test_adapters_from_rows_load_on_first_use_and_once(tiny_lora, tmp_path, base_pixels):
    other = fm.build_tiny_lora(fm.ensure_tiny()["sd"], tmp_path / "other", seed=1)
    gen = make_generator(batch_size=2)  # no adapters in the spec
    mixed = lora_items(as_row(tiny_lora, 1.0)) + lora_items(as_row(other, 1.0)) + lora_items([])
    out = pixels_of(gen.process(mixed))
    first, second, plain = out[0:2], out[2:4], out[4:6]
    assert not np.array_equal(first[0], second[0])
    assert all(np.array_equal(p, b) for p, b in zip(plain, base_pixels, strict=True))
    loaded = gen._pipe.get_list_adapters()["unet"]
    assert sorted(loaded) == sorted(
        [lora_adapter_name(as_row(tiny_lora, 1.0)[0]), lora_adapter_name(as_row(other, 1)[0])]
    )
    # A new scale for a loaded adapter reuses it instead of loading another copy.
    pixels_of(gen.process(lora_items(as_row(tiny_lora, 0.5))))
    assert len(gen._pipe.get_list_adapters()["unet"]) == 2
    # Two adapters at once.
    both = pixels_of(gen.process(lora_items(as_row(tiny_lora, 1.0) + as_row(other, 1.0))))
    assert not np.array_equal(both[0], first[0]) and not np.array_equal(both[0], second[0])


def test_a_missing_row_adapter_fails_its_group_only(tiny_lora, tmp_path, lora_generator, base_pixels):
    bad = lora_items(as_row(tmp_path / "missing", 1.0))
    good = lora_items([])
    lora_generator.process(bad + good)
    for it in bad:
        assert it.status == "failed" and "does not exist" in it.error and "ModelError" in it.error
    assert all(np.array_equal(p, b) for p, b in zip(pixels_of(good), base_pixels, strict=True))


def test_lora_file_that_is_not_safetensors_is_refused(tmp_path):
    (tmp_path / "adapter.ckpt").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .safetensors file"):
        check_model(ModelSpec(lora=(LoraSpec(path=str(tmp_path / "adapter.ckpt")),)))


def test_an_adapter_at_an_fsspec_url_is_fetched_once_into_the_cache(tiny_lora, tmp_path, monkeypatch, base_pixels):
    import fsspec

    monkeypatch.setenv("GENPIPE_CACHE", str(tmp_path / "cache"))
    url = "memory://genpipe-test-loras/adapter-v1"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{url}/pytorch_lora_weights.safetensors", (tiny_lora / "pytorch_lora_weights.safetensors").read_bytes())
    try:
        local = pixels_of(make_generator(batch_size=2).process(lora_items(as_row(tiny_lora, 1.0))))
        remote = pixels_of(make_generator(batch_size=2).process(lora_items(as_row(url, 1.0))))
    finally:
        fs.rm("memory://genpipe-test-loras", recursive=True)
    assert all(np.array_equal(a, b) for a, b in zip(local, remote, strict=True))
    assert len(list((tmp_path / "cache" / "lora").iterdir())) == 1


def test_an_adapter_replaced_at_its_url_is_fetched_again(tiny_lora, tmp_path, monkeypatch):
    # The cache was keyed on the URL alone: a new actor or a later run kept loading the replaced adapter.
    import fsspec

    monkeypatch.setenv("GENPIPE_CACHE", str(tmp_path / "cache"))
    other = fm.build_tiny_lora(fm.ensure_tiny()["sd"], tmp_path / "other", seed=1)
    url = "memory://genpipe-test-loras-replaced/style"
    fs = fsspec.filesystem("memory")

    def publish(adapter):
        fs.pipe(f"{url}/pytorch_lora_weights.safetensors", (adapter / "pytorch_lora_weights.safetensors").read_bytes())
        return pixels_of(make_generator(batch_size=1).process(lora_items(as_row(url, 1.0))[:1]))[0]

    try:
        first, second = publish(tiny_lora), publish(other)
    finally:
        fs.rm("memory://genpipe-test-loras-replaced", recursive=True)
    expected = pixels_of(make_generator(batch_size=1).process(lora_items(as_row(other, 1.0))[:1]))[0]
    assert not np.array_equal(first, second) and np.array_equal(second, expected)
    assert len(list((tmp_path / "cache" / "lora").iterdir())) == 2  # one copy per version
