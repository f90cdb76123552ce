"""Fixtures and helpers for tests that run the tiny models: the cached tiny build, a tiny LoRA, items to generate.

A test module uses a fixture by naming it at module level (``tiny_models = fixtures_models.tiny_models``).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from pipeline.models.tiny import build_tiny_lora, ensure_tiny
from pipeline.stages.base import Resources
from pipeline.stages.generate import DiffusersGenerator
from schemas.record import Item
from schemas.spec import ModelSpec

_ids = itertools.count()


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """The tiny models in the genpipe cache (built once per machine; concurrent builds are safe)."""
    return ensure_tiny()


@pytest.fixture(scope="session")
def tiny_lora(tiny_models, tmp_path_factory) -> Path:
    """A random non-zero LoRA adapter for the tiny UNet, in the diffusers LoRA format."""
    return build_tiny_lora(tiny_models["sd"], tmp_path_factory.mktemp("lora") / "adapter", seed=0)


def make_generator(model: ModelSpec | None = None, batch_size: int = 4, **kwargs) -> DiffusersGenerator:
    """A generator set up on CPU."""
    gen = DiffusersGenerator(model or ModelSpec(), batch_size=batch_size, resources=Resources(num_cpus=1), **kwargs)
    gen.setup()
    return gen


def make_item(prompt: str = "a red ceramic mug", seed: int | None = 1, **fields) -> Item:
    """A pending item for the tiny model: 32x32, euler, 4 steps, guidance 5 unless overridden."""
    n = next(_ids)
    defaults = {
        "model": "tiny",
        "sampler": "euler",
        "steps": 4,
        "guidance_scale": 5.0,
        "width": 32,
        "height": 32,
    }
    return Item(
        item_id=f"item{n:04d}",
        job="test",
        prompt_id=f"p{n}",
        sample_index=0,
        row_number=n,
        prompt=prompt,
        seed=seed,
        **{**defaults, **fields},
    )


def pixels_of(items: list[Item]) -> list:
    """The pixels of generated items, asserting each one got an image."""
    for it in items:
        assert it.status == "pending" and it.pixels is not None, (it.item_id, it.status, it.error)
    return [it.pixels for it in items]
