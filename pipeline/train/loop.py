"""The training loop every worker runs — in this process (``executor: local``) or as a Ray Train worker.

The objective is latent diffusion's: encode the image with the VAE, add noise at a random timestep with the
model's own noise schedule, predict the noise (or v, as the schedule's prediction type says) from the noisy
latent and the caption, MSE loss. Only the LoRA layers of the denoiser train (AdamW). Rank 0 writes checkpoints,
the adapter, the loss curve and the evaluation; every random draw is seeded by (seed, step, rank), so a resumed
run continues exactly where an uninterrupted one would have been.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.storage import Storage
from pipeline.train.data import Sample, TrainData, batch_indices, batches_per_epoch, pixel_tensor
from schemas.train import TrainSpec


@dataclass
class WorkerJob:
    """Everything a worker needs, picklable: the spec, the resolved model path, the samples."""

    spec: TrainSpec
    model_path: str
    data: TrainData
    quiet: bool = False


@dataclass
class WorkerContext:
    """Where this worker sits: the single-process default; ``pipeline.train.distributed`` supplies Ray's."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def wrap(self, model):
        """The model the forward pass goes through (DDP-wrapped when data-parallel)."""
        return model

    def no_sync(self, model, last_micro: bool):
        """Skip the gradient all-reduce on accumulation steps that are not the last."""
        return contextlib.nullcontext()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all workers."""
        return value

    def log(self, line: str) -> None:
        """A progress line for the person who started the run."""
        print(line, file=sys.stderr, flush=True)


def total_steps(spec: TrainSpec, n_train: int, world: int) -> int:
    if spec.max_steps is not None:
        return spec.max_steps
    per_epoch = batches_per_epoch(n_train, spec.batch_size, world)
    return math.ceil(spec.epochs * per_epoch / spec.gradient_accumulation_steps)


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from the run seed and a position (step, rank, purpose): independent streams, no shared state."""
    import hashlib

    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def train_worker(job: WorkerJob, ctx: WorkerContext) -> None:
    import torch
    from diffusers.optimization import get_scheduler

    from pipeline.train.checkpoint import load_latest, save_checkpoint
    from pipeline.train.model import load_parts

    spec, data = job.spec, job.data
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    main = ctx.rank == 0
    started = time.monotonic()

    # 1. The model: frozen text encoder, VAE and UNet, LoRA layers on the UNet.
    parts = load_parts(job.model_path, spec, ctx.device)
    params = [p for p in parts.unet.parameters() if p.requires_grad]

    # 2. AdamW on the LoRA parameters and the learning-rate schedule.
    opt = spec.optimizer
    optimizer = torch.optim.AdamW(params, lr=opt.learning_rate, betas=(opt.adam_beta1, opt.adam_beta2),
                                  weight_decay=opt.weight_decay, eps=opt.adam_epsilon)  # fmt: skip
    total = total_steps(spec, len(data.train), ctx.world_size)
    lr_scheduler = get_scheduler(opt.lr_scheduler, optimizer, num_warmup_steps=opt.lr_warmup_steps,
                                 num_training_steps=total)  # fmt: skip
    scaler = torch.amp.GradScaler("cuda") if spec.mixed_precision == "fp16" else None

    # 3. Resume from the newest checkpoint under the output, if any.
    store = Storage(spec.output)
    resumed = load_latest(store, parts.unet, optimizer, lr_scheduler)
    history = [row for row in resumed.history if row["step"] <= resumed.step]
    if scaler is not None and resumed.state.get("scaler"):
        scaler.load_state_dict(resumed.state["scaler"])
    offset_s = history[-1]["time_s"] if history else 0.0
    if main and not job.quiet:
        where = f"resuming from step {resumed.step}" if resumed.step else "starting"
        ctx.log(f"train-lora {spec.name}: {where}; {total} steps, {len(data.train)} samples, "
                f"{ctx.world_size} worker(s) on {ctx.device}")  # fmt: skip

    # 4. Data parallel: DDP averages the LoRA gradients over the workers.
    model = ctx.wrap(parts.unet)
    model.train()
    accum = spec.gradient_accumulation_steps
    last_print = time.monotonic()

    # 5. The loop: `accum` forward/backward passes per optimizer step.
    for step in range(resumed.step + 1, total + 1):
        step_loss, epoch = 0.0, 0
        for micro in range(accum):
            index = (step - 1) * accum + micro
            epoch, idx = batch_indices(len(data.train), spec.batch_size, ctx.world_size, ctx.rank, spec.seed, index)
            gen = torch.Generator().manual_seed(derived_seed(spec.seed, "train", index, ctx.rank))
            torch.manual_seed(derived_seed(spec.seed, "dropout", index, ctx.rank))  # LoRA dropout draws from it
            batch = [data.train[i] for i in idx]
            with ctx.no_sync(model, last_micro=micro == accum - 1):
                loss = diffusion_loss(parts, model, batch, spec, gen, ctx.device)
                scaled = loss / accum
                (scaler.scale(scaled) if scaler else scaled).backward()
            step_loss += float(loss.detach()) / accum
        if scaler:
            scaler.unscale_(optimizer)
        if opt.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, opt.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = lr_scheduler.get_last_lr()[0]
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        row = {"step": step, "epoch": epoch, "loss": ctx.mean(step_loss), "lr": lr,
               "time_s": round(offset_s + time.monotonic() - started, 3)}  # fmt: skip
        history.append(row)
        if main and (step % spec.checkpoint_every == 0 or step == total):
            state = {"history": history, "seed": spec.seed, "workers": ctx.world_size,
                     "scaler": scaler.state_dict() if scaler else None}  # fmt: skip
            save_checkpoint(store, step, parts.unet, optimizer, lr_scheduler, state, spec.checkpoints_keep)
        if main and not job.quiet and (time.monotonic() - last_print > 5 or step == total):
            last_print = time.monotonic()
            ctx.log(f"step {step}/{total} epoch {epoch} loss {row['loss']:.4f} lr {lr:.2e}")

    # 6. Rank 0: the adapter, the loss curve, the evaluation and the report.
    if main:
        from pipeline.train.report import finish

        finish(store, spec, job, parts, history, resumed.step, time.monotonic() - started)


def encode_captions(parts, captions: list[str], device: str):
    import torch

    ids = parts.tokenizer(captions, max_length=parts.tokenizer.model_max_length, padding="max_length",
                          truncation=True, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        return parts.text_encoder(ids.to(device))[0]


def diffusion_loss(parts, model, batch: list[Sample], spec: TrainSpec, gen, device: str, timesteps=None):
    """The latent-diffusion MSE loss of one batch; every random draw comes from the CPU generator ``gen``, so it
    is the same on any device. ``timesteps`` fixes the timesteps (validation); default: uniform draws."""
    import torch
    import torch.nn.functional as F

    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=gen)))
    pixels = torch.stack([pixel_tensor(s, spec.resolution, spec.center_crop, spec.random_flip, rng) for s in batch])
    sched = parts.noise_scheduler
    with torch.no_grad():
        dist = parts.vae.encode(pixels.to(device, parts.weight_dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=gen).to(device, dist.mean.dtype)
        latents = (dist.mean + dist.std * eps) * parts.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
        if timesteps is None:
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (len(batch),), generator=gen)
        timesteps = timesteps.to(device).long()
        noisy = sched.add_noise(latents, noise, timesteps)
        target = noise if parts.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
        hidden = encode_captions(parts, [s.caption for s in batch], device)
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    autocast = (torch.autocast(device_type, dtype=parts.weight_dtype) if spec.mixed_precision != "no"
                else contextlib.nullcontext())  # fmt: skip
    with autocast:
        pred = model(noisy, timesteps, hidden).sample
    return F.mse_loss(pred.float(), target.float(), reduction="mean")
