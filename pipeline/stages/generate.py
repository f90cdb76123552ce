"""DiffusersGenerator: turns pending items into pixels with a diffusers pipeline, one per-image seeded generator each.

Items sharing generation parameters (``Item.param_key``) share a sampler and LoRA set-up; the scheduler is swapped
by name with ``from_config`` and LoRA adapters are switched with ``set_adapters`` rather than reloading anything.

Pixels are a pure function of the item: by default (``batch_invariant=True``) every image is its own pipeline
call, because batched GEMMs and convolutions round differently for different batch shapes (on CPU: MKL takes
another path below 4 rows, oneDNN convolutions depend on batch and thread count; on GPU: cuBLAS/cuDNN pick
kernels by shape). ``batch_invariant=False`` batches up to ``batch_size`` images per call for throughput, and an
image may then differ in the last bit of some pixels with the batch it ran in.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Iterator
from typing import Any

from pipeline.models.diffusers_loader import load_lora, load_pipeline
from pipeline.samplers import make_scheduler
from pipeline.stages.base import Resources, Stage
from schemas.record import Item
from schemas.spec import ModelSpec


class DiffusersGenerator(Stage):
    """Generates ``item.pixels`` (uint8 HxWx3) for pending items; the writer marks them generated."""

    name = "generate"

    def __init__(
        self, model: ModelSpec, batch_size: int, resources: Resources, *, batch_invariant: bool = True
    ) -> None:
        """Cheap and picklable: nothing loads until ``setup()`` on the worker. ``batch_invariant=False`` batches
        ``batch_size`` images per pipeline call (faster; pixels may then vary in the last bit with the batch)."""
        self.model = model
        self.batch_size = batch_size
        self.resources = resources
        self.batch_invariant = batch_invariant
        self._pipe: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # Ship the recipe, never the loaded weights: each worker loads its own copy in setup().
        keep = ("model", "batch_size", "resources", "batch_invariant")
        return {**{k: self.__dict__[k] for k in keep}, "_pipe": None}

    # --- set-up on the worker -------------------------------------------------------------------------------
    def setup(self) -> None:
        if self._pipe is not None:
            return
        import torch

        use_cuda = torch.cuda.is_available() and self.resources.num_gpus > 0
        self.device = "cuda" if use_cuda else "cpu"
        if not use_cuda:
            self._configure_cpu(torch)
        self._pipe = load_pipeline(self.model, self.device)
        self._base_scheduler_config = self._pipe.scheduler.config
        self._schedulers: dict[str, Any] = {}
        self._call_params = set(inspect.signature(self._pipe.__call__).parameters)
        # SDXL-style pipelines treat "no negative prompt" (zeros) unlike an empty one (encoded "").
        self._zeroes_empty_negative = bool(getattr(self._pipe.config, "force_zeros_for_empty_prompt", False))
        self._active_lora: str | None = "[]"  # load_pipeline leaves adapters disabled

    def _configure_cpu(self, torch) -> None:
        # As many threads as the stage's declared (possibly fractional) CPUs, at least one, in every executor: on a
        # shared or oversubscribed machine more OpenMP threads than cores spin and run several times slower.
        torch.set_num_threads(max(1, int(self.resources.num_cpus)))
        if self.batch_invariant:
            # oneDNN convolutions round differently with the thread count and batch shape; the native ones do
            # not, so an image is the same whatever actor (or laptop) produced it. Process-wide, on purpose.
            torch.backends.mkldnn.enabled = False

    # --- the batch method -----------------------------------------------------------------------------------
    def process(self, items: list[Item]) -> list[Item]:
        if self._pipe is None:
            self.setup()
        groups: dict[tuple, list[Item]] = {}
        for item in items:
            if item.status != "pending":
                continue
            problem = self._item_problem(item)
            if problem is not None:
                item.fail(ValueError(problem), self.name)
                continue
            key = item.param_key()  # its last element: whether the item has a negative prompt (see _generate)
            groups.setdefault(key if self._zeroes_empty_negative else key[:-1], []).append(item)
        for group in groups.values():
            try:
                self._prepare(group[0])
            except Exception as exc:  # a bad sampler or adapter fails its group; other groups go on
                for item in group:
                    item.fail(exc, self.name)
                continue
            for call in self._calls(group):
                self._generate(call)
        return items

    def _item_problem(self, item: Item) -> str | None:
        if item.model != self.model.id or (item.model_revision or None) != self.model.revision:
            return (
                f"item model {item.model!r} (revision {item.model_revision!r}) is not this generator's model "
                f"{self.model.id!r} (revision {self.model.revision!r})"
            )
        if item.seed is None:
            return "item has no seed; seeds are assigned when the manifest is planned"
        if item.negative_prompt and "negative_prompt" not in self._call_params:
            return f"{type(self._pipe).__name__} takes no negative prompt"
        return None

    def _calls(self, group: list[Item]) -> Iterator[list[Item]]:
        size = 1 if self.batch_invariant else self.batch_size
        for start in range(0, len(group), size):
            yield group[start : start + size]

    def _prepare(self, first: Item) -> None:
        """Sampler and LoRA adapters for a group (every item in it has the same ones)."""
        if first.sampler not in self._schedulers:
            self._schedulers[first.sampler] = make_scheduler(first.sampler, self._base_scheduler_config)
        self._pipe.scheduler = self._schedulers[first.sampler]
        self._set_lora(first.lora)

    def _set_lora(self, loras: list[dict[str, Any]]) -> None:
        key = json.dumps(loras, sort_keys=True)
        if key == self._active_lora:
            return
        self._active_lora = None  # unknown until the switch below completes
        if loras:
            names = [load_lora(self._pipe, lora) for lora in loras]
            self._pipe.enable_lora()
            self._pipe.set_adapters(names, adapter_weights=[float(lora.get("scale", 1.0)) for lora in loras])
        elif hasattr(self._pipe, "disable_lora") and any(self._pipe.get_list_adapters().values()):
            self._pipe.disable_lora()
        self._active_lora = key

    def _generate(self, items: list[Item]) -> None:
        import numpy as np
        import torch

        first = items[0]
        kwargs: dict[str, Any] = {
            "prompt": [it.prompt for it in items],
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance_scale,
            "width": first.width,
            "height": first.height,
            # CPU generators: the initial noise is the same whichever device the model runs on.
            "generator": [torch.Generator(device="cpu").manual_seed(int(it.seed)) for it in items],
            "output_type": "np",
        }
        if "negative_prompt" in self._call_params and any(it.negative_prompt for it in items):
            # None (no argument) is what a diffusers user passes for no negative prompt, and it is not always [""]:
            # SDXL zeroes the unconditional embedding for None. There, a call's items all have one or none do (see
            # process); elsewhere "" means the same as None, so items with and without one share a call.
            kwargs["negative_prompt"] = [it.negative_prompt or "" for it in items]
        start = time.perf_counter()
        try:
            images = self._pipe(**kwargs).images
        except Exception as exc:  # recorded on the items; other calls go on
            if self.device == "cuda":
                torch.cuda.empty_cache()  # after an OOM the next call should start from a clean cache
            for item in items:
                item.fail(exc, self.name)
            return
        per_image = (time.perf_counter() - start) / len(items)
        pixels = (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)
        for item, img in zip(items, pixels, strict=True):
            if img.shape[:2] != (item.height, item.width):  # a pipeline that rounds sizes; never record a wrong one
                item.fail(ValueError(f"the pipeline made {img.shape[1]}x{img.shape[0]} pixels, not the "
                                     f"{item.width}x{item.height} asked for"), self.name)  # fmt: skip
                continue
            item.pixels = img
            item.timings["generate_s"] = round(per_image, 6)
