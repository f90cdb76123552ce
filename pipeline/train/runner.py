"""Running a LoRA training: load the spec → check (model, target modules, dataset) → train locally or on Ray Train →
summary. ``train_lora`` is the one entry point behind ``genpipe train-lora`` and ``python -m jobs.train_lora``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from pipeline.config import apply_overrides, format_errors, load_spec_data
from pipeline.errors import SpecError
from pipeline.models.diffusers_loader import ModelError
from pipeline.storage import Storage, StorageError
from pipeline.train.checkpoint import checkpoint_steps
from pipeline.train.data import load_data
from pipeline.train.loop import WorkerContext, WorkerJob, total_steps, train_worker
from pipeline.train.model import ADAPTER_FILE as ADAPTER_KEY
from pipeline.train.report import REPORT_JSON
from schemas.train import TrainSpec

#: The spec snapshot a rerun compares itself with before resuming.
SPEC_KEY = "train_spec.json"


def load_train_spec(path: str | None, overrides: list[str] = (), base: dict[str, Any] | None = None) -> TrainSpec:
    """Read, override and validate a training spec; ``SpecError`` carrying every problem with its key path."""
    data = copy.deepcopy(base or {})  # overrides edit nested mappings in place
    if path is not None:
        data.update(load_spec_data(path))
    data = apply_overrides(data, list(overrides))
    try:
        return TrainSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"training spec {path or '(embedded)'} is invalid", problems=format_errors(err)) from None


@dataclass
class TrainSummary:
    name: str
    output: str
    report: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def render(self) -> str:
        r = self.report
        loss, samples = r.get("loss", {}), r.get("samples", {})
        skipped = sum(samples.get("skipped", {}).values())
        lines = [
            f"train-lora {self.name}: {r.get('steps', 0)} steps"
            + (f" (resumed from {r['resumed_from_step']})" if r.get("resumed_from_step") else "")
            + f" in {self.elapsed_s:.1f} s",
            f"  samples: {samples.get('train', 0)} trained, {samples.get('holdout', 0)} held out, {skipped} skipped",
        ]
        if loss:
            lines.append(f"  loss: first {loss['window']} steps {loss['first_mean']:.4f} → last {loss['window']} "
                         f"{loss['last_mean']:.4f}")  # fmt: skip
        ev = r.get("evaluation") or {}
        if ev.get("validation_loss"):
            vl = ev["validation_loss"]
            lines.append(f"  validation loss: {vl['base']:.4f} without the adapter, {vl['lora']:.4f} with it")
        clip = ev.get("clip") or {}
        if "base" in clip:
            lines.append(f"  CLIPScore: {clip['base']['clipscore']:.4f} without, {clip['lora']['clipscore']:.4f} with")
        elif clip:
            lines.append(f"  CLIP alignment skipped: {clip['skipped']}")
        lines.append(f"  adapter: {r.get('adapter')}")
        lines.append(f"  report: {self.output.rstrip('/')}/report.md")
        return "\n".join(lines)


def absolute_paths(spec: TrainSpec) -> TrainSpec:
    """Local paths made absolute against the directory genpipe runs in: Ray Train workers run elsewhere."""
    from pipeline.storage import local_path

    def fix(url: str | None) -> str | None:
        return url if url is None or local_path(url) is None else local_path(url)

    dataset = spec.dataset.model_copy(update={"path": fix(spec.dataset.path)})
    resources = spec.resources.model_copy(update={"storage_path": fix(spec.resources.storage_path)})
    return spec.model_copy(update={"output": fix(spec.output), "dataset": dataset, "resources": resources})


def check_train_spec(spec: TrainSpec) -> str:
    """Everything that can be checked before a worker starts; returns the model path to load."""
    from pipeline.samplers import check_sampler
    from pipeline.train.model import check_base_model

    try:
        resolved = check_base_model(spec)
    except ModelError as exc:
        key = "lora.target_modules" if str(exc).startswith("lora.target_modules") else "model.id"
        raise SpecError(f"{key}: {str(exc).removeprefix('lora.target_modules: ')}") from None
    try:
        check_sampler(spec.evaluation.sampler, "unet")
    except ValueError as exc:
        raise SpecError(f"evaluation.sampler: {exc}") from None
    if spec.mixed_precision == "fp16" and not spec.resources.use_gpu:
        raise SpecError("mixed_precision: fp16 needs a GPU (resources.use_gpu: true); use bf16 or no on CPU")
    if spec.executor == "ray" and spec.output.startswith("memory://"):
        raise SpecError("output: memory:// lives in one process; use executor: local, a path or an object store")
    needs = {"matplotlib": "matplotlib", **({"ray.train": "'ray[train]'"} if spec.executor == "ray" else {})}
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:  # found out now, not after hours of training
        raise SpecError(f"train-lora needs {', '.join(missing)}: pip install {' '.join(needs[m] for m in missing)}")
    return resolved


def open_output(spec: TrainSpec) -> Storage:
    """The output location, checked writable now (a file in the way, no permission) with a ``SpecError``."""
    try:
        store = Storage(spec.output)
        store.write_atomic(".genpipe-write-check", b"")
        store.delete(".genpipe-write-check")
    except (OSError, ValueError, StorageError) as exc:
        raise SpecError(f"output: {spec.output!r} cannot be written: {type(exc).__name__}: {exc}") from None
    return store


def _has_results(store: Storage) -> bool:
    return bool(checkpoint_steps(store)) or store.exists(REPORT_JSON) or store.exists(ADAPTER_KEY)


def check_resumable(store: Storage, spec: TrainSpec) -> None:
    """A rerun may continue (or extend) the run in its output, never silently mix in different settings. An
    output whose run left nothing yet (interrupted before its first checkpoint) starts over with the new ones."""
    new = spec.weights_fingerprint()
    if store.exists(SPEC_KEY) and _has_results(store):
        old = json.loads(store.read(SPEC_KEY)).get("fingerprint", {})
        changed = sorted(k for k in set(_flat(old)) | set(_flat(new)) if _flat(old).get(k) != _flat(new).get(k))
        if changed:
            raise SpecError(
                f"output {spec.output!r} holds a training run with other settings, so it cannot be resumed; use "
                "another output, or delete that one to start over",
                problems=[f"{k}: {_flat(old).get(k)!r} there, {_flat(new).get(k)!r} now" for k in changed],
            )
    store.write_atomic(SPEC_KEY, json.dumps({"fingerprint": new, "spec": spec.model_dump(mode="json")},
                                            indent=1).encode())  # fmt: skip


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def train_lora(spec: TrainSpec, quiet: bool = False) -> TrainSummary:
    """Check, train (resuming from the output's newest checkpoint), evaluate; the summary of the report."""
    start = time.monotonic()
    spec = absolute_paths(spec)
    # 1. Fail fast: model, target modules, settings, then the dataset (read once, on the driver).
    model_path = check_train_spec(spec)
    data = load_data(spec)
    if spec.executor == "ray":
        from pipeline.train.distributed import connect

        connect(spec)  # Ray reachable and able to place the workers, before anything is written
    store = open_output(spec)
    check_resumable(store, spec)
    workers = spec.resources.workers if spec.executor == "ray" else 1
    total, done = total_steps(spec, len(data.train), workers), checkpoint_steps(store)
    if done and done[-1] > total:
        raise SpecError(f"output {spec.output!r} has a checkpoint at step {done[-1]}, past the {total} steps asked "
                        "for; raise max_steps / epochs, or use another output")  # fmt: skip
    job = WorkerJob(spec=spec, model_path=model_path, data=data, quiet=quiet)
    # 2. Train: one process, or Ray Train workers.
    if spec.executor == "local":
        import torch

        device = "cuda" if spec.resources.use_gpu and torch.cuda.is_available() else "cpu"
        train_worker(job, WorkerContext(device=device))
    else:
        from pipeline.train.distributed import run_on_ray

        run_on_ray(job)
    # 3. The report rank 0 wrote.
    report = json.loads(store.read(REPORT_JSON))
    return TrainSummary(spec.name, spec.output, report, time.monotonic() - start)
