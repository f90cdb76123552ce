"""GPU pinning where CUDA exists (opt in: ``pytest -m gpu``): the generator picks its CUDA device in setup() on the
worker, and a Ray run with ``gpus_per_actor`` and fractional scorer GPUs completes with the same pixels as on CPU."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_spec
from pipeline.runner import run_job
from pipeline.stages.base import Resources
from pipeline.stages.generate import DiffusersGenerator
from schemas.record import Item
from schemas.spec import ModelSpec
from tests.invariants import check_invariants

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _item(seed: int) -> Item:
    return Item(item_id=f"{seed:032d}", job="j", prompt_id=f"p{seed}", sample_index=0, row_number=1,
                prompt="a red mug", seed=seed, model="tiny", sampler="euler", steps=4, guidance_scale=5.0,
                width=64, height=64)  # fmt: skip


def test_generator_chooses_cuda_in_setup_and_keeps_seeds_as_data():
    gpu = DiffusersGenerator(ModelSpec(), batch_size=2, resources=Resources(num_gpus=1))
    cpu = DiffusersGenerator(ModelSpec(), batch_size=2, resources=Resources(num_gpus=0))
    gpu.setup()
    cpu.setup()
    assert gpu.device == "cuda" and cpu.device == "cpu"
    [a] = gpu.process([_item(3)])
    [b] = cpu.process([_item(3)])
    # CPU generators make the initial noise identical; kernels differ, so compare closely, not bit for bit.
    assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).mean() < 2.0


def test_ray_run_with_whole_gpu_generators_and_fractional_scorers(make_spec, tmp_path):
    rows = [{"prompt_id": f"p{i}", "prompt": f"a product shot {i}"} for i in range(8)]
    db = f"sqlite:///{tmp_path}/audit.db"
    path = make_spec(rows, executor="ray", database=db, scoring={"enabled": True},
                     resources={"generator_actors": 1, "gpus_per_actor": 1, "scorer_gpu_fraction": 0.25,
                                "cpus_per_actor": 1})  # fmt: skip
    summary = run_job(load_spec(path), quiet=True)
    assert summary.counts == {"generated": 8}
    check_invariants(db, str(tmp_path / "out" / "test-job"), "test-job", 8)
