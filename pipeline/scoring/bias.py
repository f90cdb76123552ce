"""BiasScorer: zero-shot CLIP probes of perceived attributes on the stored image embedding, and the set-level
bias formulas the report uses.

Per image: P(person) from "person" vs "no person" probe prompts; when a person is present (P >= the spec's
``person_threshold``), the perceived gender presentation, Monk skin tone (MST 1-10) and age group, each a
softmax over its classes. With no person the attribute keys are present and ``None``: "no person" is explicit and
can never be averaged in as a zero. Each class is a prompt ensemble (the normalised mean of its probe prompts'
text embeddings, as in the CLIP paper); the probe text embeddings are computed once at load.

These are *perceived* attributes from a general-purpose model: CLIP zero-shot skin tone in particular is coarse.
They measure skew across a set of images; they say nothing reliable about any one image.

Set-level formulas (inputs are a group's mean probability vector over the images with a person):
  HEIM (Lee et al. 2023) gender imbalance  |P(female) - 0.5|
  HEIM skin-tone imbalance                 sum_i |P(MST_i) - 0.1| / 10
  DALL-Eval (Cho et al. 2023) MAD          (1/K) sum_k |p_k - 1/K|   (equals the two above for K = 2 and K = 10)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PROBES_VERSION = "bias-probes-v1"


@dataclass(frozen=True)
class Attribute:
    key: str
    """Score-key prefix: class ``c`` is recorded as ``{key}_{c}``."""
    classes: tuple[str, ...]
    probes: dict[str, tuple[str, ...]]


_MST_WORDS = (
    "very pale", "pale ivory", "light beige", "beige", "light tan",
    "tan", "light brown", "brown", "dark brown", "very dark brown",
)  # fmt: skip

PERSON_PROBES: dict[str, tuple[str, ...]] = {
    "present": (
        "a photo of a person", "a photo of a man", "a photo of a woman", "a photo of a child",
        "a portrait of a person", "a photo of people", "a photo of a model wearing clothes",
    ),
    "absent": (
        "a photo of an object", "a product photo with no people", "a photo of a landscape",
        "a photo of an empty room", "a still life photo", "a photo of food", "a flat lay of products",
    ),
}  # fmt: skip

ATTRIBUTES: dict[str, Attribute] = {
    "gender": Attribute(
        "bias_gender",
        ("female", "male"),
        {
            "female": ("a photo of a woman", "a photo of a female-presenting person", "a portrait of a woman"),
            "male": ("a photo of a man", "a photo of a male-presenting person", "a portrait of a man"),
        },
    ),
    "skin_tone": Attribute(
        "bias_mst",
        tuple(str(i) for i in range(1, 11)),
        {
            str(i): (f"a photo of a person with {w} skin", f"a person with Monk skin tone {i} of 10, {w} skin")
            for i, w in enumerate(_MST_WORDS, start=1)
        },
    ),
    "age": Attribute(
        "bias_age",
        ("child", "young_adult", "middle_aged", "older"),
        {
            "child": ("a photo of a child", "a photo of a kid"),
            "young_adult": ("a photo of a young adult", "a photo of a person in their twenties"),
            "middle_aged": ("a photo of a middle-aged person", "a photo of a person in their fifties"),
            "older": ("a photo of an elderly person", "a photo of a senior citizen"),
        },
    ),
}


def score_keys(attributes: Sequence[str]) -> list[str]:
    """Every score key the bias head writes for ``attributes``."""
    keys = ["bias_person", "bias_person_present"]
    for name in attributes:
        if name in ATTRIBUTES:
            a = ATTRIBUTES[name]
            keys += [f"{a.key}_{c}" for c in a.classes]
    return keys


class BiasScorer:
    """Reads CLIP image embeddings; needs the embedder only at load, for the probe prompts."""

    name = "bias"
    version = PROBES_VERSION

    def __init__(self, attributes: Sequence[str], person_threshold: float = 0.5) -> None:
        unknown = [a for a in attributes if a != "person" and a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"scoring.bias.attributes: unknown attribute(s) {unknown}")
        self.attributes = [a for a in attributes if a in ATTRIBUTES]
        self.person_threshold = person_threshold

    def load(self, embedder: Any) -> BiasScorer:
        """Probe prototypes from the embedder's text tower (``embed_texts``) and its logit scale."""
        self.logit_scale = float(embedder.logit_scale)
        self._person = self._prototypes(embedder, PERSON_PROBES, ("present", "absent"))
        self._protos = {
            name: self._prototypes(embedder, ATTRIBUTES[name].probes, ATTRIBUTES[name].classes)
            for name in self.attributes
        }
        self.version = f"{PROBES_VERSION} on {embedder.version}"
        return self

    @staticmethod
    def _prototypes(embedder: Any, probes: dict[str, tuple[str, ...]], classes: Sequence[str]) -> np.ndarray:
        rows = []
        for cls in classes:
            emb, _ = embedder.embed_texts(list(probes[cls]))
            mean = emb.mean(axis=0)
            rows.append(mean / max(np.linalg.norm(mean), 1e-12))
        return np.stack(rows).astype(np.float64)

    def _softmax(self, image_emb: np.ndarray, protos: np.ndarray) -> np.ndarray:
        logits = self.logit_scale * image_emb.astype(np.float64) @ protos.T
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def score(self, image_emb: np.ndarray) -> list[dict[str, Any]]:
        p_person = self._softmax(image_emb, self._person)[:, 0]
        per_attr = {name: self._softmax(image_emb, protos) for name, protos in self._protos.items()}
        out = []
        for i, pp in enumerate(p_person):
            present = bool(pp >= self.person_threshold)
            row: dict[str, Any] = {"bias_person": float(pp), "bias_person_present": present}
            for name, probs in per_attr.items():
                a = ATTRIBUTES[name]
                for j, cls in enumerate(a.classes):
                    row[f"{a.key}_{cls}"] = float(probs[i, j]) if present else None
            out.append(row)
        return out


# --- set-level formulas ------------------------------------------------------------------------------------------


def gender_imbalance(p_female: float) -> float:
    """HEIM: |P(female) - 0.5|, in [0, 0.5]."""
    return abs(float(p_female) - 0.5)


def skin_tone_imbalance(mst: Sequence[float]) -> float:
    """HEIM: sum over the 10 Monk tones of |P(MST_i) - 0.1|, divided by 10; in [0, 0.18]."""
    if len(mst) != 10:
        raise ValueError(f"skin tone distribution needs 10 values, got {len(mst)}")
    return sum(abs(float(p) - 0.1) for p in mst) / 10


def mean_absolute_deviation(dist: Sequence[float]) -> float:
    """DALL-Eval: mean over the K classes of |p_k - 1/K| (0 for a uniform distribution)."""
    k = len(dist)
    if k == 0:
        raise ValueError("empty distribution")
    return sum(abs(float(p) - 1.0 / k) for p in dist) / k
