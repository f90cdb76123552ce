"""GPU mode: the throughput comparison on a real-size architecture, with model FLOP utilisation (MFU).

By default the model is SDXL's architecture — UNet, both text encoders and VAE built from the published
``stabilityai/stable-diffusion-xl-base-1.0`` configs with random weights (``torch.manual_seed(0)``; speed does not
depend on weight values) and saved once as a diffusers directory under ``$GENPIPE_CACHE/sdxl-random-v1`` so genpipe
loads it through ``from_pretrained`` like a real checkpoint. ``--model DIR`` uses a real one instead. Scoring uses
an open_clip ViT-L-14 with random weights (``--clip-arch``), the size of a production CLIP.

MFU counts the UNet only: its FLOPs for one denoising step at the run's resolution are counted with
``torch.utils.flop_counter.FlopCounterMode`` on one real forward (classifier-free guidance included: the UNet runs
on 2 × batch latents), then  MFU = FLOPs/step/image × steps × images/s ÷ the GPU's dense peak for the dtype.
Text encoders, VAE decode and scoring add work that is not counted, so MFU is a lower bound.

    python -m benchmarks.gpu --json benchmarks/results-gpu.json --md benchmarks/results-gpu.md
    python -m benchmarks.throughput --device cuda --model DIR ...   # the same comparison on any model

Without CUDA it exits at once with status 2 and says so; it never reports a number it did not measure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

SDXL_RANDOM_VERSION = "sdxl-random-v1"

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the architecture keys).
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}  # fmt: skip
#: vae/config.json
SDXL_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "force_upcast": True,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": 0.13025,
}  # fmt: skip
#: text_encoder/config.json (CLIP ViT-L/14 text) and text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text).
SDXL_TEXT_1 = {"hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
               "num_hidden_layers": 12, "projection_dim": 768}  # fmt: skip
SDXL_TEXT_2 = {"hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
               "num_hidden_layers": 32, "projection_dim": 1280}  # fmt: skip
#: scheduler/scheduler_config.json
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}

#: Dense (no sparsity) tensor-core peak TFLOP/s for 16-bit inputs, by a substring of the device name.
PEAK_TFLOPS_16BIT = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0,
                     "A10G": 70.0, "A10": 125.0, "L4": 121.0, "4090": 165.0, "V100": 125.0, "T4": 65.0}  # fmt: skip


def require_cuda() -> None:
    """Exit with status 2 and a clear message when no CUDA device is usable."""
    try:
        import torch
    except ImportError:
        raise SystemExit("benchmarks: --device cuda needs torch with CUDA; torch is not installed") from None
    if not torch.cuda.is_available():
        print(
            f"error: --device cuda needs a CUDA GPU, and there is none here: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Run it on a GPU host; "
            "see benchmarks/README.md. No numbers were produced.",
            file=sys.stderr,
        )
        raise SystemExit(2)


def build_sdxl_random(out_dir: Path, dtype: str = "float16") -> Path:
    """SDXL's architecture with random weights, saved as a diffusers directory (safetensors); built on the GPU."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipeline.models.tiny import clip_tokenizer, write_bpe_files

    out_dir = Path(out_dir)
    if (out_dir / ".complete").exists():
        return out_dir
    torch_dtype = getattr(torch, dtype)
    common = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "bos_token_id": 49406,
              "eos_token_id": 49407, "pad_token_id": 49407}  # fmt: skip
    with torch.device("cuda"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SDXL_UNET).to(torch_dtype)
        vae = AutoencoderKL(**SDXL_VAE).to(torch_dtype)
        te1 = CLIPTextModel(CLIPTextConfig(**common, **SDXL_TEXT_1)).to(torch_dtype)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **SDXL_TEXT_2)).to(torch_dtype)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))  # fmt: skip
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    pipe.save_pretrained(tmp, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        write_bpe_files(tmp / sub)
        (tmp / sub / "tokenizer.json").unlink(missing_ok=True)
    recipe = {
        "built_from": "stabilityai/stable-diffusion-xl-base-1.0 configs",
        "weights": "random, seed 0",
        "dtype": dtype,
    }
    (tmp / ".complete").write_text(json.dumps(recipe) + "\n")
    os.replace(tmp, out_dir)
    del pipe, unet, vae, te1, te2
    torch.cuda.empty_cache()
    return out_dir


def unet_flops_per_image_step(model_path: str, dtype: str, width: int, height: int, guidance: float,
                              device: str = "cuda") -> dict[str, Any]:  # fmt: skip
    """FLOPs of one UNet forward for one image (both CFG halves when guidance > 1), counted on a real call."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    torch_dtype = getattr(torch, dtype)
    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", torch_dtype=torch_dtype,
                                                use_safetensors=True).to(device)  # fmt: skip
    cfg = unet.config
    rows = 2 if guidance > 1 else 1
    latent = torch.randn(rows, cfg.in_channels, height // 8, width // 8, device=device, dtype=torch_dtype)
    ctx = torch.randn(rows, 77, cfg.cross_attention_dim, device=device, dtype=torch_dtype)
    kwargs: dict[str, Any] = {}
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, text_dim, device=device, dtype=torch_dtype),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * rows, device=device, dtype=torch_dtype),
        }
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(latent, torch.tensor(500, device=device), encoder_hidden_states=ctx, **kwargs)
    params = sum(p.numel() for p in unet.parameters())
    del unet
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"unet_flops_per_image_step": counter.get_total_flops(), "unet_params": params, "cfg_rows": rows}


def peak_tflops(device_name: str, dtype: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if dtype == "float32":
        return None, "no float32 peak table (pass --peak-tflops)"
    for key, value in PEAK_TFLOPS_16BIT.items():
        if key in device_name:
            return value, f"dense 16-bit peak of {key}"
    return None, f"unknown device {device_name!r} (pass --peak-tflops)"


def add_mfu(cfg: Any, payload: dict[str, Any], override_tflops: float | None = None) -> None:
    """Add UNet FLOPs per step and each scenario's MFU to a throughput payload (CUDA runs only)."""
    import torch

    from benchmarks.throughput import resolved_model

    name = torch.cuda.get_device_name(0)
    flops = unet_flops_per_image_step(
        resolved_model(cfg.model), cfg.dtype, cfg.width, cfg.height, cfg.guidance, device=cfg.device
    )
    peak, source = peak_tflops(name, cfg.dtype, override_tflops or float(os.environ.get("GENPIPE_PEAK_TFLOPS", 0)))
    per_image = flops["unet_flops_per_image_step"] * cfg.steps
    out: dict[str, Any] = {"device": name, "peak_tflops": peak, "peak_source": source, **flops,
                           "unet_flops_per_image": per_image, "scenarios": {}}  # fmt: skip
    for scenario, r in payload["scenarios"].items():
        row = {}
        for key in ("images_per_s", "images_per_s_excl_load", "steady_images_per_s"):
            ips = r.get(key)
            if ips:
                achieved = per_image * ips / 1e12
                row[key.replace("images_per_s", "achieved_tflops")] = round(achieved, 4)
                if peak:
                    row[key.replace("images_per_s", "mfu")] = round(achieved / peak, 4)
        out["scenarios"][scenario] = row
    payload["mfu"] = out


def render_mfu(payload: dict[str, Any]) -> str:
    from benchmarks.common import md_table

    m = payload.get("mfu")
    if not m:
        return ""
    rows = [[s, v.get("achieved_tflops"), v.get("mfu"), v.get("steady_achieved_tflops"), v.get("steady_mfu")]
            for s, v in m["scenarios"].items()]  # fmt: skip
    return "\n".join([
        f"MFU on {m['device']} (peak {m['peak_tflops']} TFLOP/s, {m['peak_source']}); UNet "
        f"{m['unet_params'] / 1e9:.2f} B parameters, {m['unet_flops_per_image_step'] / 1e12:.2f} TFLOP per image-step "
        f"(CFG rows {m['cfg_rows']}), UNet only:",
        "",
        md_table(["scenario", "TFLOP/s (whole run)", "MFU", "TFLOP/s (steady)", "MFU (steady)"], rows),
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import quiet_env

    quiet_env()
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusers directory; default: SDXL architecture, random weights")
    p.add_argument("-n", "--n", type=int, default=32)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--clip-arch", default="ViT-L-14", help="open_clip architecture for scoring (random weights)")
    p.add_argument("--scenarios", default=None, help="default: all but ray2 unless there are 2+ GPUs")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense peak for the dtype")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--md", dest="md_path", default=None)
    args = p.parse_args(argv)
    require_cuda()
    import torch

    from pipeline.models.tiny import cache_root

    if args.peak_tflops:
        os.environ["GENPIPE_PEAK_TFLOPS"] = str(args.peak_tflops)
    model = args.model or str(build_sdxl_random(cache_root() / SDXL_RANDOM_VERSION, args.dtype))
    scenarios = args.scenarios or ",".join(
        ["bare", "noscore", "full", "bare_per_image", "noscore_invariant", "ray1"]
        + (["ray2"] if torch.cuda.device_count() >= 2 else [])
    )
    from benchmarks import throughput

    forwarded = ["--device", "cuda", "--model", model, "-n", str(args.n), "--width", str(args.width),
                 "--height", str(args.height), "--steps", str(args.steps), "--batch", str(args.batch),
                 "--dtype", args.dtype, "--clip-arch", args.clip_arch, "--scenarios", scenarios]  # fmt: skip
    if args.json_path:
        forwarded += ["--json", args.json_path]
    if args.md_path:
        forwarded += ["--md", args.md_path]
    return throughput.main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
