"""Tiny random-weight models built offline from config: a Stable-Diffusion-style pipeline and an open_clip CLIP.

They stand in for real checkpoints on machines without a model hub (tests, the demo, a laptop) and are loaded
through the same code paths as real models (``DiffusionPipeline.from_pretrained``, open_clip's checkpoint loader).
Weights are random but fixed (``torch.manual_seed(0)``); the tokenizer is the real CLIP BPE that open_clip ships,
so prompts tokenize exactly as they would for SD 1.x. Everything is saved as safetensors.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: The ``model.id`` of a job spec that selects the tiny pipeline.
TINY_MODEL_ID = "tiny"
#: open_clip architecture name of the tiny CLIP (the stem of its config file, as ``add_model_config`` registers it).
TINY_CLIP_NAME = "genpipe-tiny-clip"
#: Bump when the recipe changes so caches built by an older recipe are not reused.
TINY_VERSION = "tiny-v1"
_MARKER = ".complete"

_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# SD 1.5's scheduler_config.json, so sampler swaps see the same base config as with a real SD checkpoint.
_SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
}
_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def cache_root() -> Path:
    """``$GENPIPE_CACHE`` or ``~/.cache/genpipe``."""
    return Path(os.environ.get("GENPIPE_CACHE") or Path.home() / ".cache" / "genpipe").expanduser()


def tiny_paths(directory: Path) -> dict[str, Path]:
    """Where ``build_tiny(directory)`` puts each artefact."""
    directory = Path(directory)
    return {
        "sd": directory / "sd",
        "clip": directory / "clip" / "open_clip_model.safetensors",
        "clip_config": directory / "clip" / f"{TINY_CLIP_NAME}.json",
    }


def ensure_tiny() -> dict[str, Path]:
    """The tiny models in the cache, built on first use. Safe when several processes (Ray actors) call it at once:
    one builds under a file lock into a temp dir and renames it into place; the others wait, then reuse it."""
    root = cache_root()
    target = root / TINY_VERSION
    if (target / _MARKER).exists():
        return tiny_paths(target)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{TINY_VERSION}.lock"):
        if not (target / _MARKER).exists():
            # Under the lock nobody else is building: anything half-built is left over from a killed process.
            for stale in [target, *root.glob(f".{TINY_VERSION}.*")]:
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}.", dir=root))
            try:
                build_tiny(tmp)
                (tmp / _MARKER).write_text("ok\n")
                tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be read by every worker
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return tiny_paths(target)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_tiny(directory: Path) -> dict[str, Path]:
    """Build both tiny models into ``directory`` (created if missing) and return their paths."""
    paths = tiny_paths(directory)
    build_tiny_sd(paths["sd"])
    build_tiny_clip(paths["clip"], paths["clip_config"])
    return paths


# --- the text-to-image pipeline ------------------------------------------------------------------------------


def build_tiny_sd(out_dir: Path) -> Path:
    """A tiny SD-1.x-shaped pipeline (VAE downsamples by 8 like the real one), saved with ``save_pretrained``."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=PNDMScheduler.from_config(_SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # Keep the tokenizer in the layout of the SD 1.x repos (vocab.json + merges.txt, no tokenizer.json): the same
    # tokenization, loaded faster, and 3.6 MB smaller.
    write_bpe_files(Path(out_dir) / "tokenizer")
    (Path(out_dir) / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    return Path(out_dir)


@functools.lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges, rebuilt from open_clip's bundled file exactly as its SimpleTokenizer does."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    # open_clip names these <start_of_text>/<end_of_text>; the ids (49406, 49407) are what models see.
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer():
    """transformers' CLIPTokenizer over the real CLIP BPE, 77 tokens, padded with <|endoftext|> as SD 1.x does."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def write_bpe_files(directory: Path) -> None:
    """``vocab.json`` + ``merges.txt`` as the SD 1.x and OpenAI CLIP repos ship them (what CLIPTokenizer reads)."""
    vocab, merges = clip_bpe()
    directory = Path(directory)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "\n".join(" ".join(m) for m in merges)
    (directory / "merges.txt").write_text(f"#version: 0.2\n{lines}\n", encoding="utf-8")


# --- CLIP -----------------------------------------------------------------------------------------------------


def register_tiny_clip(config_path: Path) -> str:
    """Make the tiny CLIP architecture known to open_clip; returns its name for ``create_model_and_transforms``."""
    import open_clip

    if TINY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(Path(config_path))
    return TINY_CLIP_NAME


def build_tiny_clip(weights_path: Path, config_path: Path) -> Path:
    """A tiny ViT CLIP with CLIP's 49408-token text vocabulary; weights as safetensors, config as open_clip JSON."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    config_path = Path(config_path)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(_CLIP_CONFIG, indent=2) + "\n")
    # Also readable as `local-dir:<dir>`, open_clip's self-describing layout (config + weights side by side).
    (config_path.parent / "open_clip_config.json").write_text(json.dumps({"model_cfg": _CLIP_CONFIG}, indent=2) + "\n")
    register_tiny_clip(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None, pretrained_text=False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path))
    return Path(weights_path)


# --- LoRA -----------------------------------------------------------------------------------------------------


def build_tiny_lora(unet_source_dir: Path, out_dir: Path, seed: int = 0, rank: int = 4) -> Path:
    """A random, non-zero LoRA adapter for the UNet of the pipeline at ``unet_source_dir``, saved in the diffusers
    LoRA format that ``pipe.load_lora_weights`` reads (``pytorch_lora_weights.safetensors``)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(Path(unet_source_dir), subfolder="unet", use_safetensors=True)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=_LORA_TARGETS, init_lora_weights=False)
    torch.manual_seed(seed)
    # init_lora_weights=False draws both A and B at random, so the adapter changes the output from the start
    # (peft's default zero-inits B, which would make an untrained adapter a no-op).
    unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(
        Path(out_dir),
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=config.to_dict(),
        safe_serialization=True,
    )
    return Path(out_dir)
