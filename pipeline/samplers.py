"""The sampler table: a sampler name → a diffusers scheduler class, its extra settings and the model families it fits.

Schedulers are swapped the diffusers way, ``Cls.from_config(pipe.scheduler.config, **extra)``, so the model's own
training settings (betas, prediction type, timestep spacing, flow shift) carry over and only the sampling algorithm
changes. The algorithm is the sampler name's alone: the keys in ``ALGORITHM_KEYS`` are set to the class's defaults
before ``extra`` is applied, so a model shipped with DPM++ 2M Karras still samples ``dpmpp_2m`` without Karras
sigmas, and ``euler`` never inherits them.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from schemas.limits import SAMPLER_NAMES

Family = Literal["unet", "flow"]
UNET: tuple[Family, ...] = ("unet",)
FLOW: tuple[Family, ...] = ("flow",)


@dataclass(frozen=True)
class Sampler:
    scheduler: str
    """Class name in ``diffusers``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Config overrides applied on top of the model's scheduler config."""
    families: tuple[Family, ...] = UNET
    """``unet``: noise/v-prediction models (SD 1.x/2.x/SDXL); ``flow``: flow-matching models (SD3, FLUX)."""


SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler("DDIMScheduler"),
    "ddpm": Sampler("DDPMScheduler"),
    "pndm": Sampler("PNDMScheduler"),
    "euler": Sampler("EulerDiscreteScheduler"),
    "euler_ancestral": Sampler("EulerAncestralDiscreteScheduler"),
    "heun": Sampler("HeunDiscreteScheduler"),
    "lms": Sampler("LMSDiscreteScheduler"),
    "dpmpp_2m": Sampler("DPMSolverMultistepScheduler"),
    "dpmpp_2m_karras": Sampler("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": Sampler("UniPCMultistepScheduler"),
    "lcm": Sampler("LCMScheduler"),
    "flow_match_euler": Sampler("FlowMatchEulerDiscreteScheduler", families=FLOW),
}

# Pipeline class names (model_index.json `_class_name`) by family. Checked in order, flow first, because
# "StableDiffusion3Pipeline" also starts with "StableDiffusion".
_FLOW_MARKERS = (
    "Flux",
    "StableDiffusion3",
    "SD3",
    "Sana",
    "AuraFlow",
    "Lumina",
    "CogView4",
    "HiDream",
    "QwenImage",
    "Chroma",
    "Bria",
)
_UNET_MARKERS = ("StableDiffusion", "Kandinsky", "PixArt", "LatentConsistency", "Kolors", "HunyuanDiT", "IF")


def samplers_for(family: Family) -> list[str]:
    return [name for name, s in SAMPLERS.items() if family in s.families]


def check_sampler(name: str, family: Family | None) -> None:
    """Raise ValueError when ``name`` is not a sampler, or does not fit models of ``family`` (None: unknown, any)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLER_NAMES)}")
    if family is not None and family not in SAMPLERS[name].families:
        raise ValueError(
            f"sampler {name!r} does not fit {family!r} models; valid for {family}: {', '.join(samplers_for(family))}"
        )


#: Scheduler settings that choose the sampling algorithm rather than describe the model's training.
ALGORITHM_KEYS = (
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "algorithm_type",
    "solver_order", "solver_type", "lower_order_final", "euler_at_final", "final_sigmas_type", "interpolation_type",
    "predict_x0", "disable_corrector", "stochastic_sampling",
)  # fmt: skip


@functools.cache
def _algorithm_defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {
        k: params[k].default for k in ALGORITHM_KEYS if k in params and params[k].default is not inspect.Parameter.empty
    }


def make_scheduler(name: str, base_config: Any):
    """A new scheduler for sampler ``name`` built from a model's scheduler config (``pipe.scheduler.config``)."""
    import diffusers

    check_sampler(name, None)
    sampler = SAMPLERS[name]
    cls = getattr(diffusers, sampler.scheduler)
    return cls.from_config(base_config, **{**_algorithm_defaults(cls), **sampler.extra})


#: Pipelines that pack 2×2 latent patches, so pixel sizes must be multiples of twice the VAE's scale factor.
_PACKED_LATENTS = ("Flux", "StableDiffusion3")
#: Pipelines that take a negative prompt but use it only with "true CFG" (``true_cfg_scale > 1``), which genpipe
#: does not run: the negative prompt would be ignored.
_NEGATIVE_NEEDS_TRUE_CFG = ("Flux",)


@dataclass(frozen=True)
class ModelTraits:
    """What a model allows a manifest row, read from its ``model_index.json`` and VAE config."""

    family: Family | None = None
    pipeline: str = ""
    """The pipeline class name; empty when unknown."""
    size_multiple: int = 8
    """Width and height must be multiples of this (the pipeline would round them down, silently)."""

    def row_problems(self, sampler: str, width: int, height: int, negative_prompt: str | None) -> list[str]:
        """A planned item's problems with this model, as ``field: reason`` lines."""
        problems = []
        if self.family is not None:
            try:
                check_sampler(sampler, self.family)
            except ValueError as exc:
                problems.append(f"sampler: {exc}")
        for name, value in (("width", width), ("height", height)):
            m = self.size_multiple
            if value % m:
                made = value // m * m
                problems.append(f"{name}: {value} is not a multiple of {m}, which {self.pipeline or 'the model'} "
                                f"needs (it would make {made} pixels)")  # fmt: skip
        if negative_prompt and self.pipeline.startswith(_NEGATIVE_NEEDS_TRUE_CFG):
            problems.append(f"negative_prompt: {self.pipeline} ignores it (it needs true CFG, which genpipe does not "
                            "run); leave it empty")  # fmt: skip
        return problems


def model_traits(model_path_or_id: str | Path, family: Family | None) -> ModelTraits:
    """The traits of a local model directory or a cached HF id (never downloads); ``family`` as resolved."""
    index = _model_index(model_path_or_id) or {}
    pipeline = str(index.get("_class_name", ""))
    multiple = 8
    vae = _model_json(model_path_or_id, "vae/config.json")
    channels = vae.get("block_out_channels") if vae else None
    if isinstance(channels, list) and channels:
        multiple = 2 ** (len(channels) - 1)
        if pipeline.startswith(_PACKED_LATENTS):
            multiple *= 2
    return ModelTraits(family=family, pipeline=pipeline, size_multiple=multiple)


def model_family(model_path_or_id: str | Path) -> Family | None:
    """``unet`` or ``flow`` from the pipeline class in the model's ``model_index.json``; None when unknown.

    Reads a local directory, or an HF id's ``model_index.json`` when it is already in the local HF cache
    (never downloads)."""
    index = _model_index(model_path_or_id)
    if index is None:
        return None
    class_name = str(index.get("_class_name", ""))
    if class_name.startswith(_FLOW_MARKERS):
        return "flow"
    if class_name.startswith(_UNET_MARKERS):
        return "unet"
    # An unfamiliar pipeline class still says what it is through its scheduler.
    scheduler = index.get("scheduler")
    scheduler_class = scheduler[1] if isinstance(scheduler, list) and len(scheduler) == 2 else None
    if not scheduler_class:
        return None
    if scheduler_class.startswith("FlowMatch"):
        return "flow"
    if scheduler_class in {s.scheduler for s in SAMPLERS.values() if "unet" in s.families}:
        return "unet"
    return None


def _model_index(model_path_or_id: str | Path) -> dict[str, Any] | None:
    return _model_json(model_path_or_id, "model_index.json")


def _model_json(model_path_or_id: str | Path, filename: str) -> dict[str, Any] | None:
    """A JSON file of a local model directory, or of an HF id already in the local HF cache (never downloads)."""
    path = Path(model_path_or_id).expanduser()
    if path.is_dir():
        json_file = path / filename
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(model_path_or_id), filename)
        except Exception:  # not a valid repo id: nothing to find
            return None
        if not isinstance(cached, str):
            return None
        json_file = Path(cached)
    try:
        data = json.loads(json_file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
