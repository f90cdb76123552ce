"""Pre-launch checks of the scoring spec that need files or libraries (the pydantic spec checks the rest): every
problem raises ``SpecError`` naming the key, before any actor starts. No model weights are loaded here."""

from __future__ import annotations

import importlib
import os

from pipeline.errors import SpecError
from schemas.spec import JobSpec


def check_scoring(spec: JobSpec) -> None:
    """Raise ``SpecError`` listing every problem with ``spec.scoring`` that can be seen without loading a model
    (the prompt screen's classifier hook excepted: it is built here, once, so a failing one fails before launch)."""
    problems: list[str] = []
    scoring = spec.scoring
    if scoring.enabled:
        problems += _check_clip(spec)
        nsfw = scoring.nsfw
        if "open_nsfw" in nsfw.classifiers:
            try:
                from pipeline.scoring.nsfw import open_nsfw_model_path

                open_nsfw_model_path()
            except (ImportError, FileNotFoundError) as exc:
                problems.append(f"scoring.nsfw.classifiers: open_nsfw: {exc}")
        if "clip_head" in nsfw.classifiers:
            problems += _check_clip_head(spec)
        if "sd_safety_checker" in nsfw.classifiers:
            sid = nsfw.sd_safety_checker.id or ""
            if (sid.startswith((".", "/", "~")) or os.path.exists(sid)) and not os.path.isdir(os.path.expanduser(sid)):
                problems.append(f"scoring.nsfw.sd_safety_checker.id: no such directory {sid}")
    screen = scoring.screen
    if screen.enabled:
        if screen.blocklist:
            from pipeline.scoring.screen import Blocklist

            try:
                Blocklist.load(screen.blocklist)
            except (OSError, ValueError) as exc:
                problems.append(f"scoring.screen.blocklist: {exc}")
        if screen.classifier:
            module, _, attr = screen.classifier.partition(":")
            try:
                if not callable(getattr(importlib.import_module(module), attr, None)):
                    problems.append(f"scoring.screen.classifier: {module} has no callable {attr!r}")
                else:
                    from pipeline.scoring.screen import load_classifier

                    load_classifier(screen.classifier)  # built now (and kept): a factory that fails, fails here
            except ImportError as exc:
                problems.append(f"scoring.screen.classifier: cannot import {module}: {exc}")
            except ValueError as exc:
                problems.append(str(exc))
    if problems:
        raise SpecError("invalid scoring settings", problems)


def _check_clip(spec: JobSpec) -> list[str]:
    clip = spec.scoring.clip
    if clip.architecture == "tiny":
        return ["scoring.clip.pretrained: must be empty with architecture `tiny`"] if clip.pretrained else []
    problems = []
    from pipeline.scoring.clip import looks_like_path

    if clip.pretrained and looks_like_path(clip.pretrained):
        path = os.path.expanduser(clip.pretrained)
        if not os.path.isfile(path):
            problems.append(f"scoring.clip.pretrained: no such checkpoint file {clip.pretrained}")
        elif not path.endswith(".safetensors"):
            problems.append("scoring.clip.pretrained: local checkpoints must be .safetensors")
    if not clip.architecture.startswith(("hf-hub:", "local-dir:")):
        import open_clip

        if clip.architecture not in open_clip.list_models():
            problems.append(f"scoring.clip.architecture: unknown open_clip architecture {clip.architecture!r}")
        elif clip.pretrained and not looks_like_path(clip.pretrained):
            problems += _check_clip_tag(clip.architecture, clip.pretrained)
    return problems


def _check_clip_tag(arch: str, tag: str) -> list[str]:
    """A pretrained tag must resolve, without a download when the hub is off limits, to safetensors weights:
    otherwise every image of the run would be generated, then held for review with a scorer error."""
    from huggingface_hub import constants, try_to_load_from_cache
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        return [f"scoring.clip.pretrained: {arch} has no pretrained tag {tag!r}"]
    model_id, filename = os.path.split(cfg.get("hf_hub", ""))
    if not model_id:  # only a download URL, of a pickle checkpoint
        return [f"scoring.clip.pretrained: {arch}/{tag} is published only as a pickle checkpoint at a URL; weights "
                "load as safetensors only: convert it and give the local .safetensors path"]  # fmt: skip
    # open_clip looks for the safetensors twin of the file first, with its own naming (_get_safe_alternatives:
    # open_clip_pytorch_model.bin → open_clip_model.safetensors, other x.bin / x.pth → x.safetensors)
    name = filename or HF_WEIGHTS_NAME
    if name == HF_WEIGHTS_NAME:
        safe = HF_SAFE_WEIGHTS_NAME
    elif name.endswith((".bin", ".pth")):
        safe = name[:-4] + ".safetensors"
    else:
        safe = name
    if not safe.endswith(".safetensors"):
        return [f"scoring.clip.pretrained: {arch}/{tag} is published as {name}, not safetensors; weights load as "
                "safetensors only: convert it and give the local .safetensors path"]  # fmt: skip
    if constants.is_offline_mode() and not isinstance(try_to_load_from_cache(model_id, safe), str):
        return [f"scoring.clip.pretrained: {arch}/{tag} ({model_id}/{safe}) is not in the local HF cache, and "
                "HF_HUB_OFFLINE is set so it cannot be downloaded; download it beforehand or give a local "
                ".safetensors checkpoint"]  # fmt: skip
    return []


def _clip_embed_dim(spec: JobSpec) -> tuple[int | None, str]:
    import open_clip

    arch = spec.scoring.clip.architecture
    if arch == "tiny":
        from pipeline.models.tiny import ensure_tiny, register_tiny_clip

        arch = register_tiny_clip(ensure_tiny()["clip_config"])
    cfg = open_clip.get_model_config(arch) or {}
    return cfg.get("embed_dim"), arch


def _check_clip_head(spec: JobSpec) -> list[str]:
    from pipeline.scoring.nsfw import read_clip_head_header

    head = spec.scoring.nsfw.clip_head
    try:
        header = read_clip_head_header(os.path.expanduser(head.path or ""))
    except Exception as exc:
        return [f"scoring.nsfw.clip_head.path: {exc}"]
    problems = [
        f"scoring.nsfw.clip_head.thresholds.{cat}: the head has no category {cat!r} "
        f"(it declares {', '.join(header.categories)})"
        for cat in head.thresholds
        if cat not in header.categories
    ]
    dim, arch = _clip_embed_dim(spec)
    if dim is not None and dim != header.embed_dim:
        problems.append(
            f"scoring.nsfw.clip_head.path: the head reads {header.embed_dim}-d embeddings, {arch} gives {dim}-d"
        )
    return problems
