"""LoRA training on the tiny model in one process: the loss falls, the adapter loads into a generation job and
changes its images, a rerun resumes from the newest checkpoint, and bad input fails or is counted as documented."""

from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from safetensors import safe_open

from pipeline.config import load_spec
from pipeline.errors import SpecError
from pipeline.runner import run_job
from pipeline.storage import Storage
from pipeline.train.checkpoint import checkpoint_steps
from pipeline.train.data import DatasetError, batch_indices, load_data
from pipeline.train.runner import absolute_paths, load_train_spec, train_lora
from pipeline.train.synthetic import shapes
from schemas.train import MIN_TRAIN_SAMPLES
from tests import fixtures_models as fm

tiny_models = fm.tiny_models

pytestmark = pytest.mark.timeout(240)

STEPS = 50


def shapes_parquet(path, count: int = 64, broken: bool = True) -> str:
    """The synthetic shapes as a Parquet of PNG bytes, plus rows the loader must skip and count."""
    rows = [{"image": png, "caption": caption} for png, caption in shapes(count, 32, seed=0)]
    if broken:
        rows += [
            {"image": b"not an image", "caption": "a corrupt file"},
            {"image": rows[0]["image"][:40], "caption": "a truncated png"},
            {"image": rows[1]["image"], "caption": "   "},
            {"image": rows[2]["image"], "caption": None},
        ]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("image", pa.binary()), ("caption", pa.string())])),
                   str(path))  # fmt: skip
    return str(path)


def spec_data(dataset: dict, output, **overrides) -> dict:
    data = {
        "name": "shapes-test",
        "dataset": dataset,
        "output": str(output),
        "resolution": 32,
        "max_steps": STEPS,
        "batch_size": 4,
        "seed": 0,
        "optimizer": {"learning_rate": 1e-2},
        "checkpoint_every": 25,
        "executor": "local",
        "evaluation": {"holdout": 4, "steps": 2, "prompts": ["a blue square on a black background"]},
    }
    data.update(overrides)
    return data


def losses(output) -> list[dict]:
    with open(f"{output}/loss.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """One 50-step run on 64 shapes (plus 4 broken rows), kept for every test that reads its output."""
    root = tmp_path_factory.mktemp("train")
    data = spec_data({"path": shapes_parquet(root / "shapes.parquet")}, root / "out")
    summary = train_lora(load_train_spec(None, base=data), quiet=True)
    return root, data, summary


def test_the_loss_falls_and_the_outputs_are_written(trained):
    root, _, summary = trained
    out = root / "out"
    rows = losses(out)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    loss = [float(r["loss"]) for r in rows]
    first, last = statistics.mean(loss[:10]), statistics.mean(loss[-10:])
    assert last < first, (first, last)
    report = json.loads((out / "report.json").read_text())
    assert report["loss"]["first_mean"] == pytest.approx(first, abs=1e-5)
    assert report["loss"]["last_mean"] == pytest.approx(last, abs=1e-5)
    assert report["steps"] == STEPS and report["resumed_from_step"] == 0
    assert Image.open(out / "loss.png").size[0] > 100
    # Unreadable images and empty captions were skipped and counted, not fatal.
    assert report["samples"]["skipped"] == {"empty caption": 1, "missing caption": 1, "unreadable image": 2}
    assert (report["samples"]["total"], report["samples"]["train"], report["samples"]["holdout"]) == (68, 60, 4)
    assert len(report["samples"]["skipped_examples"]) == 4
    md = (out / "report.md").read_text()
    assert "2 unreadable image" in md and "1 empty caption" in md
    # The evaluation compared the held-out captions (+ the extra prompt) with and without the adapter.
    ev = report["evaluation"]
    assert ev["validation_loss"]["lora"] < ev["validation_loss"]["base"]
    assert len(ev["images"]) == 5 and all((out / r["base"]).is_file() and (out / r["lora"]).is_file()
                                          for r in ev["images"])  # fmt: skip
    assert any(r["mean_abs_pixel_diff"] > 0 for r in ev["images"])
    clip = ev["clip"]
    assert ("skipped" in clip) or (0 <= clip["base"]["clipscore"] <= 2.5 and 0 <= clip["lora"]["clipscore"] <= 2.5)
    assert checkpoint_steps(Storage(str(out))) == [25, 50]
    assert "loss: first 10 steps" in summary.render()


def test_the_adapter_is_diffusers_lora_safetensors(trained):
    out = trained[0] / "out"
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        up = [f.get_tensor(k) for k in keys if "lora_B" in k or "lora.up" in k]
    assert keys and all(k.startswith("unet.") for k in keys)
    assert {k.rsplit(".lora", 1)[0].rsplit(".", 1)[-1] for k in keys} >= {"to_q", "to_k", "to_v"}
    assert any(t.abs().sum() > 0 for t in up)  # B starts at zero: trained, it is not
    assert "lora_adapter_metadata" in json.dumps(meta)


def test_a_generation_job_loads_the_adapter_and_its_images_change(trained, make_spec, tmp_path):
    out = trained[0] / "out"
    rows = [
        {"prompt_id": f"p{i}", "prompt": p, "seed": 7 + i}
        for i, p in enumerate(["a red circle on a white background", "a green triangle on a grey background"])
    ]
    plain = make_spec(rows, scoring={"enabled": False}, output=str(tmp_path / "plain"))
    first = run_job(load_spec(plain), quiet=True)
    with_lora = make_spec(rows, scoring={"enabled": False}, output=str(tmp_path / "lora"),
                          model={"lora": [{"path": str(out), "scale": 1.0}]})  # fmt: skip
    second = run_job(load_spec(with_lora), quiet=True)
    assert first.counts == second.counts == {"generated": 2}
    images = {}
    for name in ("plain", "lora"):
        files = sorted((tmp_path / name / "test-job" / "images").rglob("*.png"))
        assert len(files) == 2
        images[name] = [np.asarray(Image.open(f)) for f in files]
    assert all(not np.array_equal(a, b) for a, b in zip(images["plain"], images["lora"], strict=True))


def test_a_rerun_resumes_from_the_newest_checkpoint_and_continues_the_step_count(trained, tmp_path):
    root, data, _ = trained
    copy = tmp_path / "out"
    shutil.copytree(root / "out", copy)
    shutil.rmtree(copy / "checkpoints" / "step-50")  # as if the first run died between steps 25 and 50
    spec = load_train_spec(None, ["max_steps=55"], base={**data, "output": str(copy)})
    summary = train_lora(spec, quiet=True)
    assert summary.report["resumed_from_step"] == 25 and summary.report["steps"] == 55
    before, after = losses(root / "out"), losses(copy)
    assert [int(r["step"]) for r in after] == list(range(1, 56))
    # Steps 26-50 again, with the noise, timesteps and batches the uninterrupted run drew (the step is the RNG
    # state); only the last bits may differ, when another test in this process switched oneDNN off.
    assert [float(r["loss"]) for r in after[:50]] == pytest.approx([float(r["loss"]) for r in before], rel=1e-4)
    assert after[:25] == before[:25]  # the history up to the checkpoint is the checkpoint's
    assert checkpoint_steps(Storage(str(copy))) == [50, 55]


def test_a_rerun_with_other_settings_is_refused(trained, tmp_path):
    root, data, _ = trained
    copy = tmp_path / "out"
    shutil.copytree(root / "out", copy)
    spec = load_train_spec(None, ["lora.rank=8", "optimizer.learning_rate=0.001"], base={**data, "output": str(copy)})
    with pytest.raises(SpecError) as err:
        train_lora(spec, quiet=True)
    assert "cannot be resumed" in str(err.value)
    assert {p.split(":")[0] for p in err.value.problems} == {"lora.rank", "optimizer.learning_rate"}
    spec = load_train_spec(None, ["max_steps=10"], base={**data, "output": str(copy)})
    with pytest.raises(SpecError, match="checkpoint at step 50, past the 10 steps"):
        train_lora(spec, quiet=True)


# --- bad input, checked before any training ----------------------------------------------------------------


def test_a_folder_dataset_counts_what_it_skips(tmp_path):
    pairs = shapes(16, 32)
    for i, (png, caption) in enumerate(pairs):
        (tmp_path / f"s{i:02d}.png").write_bytes(png)
        (tmp_path / f"s{i:02d}.txt").write_text(caption)
    (tmp_path / "s00.txt").write_text("  \n")
    (tmp_path / "s01.txt").unlink()
    (tmp_path / "s02.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "notes.md").write_text("ignored")
    data = load_data(load_train_spec(None, base=spec_data({"path": str(tmp_path)}, tmp_path / "o")))
    assert dict(data.skipped) == {"empty caption": 1, "missing caption": 1, "unreadable image": 1}
    assert len(data.train) == 9 and len(data.holdout) == 4  # 16 - 3 skipped - 4 held out
    assert {s.caption for s in data.train + data.holdout} <= {c for _, c in pairs}


def test_parquet_image_uris_resolve_relative_to_the_file(tmp_path):
    pairs = shapes(14, 32)
    (tmp_path / "img").mkdir()
    rows = []
    for i, (png, caption) in enumerate(pairs):
        (tmp_path / "img" / f"{i}.png").write_bytes(png)
        rows.append({"file": f"img/{i}.png" if i % 2 else str(tmp_path / "img" / f"{i}.png"), "text": caption})
    rows.append({"file": "img/missing.png", "text": "gone"})
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "d.parquet"))
    dataset = {"path": str(tmp_path / "d.parquet"), "image_column": "file", "caption_column": "text"}
    data = load_data(load_train_spec(None, base=spec_data(dataset, tmp_path / "o")))
    assert len(data.train) == 10 and dict(data.skipped) == {"image URI not readable": 1}


def test_too_few_samples_is_a_clear_error(tmp_path):
    path = shapes_parquet(tmp_path / "few.parquet", count=MIN_TRAIN_SAMPLES + 3)
    spec = load_train_spec(None, base=spec_data({"path": path}, tmp_path / "o"))
    with pytest.raises(DatasetError, match=rf"7 samples to train on, at least {MIN_TRAIN_SAMPLES} are needed") as err:
        train_lora(spec, quiet=True)
    assert "2 unreadable image" in str(err.value) and "4 held out" in str(err.value)


def test_a_dataset_without_the_named_columns_or_not_parquet_is_named(tmp_path):
    pq.write_table(pa.table({"img": [b"x"], "txt": ["y"]}), str(tmp_path / "d.parquet"))
    with pytest.raises(DatasetError, match=r"no column 'image', 'caption'; its columns: img, txt"):
        load_data(load_train_spec(None, base=spec_data({"path": str(tmp_path / "d.parquet")}, tmp_path / "o")))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetError, match=r"bad.parquet: cannot read it as Parquet"):
        load_data(load_train_spec(None, base=spec_data({"path": str(tmp_path / "bad.parquet")}, tmp_path / "o")))


def test_unknown_target_modules_list_the_valid_names(tiny_models, tmp_path):
    data = spec_data({"synthetic": {"count": 16}}, tmp_path / "o", lora={"target_modules": ["to_q", "q_proj"]})
    with pytest.raises(SpecError) as err:
        train_lora(load_train_spec(None, base=data), quiet=True)
    msg = str(err.value)
    assert msg.startswith("lora.target_modules: 'q_proj' not in the denoiser's attention blocks")
    assert "valid names: to_k, to_out.0, to_q, to_v" in msg


def test_a_base_model_that_is_not_safetensors_fails_fast(tiny_models, tmp_path):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_models["sd"], model)
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_suffix(".bin"))
    data = spec_data({"synthetic": {"count": 16}}, tmp_path / "o", model={"id": str(model)})
    with pytest.raises(SpecError, match=r"model.id: .*component 'unet' has only pickle weights.*safetensors only"):
        train_lora(load_train_spec(None, base=data), quiet=True)
    assert not (tmp_path / "o").exists()  # nothing was started


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"max_steps": None}, "give exactly one of `max_steps` and `epochs`"),
        ({"epochs": 2}, "give exactly one of `max_steps` and `epochs`"),
        ({"dataset": {}}, "dataset: give exactly one of `path` and `synthetic`"),
        ({"lora": {"rank": 0}}, "lora.rank: Input should be greater than or equal to 1"),
        ({"resolution": 30}, "resolution: Input should be a multiple of 8"),
        ({"lora_rank": 4}, "lora_rank: unknown key"),
        ({"evaluation": {"sampler": "nope"}}, "evaluation.sampler: unknown sampler 'nope'"),
        ({"max_steps": True}, "max_steps: Input should be a valid integer"),
        ({"lora": {"rank": "4"}}, "lora.rank: Input should be a valid integer"),
    ],
)
def test_spec_problems_name_the_key(tmp_path, override, message):
    with pytest.raises(SpecError) as err:
        dataset = override.pop("dataset", {"synthetic": {}})
        load_train_spec(None, base=spec_data(dataset, tmp_path / "o", **override))
    assert any(message in p for p in err.value.problems), err.value.problems


def test_fp16_on_cpu_is_refused_before_launch(tiny_models, tmp_path):
    data = spec_data({"synthetic": {"count": 16}}, tmp_path / "o", mixed_precision="fp16")
    with pytest.raises(SpecError, match="fp16 needs a GPU"):
        train_lora(load_train_spec(None, base=data), quiet=True)


def test_relative_paths_are_made_absolute_for_ray_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Ray Train workers run in a directory of their own
    spec = absolute_paths(load_train_spec(None, base=spec_data({"path": "data/x.parquet"}, "runs/out")))
    assert spec.output == str(tmp_path / "runs" / "out")
    assert spec.dataset.path == str(tmp_path / "data" / "x.parquet")
    remote = absolute_paths(load_train_spec(None, base=spec_data({"path": "s3://b/x.parquet"}, "s3://b/out")))
    assert (remote.output, remote.dataset.path) == ("s3://b/out", "s3://b/x.parquet")


def test_every_worker_gets_its_own_share_of_each_epoch():
    n, world, bs = 10, 3, 2
    seen = []
    for rank in range(world):
        for micro in range(2):  # ceil(ceil(10 / 3) / 2) = 2 batches per worker per epoch
            epoch, idx = batch_indices(n, bs, world, rank, seed=5, micro=micro)
            assert epoch == 0
            seen += idx
    assert len(seen) == 12 and set(seen) == set(range(n))  # padded by wrapping, like DistributedSampler
    assert batch_indices(n, bs, world, 0, 5, 2)[0] == 1
    assert batch_indices(n, bs, world, 0, 5, 2)[1] != batch_indices(n, bs, world, 0, 6, 2)[1]


def test_the_example_spec_is_valid_and_the_cli_reports_errors_in_one_line(tmp_path):
    spec = load_train_spec("jobs/train/spec.yaml")
    assert spec.executor == "ray" and spec.resources.workers == 2 and spec.dataset.synthetic is not None
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"dataset": {"synthetic": {}}, "output": str(tmp_path / "o"), "max_step": 3}))
    proc = subprocess.run([sys.executable, "-m", "jobs.train_lora", str(bad)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "max_step: unknown key" in proc.stderr


def test_make_dataset_writes_a_parquet_the_loader_reads(tmp_path):
    from jobs.train.make_dataset import main

    main([str(tmp_path / "s.parquet"), "--count", "12", "--size", "32"])
    main([str(tmp_path / "folder"), "--folder", "--count", "12", "--size", "32"])
    for path in (tmp_path / "s.parquet", tmp_path / "folder"):
        data = load_data(load_train_spec(None, base=spec_data({"path": str(path)}, tmp_path / "o")))
        assert len(data.train) == 8 and not data.skipped
    img = Image.open(io.BytesIO(data.train[0].image))
    assert img.size == (32, 32)


# --- findings of a review: odd images and captions, few samples, outputs that cannot resume or be written ------


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG" if img.mode != "I" else "TIFF")
    return buf.getvalue()


def test_copies_boms_and_wide_pixels_are_handled_not_learned_wrong(tmp_path):
    from pipeline.train.data import Sample, pixel_tensor

    pairs = shapes(16, 32)
    for i, (png, caption) in enumerate(pairs):
        (tmp_path / f"s{i:02d}.png").write_bytes(png)
        (tmp_path / f"s{i:02d}.txt").write_text(caption)
    for i in range(3):  # the same image and caption again: skipped, never on both sides of the split
        shutil.copy(tmp_path / "s03.png", tmp_path / f"copy{i}.png")
        shutil.copy(tmp_path / "s03.txt", tmp_path / f"copy{i}.txt")
    shutil.copy(tmp_path / "s04.png", tmp_path / "recaptioned.png")  # same image, another caption: kept
    (tmp_path / "recaptioned.txt").write_text("the same shape, described differently")
    (tmp_path / "s05.txt").write_bytes("\ufeffa caption saved with a byte order mark".encode())
    (tmp_path / "wide16.png").write_bytes(_png(Image.fromarray(np.full((32, 32), 32896, np.uint16))))
    (tmp_path / "wide16.txt").write_text("a mid-grey 16-bit image")
    (tmp_path / "int32.tif").write_bytes(_png(Image.fromarray(np.full((32, 32), 5, np.int32), mode="I")))
    (tmp_path / "int32.txt").write_text("a 32-bit integer image")
    spec = load_train_spec(None, base=spec_data({"path": str(tmp_path)}, tmp_path / "o"))
    data = load_data(spec)
    assert dict(data.skipped) == {"duplicate (same image and caption)": 3,
                                  "unsupported pixel format I (32-bit integer)": 1}  # fmt: skip
    assert "s03.png: duplicate (same image and caption) of copy0.png" in data.skipped_examples  # sorted: copy0 first
    captions = {s.source: s.caption for s in data.train + data.holdout}
    assert captions["s05.png"] == "a caption saved with a byte order mark"
    sides = {s.source: s in data.holdout for s in data.train + data.holdout}
    assert sides["s04.png"] == sides["recaptioned.png"]  # one image: training or held out, not both
    grey = next(s for s in data.train + data.holdout if s.source == "wide16.png")
    pixels = pixel_tensor(grey, 32, True, False, __import__("random").Random(0))
    assert abs(float(pixels.mean())) < 0.01  # mid-grey, not clamped to white
    assert isinstance(grey, Sample)


def test_fewer_samples_than_workers_still_gives_every_worker_a_batch():
    for n, world in ((8, 17), (9, 32), (8, 20)):
        shares = [batch_indices(n, 2, world, rank, seed=0, micro=0)[1] for rank in range(world)]
        assert all(shares) and {i for share in shares for i in share} == set(range(n)), (n, world)


def test_an_interrupted_first_run_does_not_block_a_changed_rerun(tmp_path):
    from pipeline.train.report import REPORT_JSON
    from pipeline.train.runner import SPEC_KEY, check_resumable

    base = spec_data({"synthetic": {"count": 16}}, tmp_path / "o")
    first, changed = load_train_spec(None, base=base), load_train_spec(None, ["batch_size=2"], base=base)
    store = Storage(str(tmp_path / "o"))
    check_resumable(store, first)  # the first run wrote its settings, then was interrupted before a checkpoint
    check_resumable(store, changed)  # nothing to resume: the new settings start over
    assert json.loads(store.read(SPEC_KEY))["spec"]["batch_size"] == 2
    store.write_atomic(REPORT_JSON, b"{}")  # a run that got somewhere is never mixed with other settings
    with pytest.raises(SpecError, match="cannot be resumed"):
        check_resumable(store, first)


def test_unreadable_dataset_and_unwritable_output_are_one_line_errors(tiny_models, tmp_path):
    with pytest.raises(DatasetError, match=r"dataset.path: 'nosuchproto://bucket/x.parquet' cannot be read"):
        load_data(load_train_spec(None, base=spec_data({"path": "nosuchproto://bucket/x.parquet"}, tmp_path / "o")))
    (tmp_path / "a-file").write_text("x")
    spec = load_train_spec(None, base=spec_data({"synthetic": {"count": 16}}, tmp_path / "a-file" / "out"))
    with pytest.raises(SpecError, match=r"output: .*a-file/out' cannot be written"):
        train_lora(spec, quiet=True)


def test_a_learning_rate_in_scientific_notation_is_a_number(tmp_path):
    path = tmp_path / "train.yaml"
    data = spec_data({"synthetic": {"count": 16}}, tmp_path / "o")
    path.write_text(yaml.safe_dump(data).replace("learning_rate: 0.01", "learning_rate: 1e-4"))
    assert "learning_rate: 1e-4" in path.read_text()
    assert load_train_spec(str(path)).optimizer.learning_rate == 1e-4


def test_an_unreachable_ray_address_fails_in_seconds(monkeypatch):
    import time

    from pipeline.errors import GenpipeError
    from pipeline.executors.ray_data import check_reachable

    started = time.monotonic()
    with pytest.raises(GenpipeError, match=r"RAY_ADDRESS=127.0.0.1:1: cannot connect to the Ray head"):
        check_reachable("127.0.0.1:1")
    assert time.monotonic() - started < 10
    check_reachable("auto")  # Ray's own forms are left to Ray


@pytest.mark.ray
def test_workers_the_cluster_cannot_place_are_refused_before_anything_is_written(tiny_models, tmp_path):
    import ray

    try:
        cases = ((["resources.use_gpu=true"], "asks for 1 GPUs"),
                 (["resources.workers=3", "resources.cpus_per_worker=1"], "asks for 3 CPUs"))  # fmt: skip
        for overrides, says in cases:
            out = tmp_path / f"o{len(overrides)}"
            base = spec_data({"synthetic": {"count": 16}}, out, executor="ray")
            with pytest.raises(SpecError, match=rf"the Ray cluster cannot run this training: .*{says}"):
                train_lora(load_train_spec(None, overrides, base=base), quiet=True)
            assert not out.exists()
    finally:
        ray.shutdown()
