"""Documented limits on what a spec or a manifest row may ask for, and the sampler names.

They exist so that an absurd row (a 100k-character prompt, 10,000 steps, a 100k-pixel image) is rejected
with a reason instead of tying up a GPU for hours or running it out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 2000
    """Longer prompts are rejected; CLIP-based text encoders read 77 tokens anyway."""
    min_size: int = 8
    max_size: int = 2048
    """Width and height: multiples of 8 (the VAE downsamples by 8) in [min_size, max_size]."""
    max_steps: int = 200
    max_guidance: float = 50.0
    max_images_per_prompt: int = 64
    max_seed: int = 2**63 - 1
    max_prompt_id_chars: int = 128


LIMITS = Limits()

#: Sampler names, in the order they are documented. The name → scheduler table lives in
#: ``pipeline.samplers``; a unit test keeps the two in step.
SAMPLER_NAMES: tuple[str, ...] = (
    "ddim",
    "ddpm",
    "pndm",
    "euler",
    "euler_ancestral",
    "heun",
    "lms",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde",
    "unipc",
    "lcm",
    "flow_match_euler",
)
