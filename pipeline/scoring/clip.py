"""ClipEmbedder: one open_clip model, loaded once per worker; L2-normalised image and text embeddings in batches.

Every head reads these embeddings, so each image goes through CLIP exactly once. The model comes from the
spec: ``architecture: tiny`` is the offline tiny model (its config registered with open_clip, its safetensors
checkpoint passed as ``pretrained``: the same ``create_model_and_transforms`` path a real checkpoint takes);
otherwise an open_clip architecture with a pretrained tag (``openai``) or a local ``.safetensors`` checkpoint.

Prompts longer than the text context are truncated the way open_clip's tokenizer does it (keep the first
``context_length - 2`` tokens between start and end of text), and the embedder reports the token count so the
stage can record the truncation on the item.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.spec import ClipSpec


class ClipLoadError(RuntimeError):
    """The CLIP backbone named in the spec cannot be loaded (the message says which key to fix)."""


@dataclass(frozen=True)
class TokenInfo:
    """How a prompt fits the text context."""

    tokens: int
    """Tokens including start and end of text."""
    context_length: int

    @property
    def truncated(self) -> bool:
        return self.tokens > self.context_length


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def resolve_clip(spec: ClipSpec) -> tuple[str, str | None, str]:
    """(open_clip architecture, pretrained tag or checkpoint path, backbone name to record). Builds the tiny model
    into the cache on first use. Refuses local checkpoints that are not safetensors."""
    from pipeline.models.tiny import TINY_CLIP_NAME, TINY_VERSION, ensure_tiny, register_tiny_clip

    if spec.architecture == "tiny":
        if spec.pretrained is not None:
            raise ClipLoadError("scoring.clip.pretrained: must be empty with architecture `tiny`")
        paths = ensure_tiny()
        return register_tiny_clip(paths["clip_config"]), str(paths["clip"]), f"{TINY_CLIP_NAME}/{TINY_VERSION}"
    pretrained = spec.pretrained
    if pretrained and looks_like_path(pretrained):
        path = os.path.abspath(os.path.expanduser(pretrained))
        if not os.path.isfile(path):
            raise ClipLoadError(f"scoring.clip.pretrained: no such checkpoint file {path}")
        if not path.endswith(".safetensors"):
            raise ClipLoadError("scoring.clip.pretrained: local checkpoints must be .safetensors")
        return spec.architecture, path, f"{spec.architecture}/{os.path.basename(path)}"
    return spec.architecture, pretrained, f"{spec.architecture}/{pretrained or 'random-init'}"


def looks_like_path(text: str) -> bool:
    return os.sep in text or text.endswith(".safetensors") or text.startswith("~")


class ClipEmbedder:
    """Thin wrapper: ``load(device)`` once, then ``embed_images`` / ``embed_texts`` per batch."""

    def __init__(self, spec: ClipSpec) -> None:
        self.spec = spec
        self.model: Any = None
        self.name = ""
        self.version = ""

    def load(self, device: str = "cpu") -> ClipEmbedder:
        import open_clip
        import torch

        arch, pretrained, name = resolve_clip(self.spec)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device)
        except Exception as exc:  # unknown architecture, tag not cached offline, bad checkpoint
            raise ClipLoadError(f"scoring.clip: cannot load {arch!r} / {pretrained!r}: {exc}") from exc
        model.eval()
        self.model, self.preprocess, self.device = model, preprocess, device
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.context_length = int(getattr(self.tokenizer, "context_length", None) or 77)
        self.logit_scale = float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else 100.0
        self.name = name
        digest = file_sha256(pretrained)[:12] if pretrained and os.path.isfile(pretrained) else None
        self.version = f"{name}@sha256:{digest}" if digest else name
        self._torch = torch
        return self

    # --- forwards ---------------------------------------------------------------------------------------------
    def embed_images(self, pixels: list[np.ndarray]) -> np.ndarray:
        """(N, D) float32, unit norm, from HxWx3 uint8 arrays (the exact pixels the writer will store)."""
        from PIL import Image

        torch = self._torch
        out = []
        for start in range(0, len(pixels), self.spec.batch_size):
            chunk = pixels[start : start + self.spec.batch_size]
            batch = torch.stack([self.preprocess(Image.fromarray(p)) for p in chunk]).to(self.device)
            with torch.no_grad():
                emb = self.model.encode_image(batch).float()
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, list[TokenInfo]]:
        """(N, D) float32 unit-norm text embeddings, and how each text fits the context (truncated or not)."""
        torch = self._torch
        infos = [TokenInfo(self.count_tokens(t), self.context_length) for t in texts]
        out = []
        for start in range(0, len(texts), self.spec.batch_size):
            tokens = self.tokenizer(texts[start : start + self.spec.batch_size]).to(self.device)
            with torch.no_grad():
                emb = self.model.encode_text(tokens).float()
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        return (np.concatenate(out) if out else np.zeros((0, 0), np.float32)), infos

    def count_tokens(self, text: str) -> int:
        """Tokens the text needs, start and end of text included, before any truncation."""
        tok = self.tokenizer
        inner = getattr(tok, "tokenizer", None)
        if inner is not None and callable(inner):  # open_clip HFTokenizer wraps a transformers tokenizer
            return len(inner(text, add_special_tokens=True)["input_ids"])
        return len(tok.encode(text)) + 2
