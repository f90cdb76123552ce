"""PolicyRouter: scores → decision (``pass`` / ``review`` / ``block``) with machine-readable reasons.

A category crosses a level when its score is **at or above** the threshold (CLIPScore: strictly below
``review_below``). Every reason names the score, the threshold, the classifier and its version, the level crossed
and the action it led to. The decision is the most severe action among the item's reasons, including any set
earlier (a prompt-screen ``review``). Fail closed: a scorer error is a ``review`` reason, never a pass.

Regenerate-on-flag is planned here (``wants_regeneration`` / ``next_attempt``) and executed by the runner: a new
item per try, with its own id, a new derived seed and a link to the item it replaces; nothing is overwritten.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from pipeline.identity import derived_seed
from schemas.record import Item

SEVERITY = {"pass": 0, "review": 1, "block": 2}
POLICY_VERSION = "policy-v1"


def most_severe(actions: list[str]) -> str:
    return max(actions, key=SEVERITY.__getitem__, default="pass")


class PolicyRouter:
    """``thresholds``: classifier → category → object with ``review`` / ``block`` (a ``schemas.spec.Threshold``)."""

    def __init__(
        self,
        thresholds: dict[str, dict[str, Any]],
        cascade: str = "any",
        review_below_clipscore: float | None = None,
    ) -> None:
        if cascade not in ("any", "all_to_block"):
            raise ValueError(f"scoring.nsfw.cascade: unknown cascade {cascade!r}")
        self.thresholds, self.cascade, self.review_below = thresholds, cascade, review_below_clipscore

    @classmethod
    def from_spec(cls, scoring: Any) -> PolicyRouter:
        nsfw = scoring.nsfw
        thresholds = {name: dict(getattr(nsfw, name).thresholds) for name in nsfw.classifiers}
        return cls(thresholds, nsfw.cascade, scoring.alignment.review_below)

    def thresholds_record(self) -> dict[str, dict[str, float | None]]:
        """``{"open_nsfw.nsfw": {"review": .3, "block": .8}, ...}``, recorded in ``scores.thresholds``."""
        out = {f"{c}.{cat}": {"review": t.review, "block": t.block} for c, cats in self.thresholds.items()
               for cat, t in cats.items()}  # fmt: skip
        if self.review_below is not None:
            out["clip.clipscore_below"] = {"review": self.review_below, "block": None}
        return out

    def nsfw_reasons(self, nsfw: dict[str, dict[str, float]], versions: dict[str, str]) -> list[dict[str, Any]]:
        """One reason per (classifier, category) that crossed a level: the highest level it crossed."""
        reasons = []
        for clf, cats in nsfw.items():
            for cat, score in cats.items():
                t = self.thresholds.get(clf, {}).get(cat)
                if t is None:
                    continue
                level, threshold = None, None
                if t.block is not None and score >= t.block:
                    level, threshold = "block", t.block
                elif t.review is not None and score >= t.review:
                    level, threshold = "review", t.review
                if level:
                    reasons.append({
                        "code": "nsfw_threshold", "stage": "score", "classifier": clf, "category": cat,
                        "version": versions.get(clf), "score": float(score), "threshold": threshold,
                        "level": level, "action": level,
                    })  # fmt: skip
        if self.cascade == "all_to_block":
            self._confirm_blocks(reasons, nsfw)
        return reasons

    def _confirm_blocks(self, reasons: list[dict[str, Any]], nsfw: dict[str, dict[str, float]]) -> None:
        """``all_to_block``: a block stands only when every classifier that has a block level (and was scored)
        crossed one; otherwise block-level crossings are held for review."""
        with_block = [c for c in nsfw if any(t.block is not None for t in self.thresholds.get(c, {}).values())]
        blocking = {r["classifier"] for r in reasons if r["level"] == "block"}
        confirmed = bool(with_block) and all(c in blocking for c in with_block)
        if not confirmed:
            for r in reasons:
                if r["action"] == "block":
                    r["action"] = "review"
                    r["note"] = "block not confirmed by every classifier (cascade all_to_block)"

    def alignment_reason(self, clipscore: float | None, clip_version: str) -> list[dict[str, Any]]:
        if self.review_below is None or clipscore is None or clipscore >= self.review_below:
            return []
        return [{
            "code": "clipscore_below", "stage": "score", "classifier": "clip", "version": clip_version,
            "score": float(clipscore), "threshold": self.review_below, "level": "review", "action": "review",
        }]  # fmt: skip

    def route(self, item: Item, reasons: list[dict[str, Any]]) -> Item:
        """Replace this stage's earlier reasons (a retried batch) with ``reasons`` and set the decision from all
        the item's reasons."""
        kept = [r for r in item.reasons if r.get("stage") != "score"]
        item.reasons = kept + reasons
        item.decision = most_severe([r["action"] for r in item.reasons if r.get("action") in SEVERITY])
        return item


def scorer_error(scorer: str, version: str | None, exc: BaseException | str) -> dict[str, Any]:
    error = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return {"code": "scorer_error", "stage": "score", "scorer": scorer, "version": version,
            "error": error[:500], "action": "review"}  # fmt: skip


# --- regenerate-on-flag -----------------------------------------------------------------------------------------


def wants_regeneration(item: Item, regenerate_tries: int, regenerate_on: tuple[str, ...]) -> bool:
    """A generated item flagged for its pixels (not for a scorer error, nor only for its prompt: a new seed
    cannot clear a prompt-screen flag) whose attempt count leaves tries to spend."""
    if item.status != "generated" or item.decision not in regenerate_on:
        return False
    if any(r.get("code") == "scorer_error" for r in item.reasons):
        return False
    # Every try carries the prompt screen's findings, so no try decides below them: when that floor is itself a
    # decision to regenerate on, or the whole decision, a new seed cannot help.
    floor = most_severe(
        [r["action"] for r in item.reasons if r.get("stage") == "screen" and r.get("action") in SEVERITY]
    )
    if floor in regenerate_on or SEVERITY[floor] >= SEVERITY[item.decision]:
        return False
    return item.attempt <= regenerate_tries


def attempt_item_id(root_item_id: str, attempt: int) -> str:
    """Deterministic id of try ``attempt`` (>= 2) of an item, so a resumed run finds it again."""
    return hashlib.sha256(f"{root_item_id}:attempt:{attempt}".encode()).hexdigest()[:32]


def next_attempt(item: Item) -> Item:
    """The pending item for the next try: same prompt and parameters, new id and derived seed, linked to the
    flagged item (``metadata.regenerated_from``) and to the first try (``metadata.attempt_of``)."""
    root = item.metadata["attempt_of"] if item.attempt > 1 else item.item_id
    attempt = item.attempt + 1
    return replace(
        item,
        item_id=attempt_item_id(root, attempt),
        attempt=attempt,
        seed=derived_seed(root, attempt),
        seed_source="derived",
        metadata={**item.metadata, "attempt_of": root, "regenerated_from": item.item_id},
        status="pending",
        decision=None,
        # The prompt screen's findings are the prompt's, so every try carries them (and is held at least as they
        # say); the pixels' findings are the flagged try's own.
        reasons=[dict(r) for r in item.reasons if r.get("stage") == "screen"],
        image_uri=None,
        image_sha256=None,
        scores={},
        timings={},
        error=None,
        pixels=None,
        lora=list(item.lora),
        tags=list(item.tags),
    )


def plan_regeneration(items: Iterable[Item], regenerate_tries: int, regenerate_on: tuple[str, ...]) -> list[Item]:
    """The next try of every item in ``items`` that wants one (``policy.regenerate_tries`` / ``regenerate_on``)."""
    return [next_attempt(it) for it in items if wants_regeneration(it, regenerate_tries, regenerate_on)]
