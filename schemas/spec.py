"""The job spec: one YAML file that says what to generate, how, where it goes and what it may use.

Every model here forbids unknown keys, so a typo fails validation naming the key path instead of being
silently ignored. Defaults run on a 2-core laptop with the tiny offline model.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.limits import LIMITS, SAMPLER_NAMES

JOB_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

#: The manifest columns a row may use to override the spec (see ``JobSpec.row_overrides``).
OverridableColumn = Literal[
    "negative_prompt", "seed", "num_images", "width", "height", "steps", "guidance_scale", "sampler", "lora"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSpec(_Strict):
    """One LoRA adapter applied on top of the base model."""

    path: str = Field(description="Local path or fsspec URL of the adapter (safetensors, diffusers LoRA format).")
    scale: float = Field(1.0, ge=0.0, le=4.0, description="Adapter strength; 0 is the base model.")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_]{1,64}$", description="Adapter name; default from path.")
    weight_name: str | None = Field(None, description="File inside a directory path (diffusers `weight_name`).")


class ModelSpec(_Strict):
    """The text-to-image model: any diffusers pipeline by HF id or local path, or the built-in tiny model."""

    id: str = Field(
        "tiny",
        min_length=1,
        description="HF model id, local directory, or `tiny` for the offline tiny pipeline built into the cache.",
    )
    revision: str | None = Field(None, description="Git revision / branch / tag of an HF model.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Weights dtype; half precision only makes sense on a GPU."
    )
    family: Literal["auto", "unet", "flow"] = Field(
        "auto",
        description="Denoiser family for sampler checks: `unet` (SD 1.x/2.x/SDXL, epsilon/v), `flow` (SD3, FLUX). "
        "`auto` reads the pipeline class from the model's model_index.json.",
    )
    lora: tuple[LoraSpec, ...] = Field((), description="LoRA adapters, applied with their scales.")


class SamplerSpec(_Strict):
    """The denoising sampler (a diffusers scheduler) and its step count and guidance."""

    name: str = Field("euler", description=f"One of: {', '.join(SAMPLER_NAMES)}.")
    steps: int = Field(20, ge=1, le=LIMITS.max_steps, description="Denoising steps.")
    guidance_scale: float = Field(
        7.5, ge=0.0, le=LIMITS.max_guidance, description="Classifier-free guidance; <= 1 disables it."
    )

    @field_validator("name")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        if v not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {v!r}; valid names: {', '.join(SAMPLER_NAMES)}")
        return v


class ImageSpec(_Strict):
    """Image defaults; manifest rows may override size and count."""

    width: int = Field(64, ge=LIMITS.min_size, le=LIMITS.max_size, multiple_of=8, description="Pixels.")
    height: int = Field(64, ge=LIMITS.min_size, le=LIMITS.max_size, multiple_of=8, description="Pixels.")
    images_per_prompt: int = Field(1, ge=1, le=LIMITS.max_images_per_prompt, description="Samples per row.")
    format: Literal["png", "jpeg", "webp"] = Field("png", description="Encoded format of the stored images.")
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality; ignored for PNG (lossless).")


class ClipSpec(_Strict):
    """The CLIP backbone used once per image by every scoring head."""

    architecture: str = Field("tiny", description="open_clip architecture name, or `tiny` for the offline model.")
    pretrained: str | None = Field(None, description="open_clip pretrained tag (e.g. `openai`) or checkpoint path.")


class ScoringSpec(_Strict):
    """Scoring after generation. The scoring stages arrive with the content-safety work; until then `enabled:
    false` is the only setting that runs."""

    enabled: bool = Field(False, description="Run the CLIP / NSFW / bias scoring stages.")
    clip: ClipSpec = Field(default_factory=ClipSpec, description="CLIP backbone.")


class PolicySpec(_Strict):
    """What the job does with failures."""

    max_failure_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="The job fails when more than this fraction of items fail."
    )
    max_retries: int = Field(2, ge=0, le=10, description="Retries of a batch after a transient error.")


class ResourcesSpec(_Strict):
    """How much of the cluster the job uses."""

    generator_actors: int = Field(1, ge=1, le=1024, description="Generator actors (one model copy each).")
    gpus_per_actor: float = Field(0.0, ge=0.0, le=8.0, description="GPUs per generator actor; 0 runs on CPU.")
    cpus_per_actor: float = Field(
        0.5, gt=0.0, le=256.0, description="CPUs per generator actor; fractional so read tasks are not starved."
    )
    batch_size: int = Field(4, ge=1, le=256, description="Images per generator call.")
    scorer_gpu_fraction: float = Field(0.25, ge=0.0, le=1.0, description="GPU share of each scorer actor.")
    batch_invariant: bool = Field(
        True,
        description="One pipeline call per image, so an image's pixels never depend on the batch it ran in "
        "(batched kernels round differently by batch shape). `false` batches `batch_size` images per call for "
        "throughput; pixels may then differ in the last bit with the batch.",
    )


class JobSpec(_Strict):
    """A generation job: manifest in, images + audit records out."""

    name: str = Field(description="Job name `[A-Za-z0-9._-]{1,64}`; a rerun with the same name resumes.")
    manifest: str = Field(min_length=1, description="fsspec URL or path of the Parquet manifest.")
    output: str = Field(min_length=1, description="fsspec URL or path; images go under `{output}/{name}/`.")
    database: str | None = Field(
        None, description="SQLAlchemy URL of the audit DB; default `sqlite:///{output}/genpipe.db` (local output)."
    )
    executor: Literal["ray", "local"] = Field(
        "ray", description="`ray`: Ray Data (local Ray, or the cluster in RAY_ADDRESS); `local`: one process."
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="Text-to-image model.")
    sampler: SamplerSpec = Field(default_factory=SamplerSpec, description="Sampler, steps and guidance.")
    image: ImageSpec = Field(default_factory=ImageSpec, description="Image size, count and format.")
    scoring: ScoringSpec = Field(default_factory=ScoringSpec, description="Scoring stages.")
    policy: PolicySpec = Field(default_factory=PolicySpec, description="Failure handling.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Actors, GPUs, batch size.")
    row_overrides: tuple[OverridableColumn, ...] = Field(
        ("negative_prompt", "seed", "num_images", "width", "height", "steps", "guidance_scale", "sampler", "lora"),
        description="Manifest columns allowed to override the spec per row; a row using another is rejected.",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not JOB_NAME_RE.match(v) or v in {".", ".."}:
            raise ValueError("must be 1-64 characters of [A-Za-z0-9._-] and not '.' or '..'")
        return v

    @model_validator(mode="after")
    def _scoring_available(self) -> JobSpec:
        if self.scoring.enabled:
            raise ValueError("scoring.enabled: the scoring stages are not part of this build; set it to false")
        return self

    def database_url(self) -> str:
        """The audit DB URL, defaulting to a SQLite file next to the output (local outputs only)."""
        if self.database:
            return self.database
        from pipeline.storage import local_path

        root = local_path(self.output)
        if root is None:
            raise ValueError("database: required when output is not a local path")
        return f"sqlite:///{root}/genpipe.db"
