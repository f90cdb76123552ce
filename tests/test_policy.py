"""The decision logic on scripted scores (at, just below and just above every threshold), the cascade, fail-closed
scoring, quarantine routing, regenerate-on-flag planning and the spec's validation of scoring/policy keys."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.config import load_spec
from pipeline.errors import SpecError
from pipeline.scoring.policy import (
    PolicyRouter,
    attempt_item_id,
    next_attempt,
    plan_regeneration,
    wants_regeneration,
)
from pipeline.stages.score import Scorer, pixel_problem
from pipeline.stages.write import ImageWriter, image_key
from pipeline.storage import Storage
from schemas.record import Item
from schemas.spec import JobSpec, ScoringSpec, Threshold

EPS = 1e-9
BLOCKED = {"code": "nsfw", "stage": "score", "classifier": "open_nsfw", "action": "block"}
T = {
    "open_nsfw": {"nsfw": Threshold(review=0.3, block=0.8)},
    "clip_head": {"porn": Threshold(review=0.4, block=0.9), "sexy": Threshold(review=0.6)},
    "sd_safety_checker": {"nsfw": Threshold(review=0.5)},
}
# Every (classifier, category, level, threshold) in T.
LEVELS = [(c, cat, lvl, getattr(t, lvl)) for c, cats in T.items() for cat, t in cats.items()
          for lvl in ("review", "block") if getattr(t, lvl) is not None]  # fmt: skip


def _item(**kw) -> Item:
    base = dict(item_id="a" * 32, job="j", prompt_id="p-1", sample_index=0, row_number=1, prompt="a mug", seed=1,
                model="tiny", sampler="euler", steps=2, guidance_scale=5.0, width=8, height=8)  # fmt: skip
    return Item(**{**base, **kw})


def _decide(router: PolicyRouter, nsfw: dict, clipscore: float | None = None) -> Item:
    versions = {c: f"{c}-v1" for c in nsfw}
    reasons = router.nsfw_reasons(nsfw, versions) + router.alignment_reason(clipscore, "clip-v1")
    return router.route(_item(), reasons)


#: Just below a level: below a review level is a pass; below a block level is still above its review level.
BELOW = {"review": "pass", "block": "review"}


@pytest.mark.parametrize(("clf", "cat", "level", "t"), LEVELS, ids=[f"{c}.{k}.{lvl}" for c, k, lvl, _ in LEVELS])
@pytest.mark.parametrize(("delta", "crossed"), [(0.0, True), (-EPS, False), (EPS, True)], ids=["at", "below", "above"])
def test_each_threshold_at_just_below_and_just_above(clf, cat, level, t, delta, crossed):
    score = t + delta
    got = _decide(PolicyRouter(T), {clf: {cat: score}})
    assert got.decision == (level if crossed else BELOW[level])
    if got.decision == "pass":
        assert got.reasons == []
        return
    (reason,) = got.reasons
    assert reason == {
        "code": "nsfw_threshold", "stage": "score", "classifier": clf, "category": cat, "version": f"{clf}-v1",
        "score": score, "threshold": getattr(T[clf][cat], got.decision), "level": got.decision,
        "action": got.decision,
    }  # fmt: skip


@pytest.mark.parametrize(("delta", "decision"), [(0.0, "pass"), (-EPS, "review"), (EPS, "pass")])
def test_clipscore_review_below_threshold(delta, decision):
    router = PolicyRouter(T, review_below_clipscore=0.5)
    got = _decide(router, {"open_nsfw": {"nsfw": 0.0}}, clipscore=0.5 + delta)
    assert got.decision == decision
    if decision == "review":
        assert got.reasons[0]["code"] == "clipscore_below" and got.reasons[0]["threshold"] == 0.5


def test_the_strictest_action_wins_and_every_crossing_is_a_reason():
    got = _decide(PolicyRouter(T), {"open_nsfw": {"nsfw": 0.35}, "clip_head": {"porn": 0.95, "sexy": 0.1}})
    assert got.decision == "block"
    assert [(r["classifier"], r["level"]) for r in got.reasons] == [("open_nsfw", "review"), ("clip_head", "block")]


def test_cascade_all_to_block_needs_every_classifier_with_a_block_level():
    router = PolicyRouter(T, cascade="all_to_block")
    one = _decide(router, {"open_nsfw": {"nsfw": 0.9}, "clip_head": {"porn": 0.1, "sexy": 0.1}})
    assert one.decision == "review" and one.reasons[0]["level"] == "block" and one.reasons[0]["action"] == "review"
    both = _decide(router, {"open_nsfw": {"nsfw": 0.9}, "clip_head": {"porn": 0.95, "sexy": 0.1}})
    assert both.decision == "block"
    # sd_safety_checker has no block level, so it cannot veto; it still sends to review on its own.
    sd = _decide(router, {"sd_safety_checker": {"nsfw": 1.0}, "open_nsfw": {"nsfw": 0.0}})
    assert sd.decision == "review"


def test_a_screen_review_is_kept_by_the_policy():
    item = _item(reasons=[{"code": "prompt_classifier", "stage": "screen", "action": "review"}], decision="review")
    got = PolicyRouter(T).route(item, [])
    assert got.decision == "review" and len(got.reasons) == 1


# --- fail closed on the real Scorer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer():
    s = Scorer(ScoringSpec(bias={"attributes": []}, timeout_s=5))
    s.setup()
    assert s.load_errors == {}
    return s


def _pending(n: int = 2) -> list[Item]:
    rng = np.random.default_rng(1)
    items = [_item(item_id=f"{i:032x}", sample_index=i) for i in range(n)]
    for it in items:
        it.pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return items


def test_a_scorer_exception_gives_review_never_pass(scorer, monkeypatch, tmp_path):
    clf = scorer.classifiers[0]

    def boom(*a, **k):
        raise RuntimeError("model on fire")

    monkeypatch.setattr(clf, "score", boom)
    items = ImageWriter(str(tmp_path)).process(scorer.process(_pending()))
    for it in items:
        assert it.status == "generated" and it.decision == "review"  # kept, stored, held back
        (reason,) = it.reasons
        assert reason["code"] == "scorer_error" and reason["scorer"] == "open_nsfw"
        assert "model on fire" in reason["error"]
        assert "nsfw_open_nsfw" not in it.scores and "clipscore" in it.scores  # other heads still scored
        assert image_key(it).startswith("review/")
    assert all(o.startswith("review/") for o in Storage(str(tmp_path)).walk())


def test_a_scorer_timeout_gives_review(scorer, monkeypatch):
    slow = Scorer.__new__(Scorer)  # the loaded scorer with a short timeout
    slow.__dict__.update(scorer.__dict__)
    slow.scoring = scorer.scoring.model_copy(update={"timeout_s": 0.2})
    monkeypatch.setattr(scorer.classifiers[0], "score", lambda *a, **k: time.sleep(1.0))
    items = slow.process(_pending())
    assert [it.decision for it in items] == ["review", "review"]
    assert all("no result after 0.2 s" in it.reasons[0]["error"] for it in items)


def test_one_bad_image_does_not_hold_back_the_batch(scorer, monkeypatch):
    clf = scorer.classifiers[0]
    real = clf.score

    def picky(pixels, emb):
        if any(p[0, 0, 0] == 7 for p in pixels):
            raise ValueError("cannot read this one")
        return real(pixels, emb)

    monkeypatch.setattr(clf, "score", picky)
    items = _pending(3)
    items[1].pixels[0, 0, 0] = 7
    scorer.process(items)
    assert [it.decision for it in items] == ["pass", "review", "pass"]


@pytest.mark.parametrize(
    ("pixels", "problem"),
    [
        (None, "no pixels"),
        (np.zeros((0, 8, 3), np.uint8), "zero-size"),
        (np.zeros((8, 8, 4), np.uint8), "expected (H, W, 3) RGB"),
        (np.zeros((8, 8), np.uint8), "expected (H, W, 3) RGB"),
        (np.zeros((8, 8, 3), np.float32), "dtype float32"),
        (b"\x89PNG-not-really", "not a numpy array"),
    ],
)
def test_corrupt_zero_size_or_odd_mode_images_are_scorer_errors(scorer, pixels, problem):
    assert problem in pixel_problem(pixels)
    (item,) = _pending(1)
    item.pixels = pixels
    scorer.process([item])
    assert item.decision == "review" and item.status == "pending"
    assert item.reasons[0]["code"] == "scorer_error" and problem in item.reasons[0]["error"]


def test_a_backbone_that_cannot_load_fails_closed(tmp_path):
    from pipeline.models.tiny import ensure_tiny, register_tiny_clip

    arch = register_tiny_clip(ensure_tiny()["clip_config"])  # a real architecture, a corrupt checkpoint
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    s = Scorer(ScoringSpec(clip={"architecture": arch, "pretrained": str(bad)}, bias={"attributes": []}))
    s.setup()
    assert "clip" in s.load_errors
    (item,) = s.process(_pending(1))
    assert item.decision == "review" and "nsfw_open_nsfw" in item.scores  # open_nsfw still ran
    assert {r["scorer"] for r in item.reasons} == {"clip"}


# --- routing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("decision", "prefix"), [(None, "images/"), ("pass", "images/"), ("review", "review/"),
                                                  ("block", "quarantine/")])  # fmt: skip
def test_image_key_picks_the_prefix_from_the_decision(decision, prefix):
    item = _item(decision=decision)
    assert image_key(item).startswith(prefix)
    assert image_key(item, "images").startswith("images/")  # the old explicit-prefix call still works


# --- regenerate-on-flag -------------------------------------------------------------------------------------------


def test_regeneration_plans_a_new_item_with_a_new_seed_and_a_link():
    first = _item(status="generated", decision="block", image_uri="x", scores={"nsfw": 0.9}, reasons=[BLOCKED])
    assert wants_regeneration(first, regenerate_tries=2, regenerate_on=("block",))
    assert not wants_regeneration(first, regenerate_tries=0, regenerate_on=("block",))
    assert not wants_regeneration(first, regenerate_tries=2, regenerate_on=("review",))
    second = next_attempt(first)
    assert second.attempt == 2 and second.status == "pending" and second.decision is None and not second.scores
    assert second.item_id == attempt_item_id(first.item_id, 2) != first.item_id and second.seed != first.seed
    assert second.metadata == {"attempt_of": first.item_id, "regenerated_from": first.item_id}
    second.status, second.decision, second.reasons = "generated", "block", [BLOCKED]
    third = next_attempt(second)
    assert third.attempt == 3 and third.metadata["attempt_of"] == first.item_id
    assert third.metadata["regenerated_from"] == second.item_id and third.seed not in (first.seed, second.seed)
    third.status, third.decision, third.reasons = "generated", "block", [BLOCKED]
    assert wants_regeneration(second, 2, ("block",)) and not wants_regeneration(third, 2, ("block",))
    errored = _item(status="generated", decision="review", reasons=[{"code": "scorer_error", "action": "review"}])
    assert not wants_regeneration(errored, 2, ("review",))
    assert [it.item_id for it in plan_regeneration([first, errored, third], 2, ("block", "review"))] == [
        attempt_item_id(first.item_id, 2)
    ]


def test_a_prompt_screen_flag_is_never_regenerated_away():
    screened = {"code": "prompt_blocklist", "stage": "screen", "rule": "lingerie", "action": "review"}
    failed = {"code": "screen_error", "stage": "screen", "classifier": "c", "action": "review"}
    for flag in (screened, failed):  # a new seed cannot clear what the prompt says, nor a screen that never ran
        item = _item(status="generated", decision="review", image_uri="x", reasons=[dict(flag)])
        assert not wants_regeneration(item, 2, ("review", "block"))
    # Flagged for its pixels too: tried again, and every try carries the prompt's flag (held for review at least);
    # unless the prompt's flag is itself one to regenerate on: then no try could ever pass.
    both = _item(status="generated", decision="block", image_uri="x", reasons=[dict(screened), BLOCKED])
    assert wants_regeneration(both, 2, ("block",)) and not wants_regeneration(both, 2, ("review", "block"))
    retry = next_attempt(both)
    assert retry.reasons == [screened]
    PolicyRouter({"open_nsfw": {"nsfw": Threshold(review=0.3, block=0.8)}}).route(retry, [])
    assert retry.decision == "review"


# --- spec validation ---------------------------------------------------------------------------------------------

BASE = {"name": "j", "manifest": "m.parquet", "output": "out"}


def _problems(scoring=None, policy=None) -> list[str]:
    data = {**BASE, **({"scoring": scoring} if scoring else {}), **({"policy": policy} if policy else {})}
    with pytest.raises(SpecError) as info:
        load_spec(None, base=data)
    return info.value.problems


@pytest.mark.parametrize(
    ("scoring", "policy", "expected"),
    [
        ({"nsfw": {"classifiers": ["nudenet"]}}, None, "scoring.nsfw.classifiers.0: Input should be 'open_nsfw'"),
        ({"bias": {"attributes": ["race"]}}, None, "scoring.bias.attributes.0: Input should be 'person'"),
        ({"nsfw": {"open_nsfw": {"thresholds": {"nsfw": {"review": 1.5}}}}}, None,
         "scoring.nsfw.open_nsfw.thresholds.nsfw.review: Input should be less than or equal to 1"),
        ({"nsfw": {"open_nsfw": {"thresholds": {"nsfw": {"block": -0.1}}}}}, None,
         "scoring.nsfw.open_nsfw.thresholds.nsfw.block: Input should be greater than or equal to 0"),
        ({"nsfw": {"open_nsfw": {"thresholds": {"porn": {"review": 0.5}}}}}, None,
         "scoring.nsfw.open_nsfw.thresholds.porn.[key]: Input should be 'nsfw'"),
        ({"nsfw": {"open_nsfw": {"thresholds": {"nsfw": {"review": 0.9, "block": 0.5}}}}}, None,
         "scoring.nsfw.open_nsfw.thresholds.nsfw: review (0.9) must not be above block (0.5)"),
        ({"nsfw": {"classifiers": ["clip_head"]}}, None, "scoring.nsfw: clip_head.path: required"),
        ({"nsfw": {"classifiers": ["open_nsfw", "open_nsfw"]}}, None, "scoring.nsfw: classifiers: each classifier"),
        ({"bias": {"person_threshold": 2}}, None, "scoring.bias.person_threshold: Input should be less than or equal"),
        ({"bias": {"flag_thresholds": {"height": 0.1}}}, None, "scoring.bias.flag_thresholds.height.[key]"),
        ({"screen": {"classifier": "not a ref"}}, None, "scoring.screen.classifier: String should match pattern"),
        ({"clip": {"archtecture": "x"}}, None, "scoring.clip.archtecture: unknown key"),
        (None, {"on_scorer_error": "pass"}, "policy.on_scorer_error: Input should be 'review'"),
        (None, {"regenerate_tries": 9}, "policy.regenerate_tries: Input should be less than or equal to 5"),
    ],
)  # fmt: skip
def test_bad_scoring_and_policy_keys_fail_naming_the_key(scoring, policy, expected):
    problems = _problems(scoring, policy)
    assert any(p.startswith(expected) for p in problems), problems


def test_scoring_defaults_run_offline_here():
    spec = JobSpec(**BASE)
    assert spec.scoring.enabled and spec.scoring.clip.architecture == "tiny"
    assert spec.scoring.nsfw.classifiers == ("open_nsfw",) and spec.policy.on_scorer_error == "review"


def test_a_regeneration_try_links_to_its_own_first_try_whatever_the_row_metadata_says():
    # A manifest column `attempt_of` landed in metadata and made tries of different rows share ids (a lost record).
    from schemas.manifest import parse_row

    assert parse_row({"prompt_id": "a", "prompt": "a mug", "attempt_of": "X"}) == [
        "attempt_of: a column name genpipe reserves for regeneration links; rename the column"
    ]
    a, b = (Item(item_id=i * 32, job="j", prompt_id=i, sample_index=0, row_number=n, prompt="a mug", seed=1,
                 metadata={"attempt_of": "X"}) for n, i in enumerate("ab"))  # fmt: skip
    assert next_attempt(a).item_id != next_attempt(b).item_id
    assert next_attempt(a).metadata["attempt_of"] == a.item_id
