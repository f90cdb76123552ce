"""LoRA training on Ray Train: a TorchTrainer with 2 CPU workers (DDP over gloo) runs the same loop and writes the
same outputs as the local executor. (Resuming is the same worker code; tests/test_train.py covers it.)"""

from __future__ import annotations

import csv

import pytest
from safetensors import safe_open

from pipeline.storage import Storage
from pipeline.train.checkpoint import checkpoint_steps
from pipeline.train.runner import load_train_spec, train_lora
from tests import fixtures_models as fm

tiny_models = fm.tiny_models

# ~70-80 s on a loaded 2-core machine (two worker processes import torch + diffusers), so also `slow`.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_cpu_workers_train_data_parallel(ray_local, tiny_models, tmp_path):
    out = tmp_path / "out"
    data = {
        "name": "ray-shapes",
        "dataset": {"synthetic": {"count": 24, "size": 32}},
        "output": str(out),
        "resolution": 32,
        "max_steps": 4,
        "batch_size": 2,
        "optimizer": {"learning_rate": 1e-2},
        "checkpoint_every": 2,
        "executor": "ray",
        "resources": {"workers": 2, "cpus_per_worker": 0.5, "storage_path": str(tmp_path / "ray")},
        "evaluation": {"enabled": False},  # the evaluation runs on rank 0 only; tests/test_train.py covers it
    }
    summary = train_lora(load_train_spec(None, base=data), quiet=True)
    report = summary.report
    assert report["workers"] == 2 and report["steps"] == 4 and report["samples"]["train"] == 24
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())  # noqa: SIM118 (safe_open is no dict)
        # DDP averaged the gradients, so the adapter trained: B starts at zero and is not zero now.
        up = [k for k in f.keys() if "lora_B" in k or "lora.up" in k]  # noqa: SIM118
        assert up and any(f.get_tensor(k).abs().sum() > 0 for k in up)
    with open(out / "loss.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and all(float(r["loss"]) > 0 for r in rows)
    # Each worker reads its own half of the data: 24 samples over 2 workers of batch 2 make 6 batches an epoch.
    assert [int(r["epoch"]) for r in rows] == [0, 0, 0, 0]
    assert checkpoint_steps(Storage(str(out))) == [2, 4]
    assert "evaluation" not in report
    assert (out / "report.md").read_text().startswith("# LoRA training report: ray-shapes")
