"""The GPU benchmark's code path, rehearsed on the CPU: SDXL's architecture at toy widths goes through the same
build, ``from_pretrained`` load, genpipe run, pixel comparison and FLOP count as the SDXL-size run on a lent GPU,
so the one prepared device run (benchmarks/device_run.sh) does not find its bugs there."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(args: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})  # fmt: skip


@pytest.mark.timeout(240)
def test_gpu_benchmark_rehearsed_on_cpu_with_sdxl_architecture(tmp_path):
    out_json, out_md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    args = shlex.split(
        "--device cpu --arch sdxl-tiny -n 4 --width 64 --height 64 --steps 2 --batch 2 --clip-arch tiny "
        "--scenarios bare,noscore,full --peak-tflops 0.5"
    )
    paths = ["--workdir", str(tmp_path / "work"), "--json", str(out_json), "--md", str(out_md)]
    done = _run([sys.executable, "-m", "benchmarks.gpu", *args, *paths], timeout=220)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    payload = json.loads(out_json.read_text())
    bench = payload["throughput"]
    assert bench["errors"] == {}
    model = Path(bench["config"]["model"])
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert {"text_encoder_2", "tokenizer_2"} <= {p.name for p in model.iterdir()}

    scenarios = bench["scenarios"]
    for name in ("bare", "noscore", "full"):
        assert scenarios[name]["images"] == 4, name
    for name in ("noscore", "full"):  # genpipe stored exactly the bare loop's pixels
        same = scenarios[name]["pixels_vs_bare"]
        assert same["compared"] == 4 and same["identical"] == 4, (name, same)
    assert sum(scenarios["full"]["decisions"].values()) == 4

    mfu = bench["mfu"]
    assert mfu["cfg_rows"] == 2 and mfu["peak_tflops"] == 0.5
    # 64×64 images are 8×8 latents; a UNet forward on them is megaflops, not teraflops
    assert 1e6 < mfu["unet_flops_per_image_step"] < 1e10
    assert mfu["unet_flops_per_image"] == mfu["unet_flops_per_image_step"] * 2
    for name in ("bare", "noscore", "full"):
        row = mfu["scenarios"][name]
        expected = mfu["unet_flops_per_image"] * scenarios[name]["images_per_s"] / 1e12
        assert row["achieved_tflops"] == pytest.approx(expected, rel=1e-3)
        assert row["mfu"] == pytest.approx(row["achieved_tflops"] / 0.5, rel=1e-3)
    assert payload["ratio_noscore_vs_bare"] == pytest.approx(
        scenarios["noscore"]["images_per_s"] / scenarios["bare"]["images_per_s"], rel=1e-2
    )
    md = out_md.read_text()
    assert "MFU on " in md and "per image-step (CFG rows 2)" in md


def test_gpu_benchmark_without_cuda_measures_nothing(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = _run([sys.executable, "-m", "benchmarks.gpu", "--json", str(tmp_path / "g.json")], timeout=120)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "No numbers were produced" in done.stderr
    assert not (tmp_path / "g.json").exists()


def test_device_run_needs_the_kit(tmp_path):
    done = _run(["bash", "benchmarks/device_run.sh"], timeout=60, OUT=str(tmp_path / "out"),
                KIT=str(tmp_path / "no-kit"))  # fmt: skip
    assert done.returncode == 2
    assert "no wheels under" in done.stdout and "benchmarks.device_kit" in done.stdout
    assert "no wheels under" in (tmp_path / "out" / "log.txt").read_text()
