"""AlignmentHead: text-image alignment from the stored CLIP embeddings, and best-of-k ranks per prompt.

CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning") is
``w * max(cos(E_image, E_text), 0)`` with ``w = 2.5``; the raw cosine is kept next to it. Ranks are set-level
(they need every sample of a prompt), so they are computed from the audit records at the end of a job
(``rank_job``) rather than inside a batch, where the samples of one prompt rarely travel together.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from schemas.record import Item

CLIPSCORE_WEIGHT = 2.5


def clipscore(cosine: float) -> float:
    return CLIPSCORE_WEIGHT * max(float(cosine), 0.0)


class AlignmentHead:
    """Cosine and CLIPScore of each image against its own prompt."""

    name = "clip_alignment"

    def score(self, image_emb: np.ndarray, text_emb: np.ndarray) -> list[dict[str, float]]:
        """Row i of ``image_emb`` against row i of ``text_emb`` (both unit norm)."""
        cos = np.einsum("nd,nd->n", image_emb.astype(np.float64), text_emb.astype(np.float64))
        return [{"clip_cosine": float(c), "clipscore": clipscore(c)} for c in cos]


# --- best-of-k ----------------------------------------------------------------------------------------------


def best_of_k_ranks(items: Iterable[Item]) -> dict[str, dict[str, int]]:
    """``item_id → {"clip_rank": r, "clip_k": k}`` for every scored, generated item: rank 1 is the sample of its
    prompt (job, prompt_id, attempt chain included) with the highest CLIPScore; ties go to the lower sample index.
    Memory: one small tuple per scored item."""
    groups: dict[tuple[str, str], list[tuple[float, int, str]]] = defaultdict(list)
    for it in items:
        score = it.scores.get("clipscore") if it.status == "generated" else None
        if isinstance(score, int | float):
            groups[(it.job, it.prompt_id)].append((-float(score), it.sample_index, it.item_id))
    ranks: dict[str, dict[str, int]] = {}
    for members in groups.values():
        members.sort()
        for r, (_, _, iid) in enumerate(members, start=1):
            ranks[iid] = {"clip_rank": r, "clip_k": len(members)}
    return ranks


def apply_ranks(items: Iterable[Item], ranks: dict[str, dict[str, int]]) -> list[Item]:
    """Set ``scores.clip_rank`` / ``scores.clip_k`` from ``ranks``; returns the items whose values changed."""
    changed = []
    for it in items:
        new = ranks.get(it.item_id)
        if new is None:
            continue
        if any(it.scores.get(k) != v for k, v in new.items()):
            it.scores = {**it.scores, **new}
            changed.append(it)
    return changed


def rank_job(store: Any, job: str, run_id: int | None, batch: int = 500) -> int:
    """Compute best-of-k ranks over every record of ``job`` in ``store`` (an ``AuditStore``) and write back the
    records whose rank changed. Two streamed passes; returns the number of records updated."""
    ranks = best_of_k_ranks(store.iter_items(job, batch=batch))
    updated, pending = 0, []
    for it in store.iter_items(job, batch=batch):
        pending.extend(apply_ranks([it], ranks))
        if len(pending) >= batch:
            store.write_items(pending, run_id)
            updated, pending = updated + len(pending), []
    if pending:
        store.write_items(pending, run_id)
        updated += len(pending)
    return updated
