"""Scorer: one stage that embeds each image once with CLIP, runs the heads on that embedding (alignment, NSFW,
bias) plus any pixel classifiers (open_nsfw), and routes the item with the policy.

One stage, not four, so the embedding never crosses a process boundary and "one CLIP forward per image" holds
by construction; the parts stay small classes in ``pipeline.scoring``. It runs between the generator and the
writer, on ``item.pixels`` (exactly the pixels the writer encodes), in its own actor pool on Ray.

Fail closed, never drop: each part runs under a timeout, a batch that raises is retried item by item, and an
item whose part failed (or whose pixels are unusable) gets a ``scorer_error`` reason and a ``review`` decision.
The stage itself never raises, so the executor never turns scored pixels into a ``failed`` item.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.scoring.alignment import AlignmentHead
from pipeline.scoring.bias import BiasScorer
from pipeline.scoring.clip import ClipEmbedder
from pipeline.scoring.nsfw import ClipNsfwHead, NsfwClassifier, build_classifiers
from pipeline.scoring.policy import POLICY_VERSION, PolicyRouter, most_severe, scorer_error
from pipeline.stages.base import Resources, Stage
from schemas.record import Item
from schemas.spec import JobSpec, ScoringSpec

#: Loading a large backbone (ViT-L / ViT-H from disk, onto a GPU) takes far longer than scoring a batch.
LOAD_TIMEOUT_S = 900.0


class ScorerTimeout(TimeoutError):
    pass


def call_with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    """``fn()`` in a daemon thread; ``ScorerTimeout`` if it has not returned after ``timeout_s``. A timed-out
    call cannot be killed: its thread finishes (or hangs) in the background while the batch moves on."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="genpipe-scorer-call")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ScorerTimeout(f"no result after {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def pixel_problem(pixels: Any) -> str | None:
    """Why these pixels cannot be scored (and should not be published unseen), or None."""
    if pixels is None:
        return "no pixels"
    if not isinstance(pixels, np.ndarray):
        return f"pixels are {type(pixels).__name__}, not a numpy array"
    if pixels.dtype != np.uint8:
        return f"pixels have dtype {pixels.dtype}, expected uint8"
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        return f"pixels have shape {tuple(pixels.shape)}, expected (H, W, 3) RGB"
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        return f"zero-size image {tuple(pixels.shape)}"
    return None


class Scorer(Stage):
    """Adds ``scores``, ``decision`` and ``reasons`` to each pending item (see ``pipeline/scoring/README.md``)."""

    name = "score"

    def __init__(self, scoring: ScoringSpec, resources: Resources | None = None) -> None:
        self.scoring = scoring
        self.resources = resources or Resources(num_cpus=scoring.cpus_per_actor, concurrency=scoring.actors)
        self._loaded = False

    def __getstate__(self) -> dict[str, Any]:
        # Ship the recipe, never loaded models: each worker loads its own copy in setup().
        return {"scoring": self.scoring, "resources": self.resources, "_loaded": False}

    # --- set-up on the worker ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load CLIP, the classifiers and the probes once. A part that fails to load is recorded, not raised:
        every item then gets a ``scorer_error`` for it (fail closed) while the other parts still score."""
        if self._loaded:
            return
        import torch

        use_cuda = torch.cuda.is_available() and self.resources.num_gpus > 0
        self.device = "cuda" if use_cuda else "cpu"
        # As many threads as the declared CPUs (at least one) for the ONNX sessions, in every executor: in the local
        # executor the scorer runs beside the generator, and a session sized to the whole machine would take the
        # generator's core. torch's pool is process-wide, so it is only set inside a Ray actor (the process is ours).
        threads = max(1, int(self.resources.num_cpus))
        if _in_ray_actor() and not use_cuda:
            torch.set_num_threads(threads)
        self.load_errors: dict[str, str] = {}
        self.versions: dict[str, str] = {"policy": POLICY_VERSION}
        self.router = PolicyRouter.from_spec(self.scoring)
        self.alignment = AlignmentHead()
        clip = ClipEmbedder(self.scoring.clip)
        self.embedder: ClipEmbedder | None = self._load("clip", lambda: clip.load(self.device))
        if self.embedder is not None:
            self.versions["clip"] = self.embedder.version
        self.classifiers: list[NsfwClassifier] = []
        for clf in build_classifiers(self.scoring.nsfw):
            loaded = self._load(clf.name, lambda clf=clf: self._load_classifier(clf, threads))
            if loaded is not None:
                self.classifiers.append(loaded)
                self.versions[clf.name] = loaded.version
        self.bias: BiasScorer | None = None
        if self.scoring.bias.attributes:
            if self.embedder is None:
                self.load_errors["bias"] = "CLIP did not load"
            else:
                b = BiasScorer(self.scoring.bias.attributes, self.scoring.bias.person_threshold)
                self.bias = self._load("bias", lambda: b.load(self.embedder))
                if self.bias is not None:
                    self.versions["bias"] = self.bias.version
        self._loaded = True

    def _load(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            return call_with_timeout(fn, max(self.scoring.timeout_s, LOAD_TIMEOUT_S))
        except Exception as exc:
            self.load_errors[name] = f"load failed: {type(exc).__name__}: {exc}"[:500]
            return None

    def _load_classifier(self, clf: NsfwClassifier, threads: int | None) -> NsfwClassifier:
        clf.load(self.device, threads)
        if isinstance(clf, ClipNsfwHead):
            if self.embedder is None:
                raise RuntimeError("CLIP did not load")
            dim = int(self.embedder.embed_images([np.zeros((8, 8, 3), np.uint8)]).shape[1])
            clf.check_backbone(dim, self.embedder.name)
        return clf

    # --- the batch method -------------------------------------------------------------------------------------
    def process(self, items: list[Item]) -> list[Item]:
        pending = [it for it in items if it.status == "pending"]
        if not pending:
            return items
        start = time.perf_counter()
        try:
            self.setup()
            self._score(pending)
        except Exception as exc:  # a bug here must still fail closed and keep the pixels
            for it in pending:
                _route_error(it, scorer_error("score", POLICY_VERSION, exc))
        per_item = (time.perf_counter() - start) / len(pending)
        for it in pending:
            it.timings["score_s"] = round(per_item, 6)
        return items

    def _score(self, items: list[Item]) -> None:
        errors: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(items))}
        scores: dict[int, dict[str, Any]] = {i: {} for i in range(len(items))}
        nsfw: dict[int, dict[str, dict[str, float]]] = {i: {} for i in range(len(items))}
        for name, message in self.load_errors.items():
            for i in errors:
                errors[i].append(scorer_error(name, self.versions.get(name), message))
        ok = []
        for i, it in enumerate(items):
            problem = pixel_problem(it.pixels)
            if problem:
                errors[i].append(scorer_error("input", None, f"unusable image: {problem}"))
            else:
                ok.append(i)
        pixels = {i: items[i].pixels for i in ok}

        # 1. CLIP, once per image (and once per distinct prompt).
        img_emb: dict[int, np.ndarray] = {}
        if self.embedder is not None and ok:
            got = self._guarded("clip", lambda idx: self._embed([items[i] for i in idx], [pixels[i] for i in idx]),
                                ok, errors)  # fmt: skip
            for i, row in got.items():
                img_emb[i], txt, info = row
                items[i].metadata.update(
                    prompt_truncated=info.truncated, clip_prompt_tokens=info.tokens,
                    clip_context_length=info.context_length,
                )  # fmt: skip
                (align,) = self.alignment.score(img_emb[i][None], txt[None])
                if not all(math.isfinite(v) for v in align.values()):
                    errors[i].append(scorer_error("clip", self.versions.get("clip"), "non-finite embedding"))
                    del img_emb[i]
                    continue
                scores[i].update(clip_model=self.embedder.name, **align)

        # 2. NSFW classifiers: pixel classifiers on every usable image, embedding heads where CLIP succeeded.
        for clf in self.classifiers:
            idx = [i for i in ok if i in img_emb] if clf.needs_embedding else ok
            for i in set(ok) - set(idx):
                errors[i].append(scorer_error(clf.name, clf.version, "no CLIP embedding for this image"))
            got = self._guarded(clf.name, lambda idx, clf=clf: self._nsfw(clf, idx, pixels, img_emb), idx, errors)
            for i, result in got.items():
                nsfw[i][clf.name] = result.categories
                scores[i].update(_nsfw_keys(clf, result))

        # 3. Bias probes on the same embeddings.
        if self.bias is not None:
            idx = [i for i in ok if i in img_emb]
            for i in set(ok) - set(idx):
                errors[i].append(scorer_error("bias", self.versions.get("bias"), "no CLIP embedding for this image"))
            got = self._guarded("bias", lambda idx: self._bias(idx, img_emb), idx, errors)
            for i, row in got.items():
                scores[i].update(row)

        # 4. Policy.
        thresholds = self.router.thresholds_record()
        for i, it in enumerate(items):
            figures = [max(cats.values()) for cats in nsfw[i].values() if cats]
            if figures:  # the figure of merit: the highest score any classifier gave
                scores[i]["nsfw"] = max(figures)
            it.scores = {**it.scores, **scores[i], "versions": dict(self.versions), "thresholds": thresholds}
            reasons = self.router.nsfw_reasons(nsfw[i], self.versions)
            reasons += self.router.alignment_reason(scores[i].get("clipscore"), self.versions.get("clip", ""))
            self.router.route(it, reasons + errors[i])

    # --- the parts, each on a list of indices -----------------------------------------------------------------
    def _embed(self, items: list[Item], pixels: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, Any]]:
        assert self.embedder is not None
        images = self.embedder.embed_images(pixels)
        prompts = list(dict.fromkeys(it.prompt for it in items))
        texts, infos = self.embedder.embed_texts(prompts)
        row = {p: k for k, p in enumerate(prompts)}
        return [(images[n], texts[row[it.prompt]], infos[row[it.prompt]]) for n, it in enumerate(items)]

    def _nsfw(self, clf: NsfwClassifier, idx: list[int], pixels: dict, img_emb: dict) -> list[Any]:
        emb = np.stack([img_emb[i] for i in idx]) if clf.needs_embedding else None
        results = clf.score([pixels[i] for i in idx], emb)
        for r in results:
            bad = {c: v for c, v in r.categories.items() if not (math.isfinite(v) and 0.0 <= v <= 1.0)}
            if bad:
                raise ValueError(f"scores outside [0, 1]: {bad}")
        return results

    def _bias(self, idx: list[int], img_emb: dict) -> list[dict[str, Any]]:
        assert self.bias is not None
        rows = self.bias.score(np.stack([img_emb[i] for i in idx]))
        for r in rows:
            if any(isinstance(v, float) and not math.isfinite(v) for v in r.values()):
                raise ValueError("non-finite probability")
        return rows

    def _guarded(self, name: str, fn: Callable[[list[int]], list[Any]], idx: list[int],
                 errors: dict[int, list[dict[str, Any]]]) -> dict[int, Any]:  # fmt: skip
        """``fn(idx)`` under the timeout. If the batch raises, each item is retried alone so one bad image does
        not hold back the rest; a timeout is not retried (it would cost a timeout per item)."""
        if not idx:
            return {}
        version = self.versions.get(name)
        try:
            out = call_with_timeout(lambda: fn(idx), self.scoring.timeout_s)
            if len(out) != len(idx):
                raise RuntimeError(f"{name} returned {len(out)} results for {len(idx)} images")
            return dict(zip(idx, out, strict=True))
        except ScorerTimeout as exc:
            for i in idx:
                errors[i].append(scorer_error(name, version, exc))
            return {}
        except Exception as exc:
            if len(idx) == 1:
                errors[idx[0]].append(scorer_error(name, version, exc))
                return {}
        got: dict[int, Any] = {}
        for i in idx:
            got.update(self._guarded(name, fn, [i], errors))
        return got


def _nsfw_keys(clf: NsfwClassifier, result: Any) -> dict[str, Any]:
    """``nsfw_<clf>`` (the classifier's figure: max over its categories), ``nsfw_<clf>_<category>`` for every
    category other than a lone ``nsfw``, and ``nsfw_<clf>_<extra>`` detail."""
    cats = result.categories
    out: dict[str, Any] = {f"nsfw_{clf.name}": max(cats.values())}
    if list(cats) != ["nsfw"]:
        out.update({f"nsfw_{clf.name}_{c}": v for c, v in cats.items()})
    out.update({f"nsfw_{clf.name}_{k}": v for k, v in result.extra.items()})
    return out


def _route_error(item: Item, reason: dict[str, Any]) -> None:
    item.reasons = [r for r in item.reasons if r.get("stage") != "score"] + [reason]
    item.decision = most_severe([r["action"] for r in item.reasons if r.get("action")])


def _in_ray_actor() -> bool:
    ray = sys.modules.get("ray")  # a Ray worker has imported it already; never import Ray just to ask
    if ray is None or not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().get_actor_id() is not None
    except Exception:
        return False


def build_scoring_stages(spec: JobSpec) -> list[Stage]:
    """The stages to run between the generator and the writer: ``[Scorer]``, or none with scoring off. Scorer
    actors take ``resources.scorer_gpu_fraction`` of a GPU when the job's generators use GPUs, else run on CPU."""
    scoring = spec.scoring
    if not scoring.enabled:
        return []
    res = spec.resources
    gpus = res.scorer_gpu_fraction if res.gpus_per_actor > 0 else 0.0
    resources = Resources(num_cpus=scoring.cpus_per_actor, num_gpus=gpus, concurrency=scoring.actors)
    return [Scorer(scoring, resources)]
