"""The model side of LoRA training: check the base model before launch, load its parts for training, add peft LoRA
layers to the denoiser, and save the adapter in the diffusers LoRA format (what ``load_lora_weights`` reads).

Supported base models: Stable Diffusion 1.x/2.x-style pipelines (``StableDiffusionPipeline``: a UNet denoiser,
one CLIP text encoder, a VAE, a DDPM-family noise schedule with epsilon or v prediction). Other pipelines fail
the check naming what is supported.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

from pipeline.models.diffusers_loader import ModelError, check_model, quiet_loading
from schemas.spec import ModelSpec
from schemas.train import TrainSpec

#: The file ``save_adapter`` writes and ``load_lora_weights`` looks for in a directory.
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)


@dataclass
class TrainParts:
    """What the loop needs: frozen text encoder and VAE, the LoRA-carrying UNet, the noise scheduler."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    lora_config: Any
    weight_dtype: Any
    prediction_type: str


def base_model_spec(spec: TrainSpec) -> ModelSpec:
    return ModelSpec(id=spec.model.id, revision=spec.model.revision)


def check_base_model(spec: TrainSpec) -> str:
    """Fail fast (``ModelError``) on a missing, pickle-only or unsupported base model or unknown target modules;
    returns the path or HF id to load."""
    resolved = check_model(base_model_spec(spec))  # exists, diffusers layout, safetensors only
    index = _load_config(resolved, spec.model.revision, None)
    cls = index.get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        raise ModelError(
            f"{spec.model.id!r} is a {cls}; LoRA training supports {', '.join(SUPPORTED_PIPELINES)} "
            "(Stable Diffusion 1.x/2.x: UNet denoiser, one CLIP text encoder)"
        )
    valid = target_module_names(resolved, spec.model.revision)
    unknown = [t for t in spec.lora.target_modules if t not in valid]
    if unknown:
        raise ModelError(
            f"lora.target_modules: {', '.join(map(repr, unknown))} not in the denoiser's attention blocks; "
            f"valid names: {', '.join(valid)}"
        )
    return resolved


def _load_config(path: str, revision: str | None, subfolder: str | None) -> dict:
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    try:
        if subfolder is None:
            return dict(DiffusionPipeline.load_config(path, revision=revision))
        return dict(UNet2DConditionModel.load_config(path, subfolder=subfolder, revision=revision))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path!r}: cannot read its {subfolder or 'pipeline'} config: {exc}") from None


def target_module_names(path: str, revision: str | None) -> list[str]:
    """Names of the linear layers inside the UNet's attention blocks, relative to the block (``to_q``,
    ``to_out.0``, ...): the names ``lora.target_modules`` may use. Built on the meta device, no weights read."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = _load_config(path, revision, "unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    names: set[str] = set()
    for module in unet.modules():
        if hasattr(module, "to_q") and hasattr(module, "to_out"):  # an attention block
            names.update(n for n, m in module.named_modules() if n and isinstance(m, torch.nn.Linear))
    return sorted(names)


def load_parts(path: str, spec: TrainSpec, device: str) -> TrainParts:
    """Load tokenizer, text encoder, VAE, UNet and noise scheduler; freeze them; add LoRA to the UNet (initialised
    from ``spec.seed``, so every worker starts from the same adapter). Frozen weights go to the mixed-precision
    dtype, LoRA weights stay float32."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig

    kwargs = {"revision": spec.model.revision, "use_safetensors": True, "safety_checker": None,
              "feature_extractor": None, "requires_safety_checker": False}  # fmt: skip
    try:
        with quiet_loading():
            pipe = StableDiffusionPipeline.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"{spec.model.id!r}: cannot load the pipeline: {exc}") from exc
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = spec.prediction_type or noise_scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ModelError(f"{spec.model.id!r}: prediction type {prediction_type!r} is not epsilon or v_prediction")
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.mixed_precision]
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.to(device) if weight_dtype == torch.float32 else module.to(device, dtype=weight_dtype)
    pipe.vae.eval()
    pipe.text_encoder.eval()
    config = LoraConfig(
        r=spec.lora.rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora.dropout,
        init_lora_weights="gaussian",  # as diffusers' training scripts: A gaussian, B zero (starts as a no-op)
        target_modules=list(spec.lora.target_modules),
    )
    torch.manual_seed(spec.seed)
    pipe.unet.add_adapter(config)
    for p in pipe.unet.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32)
    return TrainParts(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, noise_scheduler, config, weight_dtype,
                      prediction_type)  # fmt: skip


def trainable_state(unet) -> dict:
    """The LoRA parameters by their module path: what a checkpoint stores and restores exactly."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in unet.named_parameters() if p.requires_grad}


def load_trainable_state(unet, state: dict) -> None:
    import torch

    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ModelError(f"checkpoint does not fit this adapter (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.device, p.dtype))


def adapter_bytes(unet, lora_config) -> bytes:
    """The adapter as diffusers writes it (``StableDiffusionPipeline.save_lora_weights``: ``unet.``-prefixed
    diffusers keys, the LoRA config in the safetensors metadata so alpha survives), as bytes for ``Storage``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    layers = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in layers.items()}
    with tempfile.TemporaryDirectory(prefix="genpipe-lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=layers,
            unet_lora_adapter_metadata=lora_config.to_dict(),
            safe_serialization=True,
        )
        with open(os.path.join(tmp, ADAPTER_FILE), "rb") as fh:
            return fh.read()
