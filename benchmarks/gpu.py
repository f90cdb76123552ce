"""GPU mode: the throughput comparison on a real-size architecture, with model FLOP utilisation (MFU).

By default the model is SDXL's architecture — UNet, both text encoders and VAE built from the published
``stabilityai/stable-diffusion-xl-base-1.0`` configs with random weights (``torch.manual_seed(0)``; speed does not
depend on weight values) and saved once as a diffusers directory under ``$GENPIPE_CACHE/sdxl-random-v1-float16``
so genpipe loads it through ``from_pretrained`` like a real checkpoint. ``--model DIR`` uses a real one instead.
Scoring uses an open_clip ViT-L-14 with random weights (``--clip-arch``), the size of a production CLIP.
``--device cpu --arch sdxl-tiny`` rehearses all of it on a CPU with the same architecture at toy widths.

MFU counts the UNet only: its FLOPs for one denoising step at the run's resolution are counted with
``torch.utils.flop_counter.FlopCounterMode`` on one real forward (classifier-free guidance included: the UNet runs
on 2 × batch latents), then  MFU = FLOPs/step/image × steps × images/s ÷ the GPU's dense peak for the dtype.
Text encoders, VAE decode and scoring add work that is not counted, so MFU is a lower bound.

    python -m benchmarks.gpu --json benchmarks/results-gpu.json --md benchmarks/results-gpu.md
    python -m benchmarks.throughput --device cuda --model DIR ...   # the same comparison on any model
    bash benchmarks/device_run.sh                                    # on a lent GPU machine (device_kit.py)

With ``--device cuda`` (the default) and no CUDA it exits at once with status 2 and says so; it never reports a
number it did not measure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

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

#: SDXL's pipeline, blocks and conditioning (two text encoders, ``text_time`` embedding, a VAE that downsamples by 8)
#: at toy widths: the GPU run's whole code path runs on a CPU in seconds, so the test suite rehearses it.
SDXL_TINY_UNET = {**SDXL_UNET, "attention_head_dim": [1, 2, 2], "block_out_channels": [32, 64, 64],
                  "cross_attention_dim": 64, "layers_per_block": 1, "transformer_layers_per_block": [1, 1, 1],
                  "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8,
                  "sample_size": 8}  # fmt: skip
SDXL_TINY_VAE = {**SDXL_VAE, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "sample_size": 64}
SDXL_TINY_TEXT_1 = {**SDXL_TEXT_1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                    "num_hidden_layers": 2, "projection_dim": 32}  # fmt: skip
SDXL_TINY_TEXT_2 = {**SDXL_TEXT_2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                    "num_hidden_layers": 2, "projection_dim": 32}  # fmt: skip
ARCHITECTURES = {
    "sdxl": {"unet": SDXL_UNET, "vae": SDXL_VAE, "text_1": SDXL_TEXT_1, "text_2": SDXL_TEXT_2},
    "sdxl-tiny": {"unet": SDXL_TINY_UNET, "vae": SDXL_TINY_VAE, "text_1": SDXL_TINY_TEXT_1, "text_2": SDXL_TINY_TEXT_2},
}
RANDOM_VERSION = "random-v1"  # the cache directory is f"{arch}-{RANDOM_VERSION}-{dtype}"

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


def build_sdxl_random(out_dir: Path, dtype: str = "float16", device: str = "cuda", arch: str = "sdxl") -> Path:
    """SDXL's architecture (``arch``: ``sdxl``, or ``sdxl-tiny`` at toy widths) with random weights, seed 0, built on
    ``device`` and saved as a diffusers directory (safetensors) that genpipe loads through ``from_pretrained``."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipeline.models.tiny import clip_tokenizer, write_bpe_files

    out_dir = Path(out_dir)
    if (out_dir / ".complete").exists():
        return out_dir
    configs = ARCHITECTURES[arch]
    torch_dtype = getattr(torch, dtype)
    common = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "bos_token_id": 49406,
              "eos_token_id": 49407, "pad_token_id": 49407}  # fmt: skip
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**configs["unet"]).to(torch_dtype)
        vae = AutoencoderKL(**configs["vae"]).to(torch_dtype)
        te1 = CLIPTextModel(CLIPTextConfig(**common, **configs["text_1"])).to(torch_dtype)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **configs["text_2"])).to(torch_dtype)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))  # fmt: skip
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    pipe.save_pretrained(tmp, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        write_bpe_files(tmp / sub)
        (tmp / sub / "tokenizer.json").unlink(missing_ok=True)
    recipe = {
        "built_from": "stabilityai/stable-diffusion-xl-base-1.0 configs",
        "architecture": arch,
        "weights": "random, seed 0",
        "dtype": dtype,
    }
    (tmp / ".complete").write_text(json.dumps(recipe) + "\n")
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process finished the same build first: keep its copy
        if not (out_dir / ".complete").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    del pipe, unet, vae, te1, te2
    if device == "cuda":
        torch.cuda.empty_cache()
    return out_dir


def unet_flops_cached(model_path: str, dtype: str, width: int, height: int, guidance: float,
                      device: str = "cuda") -> dict[str, Any]:  # fmt: skip
    """``unet_flops_per_image_step``, kept in ``$GENPIPE_CACHE/unet-flops.json`` by model weights (path, size,
    mtime), shape, dtype and library versions: a second benchmark run on the same model does not load its UNet
    again only to count."""
    import diffusers
    import torch

    from benchmarks.common import update_json
    from pipeline.models.tiny import cache_root

    weights = sorted((Path(model_path) / "unet").glob("*.safetensors"))
    stamp = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    key = json.dumps([os.path.realpath(model_path), stamp, width, height, dtype, guidance > 1, device,
                      torch.__version__, diffusers.__version__])  # fmt: skip
    path = cache_root() / "unet-flops.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    counted = unet_flops_per_image_step(model_path, dtype, width, height, guidance, device)
    update_json(str(path), {key: counted})  # merged atomically, beside other models' counts
    return counted


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
    vae_config = json.loads((Path(model_path) / "vae" / "config.json").read_text())
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)  # as the pipeline's vae_scale_factor
    rows = 2 if guidance > 1 else 1
    latent = torch.randn(rows, cfg.in_channels, height // scale, width // scale, device=device, dtype=torch_dtype)
    ctx = torch.randn(rows, 77, cfg.cross_attention_dim, device=device, dtype=torch_dtype)
    kwargs: dict[str, Any] = {}
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, text_dim, device=device, dtype=torch_dtype),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * rows, device=device, dtype=torch_dtype),
        }
    # Attention through the math backend: torch's counter has formulas for the fused CUDA kernels but not for every
    # backend (none for CPU flash attention), and the math one is plain matmuls it always counts. Same FLOPs.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
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


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    from benchmarks.common import cpu_model

    return cpu_model()


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def _params(n: int) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.3g} M"


def _count(value: float, unit: str) -> str:
    """13.5 TFLOP / 6.8 MFLOP: three significant digits and a prefix that fits."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def add_mfu(cfg: Any, payload: dict[str, Any], override_tflops: float | None = None) -> None:
    """Add UNet FLOPs per step and each scenario's achieved TFLOP/s and MFU to a throughput payload. On a CPU there
    is no peak table: MFU only with ``--peak-tflops`` (or ``GENPIPE_PEAK_TFLOPS``)."""
    from benchmarks.throughput import resolved_model

    name = device_name(cfg.device)
    flops = unet_flops_cached(resolved_model(cfg.model), cfg.dtype, cfg.width, cfg.height, cfg.guidance, cfg.device)
    override = override_tflops or float(os.environ.get("GENPIPE_PEAK_TFLOPS", 0))
    if cfg.device == "cuda":
        peak, source = peak_tflops(name, cfg.dtype, override)
    else:
        peak, source = (override, "--peak-tflops") if override else (None, "no CPU peak table (pass --peak-tflops)")
    per_image = flops["unet_flops_per_image_step"] * cfg.steps
    out: dict[str, Any] = {"device": name, "peak_tflops": peak, "peak_source": source, **flops,
                           "unet_flops_per_image": per_image, "scenarios": {}}  # fmt: skip
    for scenario, r in payload["scenarios"].items():
        row = {}
        for key in ("images_per_s", "images_per_s_excl_load", "steady_images_per_s"):
            ips = r.get(key)
            if ips:
                achieved = per_image * ips / 1e12
                row[key.replace("images_per_s", "achieved_tflops")] = _sig(achieved)
                if peak:
                    row[key.replace("images_per_s", "mfu")] = _sig(achieved / peak)
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
        f"{_params(m['unet_params'])} parameters, "
        f"{_count(m['unet_flops_per_image_step'], 'FLOP')} per image-step (CFG rows {m['cfg_rows']}), UNet only:",
        "",
        md_table(["scenario", "TFLOP/s (whole run)", "MFU", "TFLOP/s (steady)", "MFU (steady)"], rows),
        "",
    ])  # fmt: skip


def default_scenarios(device: str) -> list[str]:
    """Every in-process scenario; ``ray1`` where Ray is installed, ``ray2`` only with 2+ GPUs."""
    import importlib.util

    import torch

    names = ["bare", "noscore", "full", "bare_per_image", "noscore_invariant"]
    if importlib.util.find_spec("ray") is None:
        print("# Ray is not installed here: the ray1/ray2 scenarios are skipped", file=sys.stderr)
        return names
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    return names + ["ray1"] + (["ray2"] if gpus >= 2 else [])


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import quiet_env

    quiet_env()
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusers directory; default: --arch with random weights")
    p.add_argument(
        "--arch",
        default="sdxl",
        choices=sorted(ARCHITECTURES),
        help="the random-weight model built when no --model is given (sdxl-tiny: the CPU rehearsal)",
    )
    p.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu rehearses the GPU run's code path (use it with --arch sdxl-tiny)",
    )
    p.add_argument("-n", "--n", type=int, default=16)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float16", "bfloat16", "float32"),
        help="default float16 on CUDA, float32 on CPU",
    )
    p.add_argument("--clip-arch", default="ViT-L-14", help="open_clip architecture for scoring (random weights)")
    p.add_argument(
        "--scoring-cpus",
        type=float,
        default=None,
        help="scoring.cpus_per_actor: threads for open_nsfw, which runs on the CPU unless onnxruntime-gpu is "
        "installed (default 4 with CUDA, the spec's default on a CPU)",
    )
    p.add_argument(
        "--scenarios", default=None, help="default: all in-process ones, ray1 where Ray is installed, ray2 with 2+ GPUs"
    )
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for the dtype")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--md", dest="md_path", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda":
        require_cuda()
    from pipeline.models.tiny import cache_root

    if args.peak_tflops:
        os.environ["GENPIPE_PEAK_TFLOPS"] = str(args.peak_tflops)
    dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    if args.model:
        model = args.model
    else:
        print(f"# building {args.arch} with random weights ({dtype}) unless cached", flush=True)
        model = str(build_sdxl_random(cache_root() / f"{args.arch}-{RANDOM_VERSION}-{dtype}", dtype,
                                      device=args.device, arch=args.arch))  # fmt: skip
    scenarios = args.scenarios or ",".join(default_scenarios(args.device))
    from benchmarks import throughput

    forwarded = ["--device", args.device, "--model", model, "-n", str(args.n), "--width", str(args.width),
                 "--height", str(args.height), "--steps", str(args.steps), "--batch", str(args.batch),
                 "--dtype", dtype, "--clip-arch", args.clip_arch, "--scenarios", scenarios,
                 "--repeat", str(args.repeat), "--mfu"]  # fmt: skip
    scoring_cpus = args.scoring_cpus or (4.0 if args.device == "cuda" else None)
    if scoring_cpus:
        forwarded += ["--scoring-cpus", str(scoring_cpus)]
    for flag, value in (("--json", args.json_path), ("--md", args.md_path), ("--workdir", args.workdir)):
        if value:
            forwarded += [flag, value]
    return throughput.main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
