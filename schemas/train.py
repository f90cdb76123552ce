"""The training spec: one YAML file that says which base model to adapt with LoRA, on which captioned images, how,
and where the adapter goes (``genpipe train-lora SPEC``).

Like the job spec, every model here forbids unknown keys, so a typo fails validation naming the key path, and
takes values as YAML typed them (`steps: true` is an error, not 1).
Defaults train the tiny offline model on CPU; a real run names an SD 1.x/2.x model and a GPU per worker.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from schemas.limits import LIMITS, SAMPLER_NAMES
from schemas.spec import JOB_NAME_RE, ClipSpec, Items, SamplerName, _Strict

#: Fewer usable training samples than this (after skipping unreadable images / empty captions and holding out
#: the evaluation samples) is an error: a LoRA fitted to a handful of images only memorises them.
MIN_TRAIN_SAMPLES = 8
#: peft LoRA on the attention projections of SD-style denoisers (q, k, v and the output projection).
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=LIMITS.max_prompt_chars)]
#: diffusers' ``get_scheduler`` names.
LrSchedulerName = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


class BaseModelSpec(_Strict):
    """The pretrained text-to-image model the adapter is trained for (its denoiser gets the LoRA layers)."""

    id: str = Field(
        "tiny", min_length=1, description="HF model id, local diffusers directory, or `tiny` (the offline model)."
    )
    revision: str | None = Field(None, description="Git revision / branch / tag of an HF model.")


class SyntheticSpec(_Strict):
    """A dataset genpipe draws itself: coloured shapes on plain backgrounds with matching captions."""

    kind: Literal["shapes"] = Field("shapes", description="Only `shapes` so far (pipeline/train/synthetic.py).")
    count: int = Field(64, ge=1, le=100_000, description="Images (and captions) to draw.")
    size: int = Field(64, ge=16, le=1024, description="Side of the square images in pixels.")
    seed: int = Field(0, ge=0, description="Which shapes, colours and positions are drawn.")


class DatasetSpec(_Strict):
    """Captioned training images: a Parquet, a folder of images with `.txt` captions, or a synthetic set."""

    path: str | None = Field(
        None,
        description="fsspec URL or path of a Parquet file (or a directory of `*.parquet`), or of a folder of "
        "images with same-stem `.txt` captions (searched recursively).",
    )
    format: Literal["auto", "parquet", "folder"] = Field(
        "auto", description="`auto`: Parquet when `path` ends in `.parquet` or holds `*.parquet` files, else folder."
    )
    image_column: str = Field(
        "image",
        description="Parquet column with the image: encoded bytes, a URI (relative ones resolve against the "
        "Parquet's directory), or a struct with `bytes` / `path` (the Hugging Face datasets Image feature).",
    )
    caption_column: str = Field("caption", description="Parquet column with the caption text.")
    synthetic: SyntheticSpec | None = Field(None, description="Draw the dataset instead of reading `path`.")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("give exactly one of `path` and `synthetic`")
        return self


class LoraTrainSpec(_Strict):
    """The low-rank adapter added to the denoiser's layers (peft ``LoraConfig``)."""

    rank: int = Field(4, ge=1, le=512, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, le=4096, description="LoRA alpha; the update is scaled by alpha / r. "
                                "Default: the rank (scale 1).")  # fmt: skip
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch input.")
    target_modules: Items[str] = Field(
        DEFAULT_TARGET_MODULES,
        min_length=1,
        description="Layer names inside the denoiser's attention blocks; an unknown name fails before training, "
        "listing the valid ones.",
    )


class OptimizerSpec(_Strict):
    """AdamW on the LoRA parameters, with a diffusers learning-rate schedule."""

    learning_rate: float = Field(1e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    lr_scheduler: LrSchedulerName = Field("constant", description="diffusers `get_scheduler` name.")
    lr_warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warm-up.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    weight_decay: float = Field(1e-2, ge=0.0, le=1.0, description="AdamW decoupled weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0.0, le=1.0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Clip the gradient norm to this; null: no clipping.")


class TrainResourcesSpec(_Strict):
    """Where training runs. On Ray, one Ray Train worker per GPU, data-parallel (DDP)."""

    workers: int = Field(1, ge=1, le=1024, description="Ray Train workers (one per GPU); the local executor uses 1.")
    use_gpu: bool = Field(False, description="One GPU per worker (and CUDA in the local executor when present).")
    cpus_per_worker: float = Field(1.0, gt=0.0, le=256.0, description="CPUs per worker; also its torch threads.")
    storage_path: str | None = Field(
        None, description="Ray Train's own run directory (default ~/ray_results); checkpoints go under `output`."
    )
    max_failures: int = Field(
        0, ge=0, le=100, description="Ray Train restarts of the worker group after a worker dies; each restart "
        "resumes from the newest checkpoint."
    )  # fmt: skip


class EvaluationSpec(_Strict):
    """After training: generate from held-out captions with and without the adapter, compare losses and CLIP."""

    enabled: bool = Field(True, description="Run the evaluation and write report.md / report.json.")
    holdout: int = Field(
        4, ge=0, le=1000, description="Samples held out of training: their captions prompt the comparison and "
        "their images give the validation loss."
    )  # fmt: skip
    prompts: Items[Prompt] = Field((), description="Extra prompts generated with and without the adapter.")
    sampler: SamplerName = Field("euler", description=f"One of: {', '.join(SAMPLER_NAMES)}.")
    steps: int = Field(20, ge=1, le=LIMITS.max_steps, description="Denoising steps per evaluation image.")
    guidance_scale: float = Field(7.5, ge=0.0, le=LIMITS.max_guidance, description="Classifier-free guidance.")
    lora_scale: float = Field(1.0, ge=0.0, le=4.0, description="Adapter strength in the comparison.")
    seed: int = Field(0, ge=0, le=LIMITS.max_seed, description="Seed of prompt i is seed + i, with and without.")
    clip: ClipSpec | None = Field(
        default_factory=ClipSpec, description="CLIP backbone for alignment scores (needs pipeline.scoring); null: off."
    )


class TrainSpec(_Strict):
    """A LoRA training run: base model + captioned images in, adapter + loss curve + report out."""

    name: str = Field("lora", description="Run name `[A-Za-z0-9._-]{1,64}` (recorded in the report).")
    model: BaseModelSpec = Field(default_factory=BaseModelSpec, description="Base model to adapt.")
    dataset: DatasetSpec = Field(description="Captioned training images.")
    output: str = Field(
        min_length=1, description="fsspec URL or path; the adapter is `{output}/pytorch_lora_weights.safetensors` "
        "and a rerun with the same output resumes from its latest checkpoint."
    )  # fmt: skip
    resolution: int = Field(
        512, ge=LIMITS.min_size, le=LIMITS.max_size, multiple_of=8, description="Training images are this square."
    )
    center_crop: bool = Field(True, description="Crop the centre after resizing the short side (else a random crop).")
    random_flip: bool = Field(False, description="Flip half of the images horizontally (not for text or logos).")
    lora: LoraTrainSpec = Field(default_factory=LoraTrainSpec, description="Adapter shape.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="AdamW and learning-rate schedule.")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="Optimizer steps; or give `epochs`.")
    epochs: int | None = Field(None, ge=1, le=100_000, description="Passes over the training samples.")
    batch_size: int = Field(4, ge=1, le=1024, description="Samples per worker per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Forward passes per optimizer step.")
    seed: int = Field(0, ge=0, le=LIMITS.max_seed, description="Seeds LoRA init, data order, noise and timesteps.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Frozen weights in half precision and autocast; LoRA weights stay float32. fp16 needs CUDA."
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="What the denoiser predicts; default: the model's noise scheduler config."
    )
    checkpoint_every: int = Field(500, ge=1, description="Save a resumable checkpoint every this many steps.")
    checkpoints_keep: int = Field(2, ge=1, le=1000, description="Keep the newest this many checkpoints.")
    executor: Literal["ray", "local"] = Field(
        "ray", description="`ray`: Ray Train TorchTrainer (local Ray, or the cluster in RAY_ADDRESS); `local`: "
        "one process."
    )  # fmt: skip
    resources: TrainResourcesSpec = Field(default_factory=TrainResourcesSpec, description="Workers, GPUs, CPUs.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="The end-of-run comparison.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not JOB_NAME_RE.fullmatch(v) or v in {".", ".."}:
            raise ValueError("must be 1-64 characters of [A-Za-z0-9._-] and not '.' or '..'")
        return v

    @model_validator(mode="after")
    def _length(self) -> TrainSpec:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of `max_steps` and `epochs`")
        if self.executor == "local" and self.resources.workers != 1:
            raise ValueError("resources.workers: the local executor runs one worker; use executor `ray` for more")
        return self

    @property
    def holdout(self) -> int:
        """Samples kept out of training for the evaluation (none when it is off)."""
        return self.evaluation.holdout if self.evaluation.enabled else 0

    @property
    def lora_alpha(self) -> float:
        return self.lora.alpha if self.lora.alpha is not None else float(self.lora.rank)

    def weights_fingerprint(self) -> dict:
        """The settings that shape the trained weights other than their number of steps: a rerun that changes
        one of them cannot resume the previous run's checkpoints."""
        keep = {"model", "dataset", "resolution", "center_crop", "random_flip", "lora", "optimizer", "batch_size",
                "gradient_accumulation_steps", "seed", "mixed_precision", "prediction_type"}  # fmt: skip
        data = self.model_dump(mode="json", include=keep)
        data["workers"] = self.resources.workers  # the global batch and each worker's data shard depend on it
        data["holdout"] = self.holdout  # which samples train
        return data
