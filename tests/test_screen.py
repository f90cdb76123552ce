"""Prompt screening: obfuscated variants of every blocklisted term are caught, benign e-commerce prompts are not
(false-positive rate measured on the bundled list of 280 prompts), blocked items are never generated."""

from __future__ import annotations

import os

import pytest

from pipeline.errors import SpecError
from pipeline.scoring.check import check_scoring
from pipeline.scoring.screen import Blocklist, PromptScreen, _Matcher, normalized_variants
from schemas.record import Item
from schemas.spec import JobSpec

BENIGN = os.path.join(os.path.dirname(__file__), "..", "pipeline", "scoring", "data", "benign_prompts.txt")
#: Asserted bound on the false-positive rate; the measured rate is in pipeline/scoring/README.md.
MAX_FPR = 0.01

_LEET = str.maketrans({"o": "0", "i": "1", "e": "3", "a": "4", "s": "5", "t": "7"})
_CYRILLIC = str.maketrans({"o": "о", "a": "а", "e": "е", "p": "р", "c": "с", "x": "х", "y": "у"})
OBFUSCATIONS = {
    "upper": str.upper,
    "leet": lambda w: w.translate(_LEET),
    "spaced": lambda w: " ".join(w),
    "dotted": lambda w: ".".join(w),
    "dashed": lambda w: "-".join(w),
    "zero_width": lambda w: "\u200b".join(w),
    "cyrillic": lambda w: w.translate(_CYRILLIC),
    "fullwidth": lambda w: "".join(chr(ord(c) + 0xFEE0) if "a" <= c <= "z" else c for c in w),
    "accents": lambda w: "".join(c + "\u0301" if c != " " else c for c in w),
    "stretched": lambda w: w[0] + w[1] * 3 + w[2:],
    "split": lambda w: w[: len(w) // 2] + " " + w[len(w) // 2 :],
    "symbols": lambda w: w.replace("a", "@").replace("s", "$").replace("i", "!"),
    "mixed": lambda w: "".join(c.upper() if k % 2 else c for k, c in enumerate(w)).replace("o", "0").replace("O", "0"),
}


@pytest.fixture(scope="module")
def screen() -> PromptScreen:
    return PromptScreen()


def benign_prompts() -> list[str]:
    with open(BENIGN, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("kind", sorted(OBFUSCATIONS))
def test_obfuscated_variants_of_every_blocklisted_term_are_caught(screen, kind):
    missed = []
    for rule in Blocklist.load().rules:
        variant = OBFUSCATIONS[kind](rule.term.rstrip("*"))
        if variant.isdigit():  # `tits` → `7175` is a number, not leetspeak: see the SKU tests below
            continue
        hits = screen.check(f"studio photo of {variant}, high detail")
        if rule.category not in {m.rule.category for m in hits}:
            missed.append(variant)
    assert not missed, missed


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("a p0rn0graphic poster", "sexual:porn*"),
        ("P-O-R-N", "sexual:porn*"),
        ("pоrn (Cyrillic o)", "sexual:porn*"),
        ("ｎｓｆｗ", "sexual:nsfw"),
        ("s\u00adex toys", "sexual:sex"),
        ("n u d i t y everywhere", "sexual:nudity"),
        ("$3X shop", "sexual:sex"),
        ("blow job", "sexual:blowjob*"),
        ("self-harm awareness", "self_harm:self harm"),
        ("a child-pornography ring", "minors_sexual:child porn*"),
        ("a n@z! rally", "extremism:nazi*"),
    ],
)
def test_known_obfuscations(screen, text, rule):
    assert rule in {m.rule.name for m in screen.check(text)}


@pytest.mark.parametrize(
    "text",
    ["a minimalist analog watch", "grape juice", "rapeseed oil", "a Middlesex jersey", "Gore-Tex jacket",
     "a pussy willow branch", "cumin seeds", "a digital pedometer", "a therapist office", "an XXL hoodie",
     "50% off sale!!!", "a banana cream pie", "a hen with tail feathers", "shot glasses", "sextant"],
)  # fmt: skip
def test_substring_lookalikes_are_not_blocked(screen, text):
    assert screen.check(text) == ()


@pytest.mark.parametrize(
    "text",
    ["wrist watch 1011, studio product shot", "denim jacket 7175", "denim jacket 7175, flat lay, pastel colours",
     "running shoe 10111, lifestyle photo", "a mug, 80085 in stock", "denim jacket 7175 S", "wrist watch 1011 L",
     "collection 7175 SS", "SKU-1011 watch", "sku 7175-b jacket", "item #1011", "1,011 units", "10.11 price",
     "$1011 watch", "save 1011!", "1 0 1 1", "7.1.7.5", "71 75", "4k tv 7175", "pussy willow 1011"],
)  # fmt: skip
def test_sku_like_numbers_are_not_read_as_leetspeak(screen, text):
    assert screen.check(text) == ()


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("l0li", "minors_sexual:loli"),
        ("t1ts", "sexual:tits"),
        ("t!ts", "sexual:tits"),
        ("n4ked woman", "sexual:naked woman"),
        ("n4k3d w0m4n 1011", "sexual:naked woman"),
        ("l0 l1", "minors_sexual:loli"),
        ("t1 75", "sexual:tits"),  # half its letters are letters
        ("5 3 x", "sexual:sex"),  # spelled out: one letter is enough
        ("t 1 t s", "sexual:tits"),
        ("p.0.r.n", "sexual:porn*"),
        ("5ex shop 7175", "sexual:sex"),
        ("5u1c1d3", "self_harm:suicide"),
        ("1515 fl4g", "extremism:isis flag"),
        ("sku 7175 p0rn", "sexual:porn*"),
    ],
)
def test_leetspeak_mixing_letters_and_digits_still_blocks(screen, text, rule):
    assert rule in {m.rule.name for m in screen.check(text)}


def test_synthetic_catalogue_prompts_pass(screen):
    # benchmarks/manifest_scale.py's prompts: 14 of these 20,000 were blocked when SKUs were read as leetspeak.
    subjects = ("leather handbag", "running shoe", "ceramic mug", "wrist watch", "desk lamp", "denim jacket")
    styles = ("studio product shot, white background", "lifestyle photo, morning light", "flat lay, pastel colours")
    prompts = [f"{subjects[i % 6]} {i}, {styles[i % 3]}" for i in range(20_000)]
    assert [p for p in prompts if screen.check(p)] == []


def test_window_pruning_loses_no_match():
    # Windows stop growing once the joined words are no prefix of any term; without the cut-off the matches
    # (rule, text, span) must be the same.
    pruned, full = _Matcher(Blocklist.load()), _Matcher(Blocklist.load())
    full._may_extend = lambda cat, sq=None: True  # type: ignore[method-assign]
    texts = [f"studio photo of {f(rule.term.rstrip('*'))} and {f(rule.term.rstrip('*'))}s, b 0 0 b bbbs"
             for rule in Blocklist.load().rules for f in OBFUSCATIONS.values()]  # fmt: skip
    texts += ["p o o o r n", "bob bbbs", "s e e e l f harm", "child p o r n o g r a p h y", "hen tail", "blow jobs"]
    for text in texts:
        for words in normalized_variants(text):
            assert pruned.find(words) == full.find(words), text


def test_false_positive_rate_on_benign_ecommerce_prompts(screen):
    prompts = benign_prompts()
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    flagged = [(p, [m.rule.name for m in screen.check(p)]) for p in prompts]
    flagged = [f for f in flagged if f[1]]
    fpr = len(flagged) / len(prompts)
    print(f"\nscreen false-positive rate: {len(flagged)}/{len(prompts)} = {fpr:.4f}")
    assert fpr <= MAX_FPR, flagged


def test_normalisation_undoes_case_width_accents_and_zero_width(screen):
    assert ["porn"] in normalized_variants("ＰÓ\u200bRN")
    assert normalized_variants("Kill") == [["kiii"]]  # l and i fold together: `k1ll` reads the same


def _items(*prompts: str) -> list[Item]:
    return [Item(item_id=f"{i:032x}", job="j", prompt_id=f"p{i}", sample_index=0, row_number=i, prompt=p,
                 negative_prompt="nsfw, nude, blurry") for i, p in enumerate(prompts)]  # fmt: skip


def test_screen_marks_blocked_items_with_the_rule_and_leaves_others_alone(screen):
    ok, bad, rejected = _items("a white sneaker on a pedestal", "a pr0n poster", "whatever")
    rejected.status = "rejected"
    out = screen.screen([ok, bad, rejected])
    assert out == [ok, bad, rejected]
    assert ok.status == "pending" and ok.decision is None and ok.reasons == []  # negative prompt is not screened
    assert rejected.status == "rejected" and rejected.reasons == []
    assert bad.status == "blocked" and bad.decision == "block" and bad.pixels is None
    (reason,) = bad.reasons
    assert reason == {"code": "prompt_blocklist", "stage": "screen", "rule": "sexual:pron", "category": "sexual",
                      "term": "pron", "matched": "pron", "field": "prompt", "version": "genpipe-default-2",
                      "action": "block"}  # fmt: skip


class _Classifier:
    name, version = "toy-text-clf", "1"

    def __init__(self, scores):
        self.scores = scores

    def score(self, texts):
        return [self.scores[t] for t in texts]


def test_classifier_hook_acts_at_its_threshold_and_fails_closed():
    a, b, c = _items("a mug", "a lamp", "a sofa")
    screen = PromptScreen(classifier=_Classifier({"a mug": 0.49, "a lamp": 0.5, "a sofa": float("nan")}),
                          classifier_threshold=0.5, classifier_action="block")  # fmt: skip
    screen.screen([a, b, c])
    assert a.status == "pending" and a.decision is None
    assert b.status == "blocked" and b.reasons[0]["code"] == "prompt_classifier" and b.reasons[0]["score"] == 0.5
    assert c.status == "pending" and c.decision == "review"  # NaN: not trusted, held for review

    class Broken(_Classifier):
        def score(self, texts):
            raise TimeoutError("classifier down")

    (d,) = _items("a chair")
    PromptScreen(classifier=Broken({})).screen([d])
    assert d.status == "pending" and d.decision == "review" and d.reasons[0]["code"] == "screen_error"


def test_a_custom_blocklist_extends_the_default_and_is_checked_before_launch(tmp_path):
    own = tmp_path / "brand.yaml"
    own.write_text("version: brand-1\ncategories:\n  competitors:\n    action: review\n    terms: [acme*]\n")
    spec = JobSpec(name="j", manifest="m", output="o", scoring={"screen": {"blocklist": str(own)}})
    screen = PromptScreen.from_spec(spec)
    assert screen.blocklist.version == "genpipe-default-2+brand-1"
    (item,) = _items("an ACME-branded anvil")
    screen.screen([item])
    assert item.status == "pending" and item.decision == "review"
    assert {m.rule.name for m in screen.check("p0rn")} == {"sexual:porn*"}
    own.write_text("categories: [oops]\n")
    with pytest.raises(SpecError) as info:
        check_scoring(spec)
    assert info.value.problems[0].startswith("scoring.screen.blocklist:")
    off = JobSpec(name="j", manifest="m", output="o", scoring={"screen": {"enabled": False}})
    assert PromptScreen.from_spec(off) is None


class _NoScore:
    pass


def broken_factory():
    raise ConnectionError("the moderation service is down")


def no_score_factory():
    return _NoScore()


def test_bad_screen_settings_are_named_before_launch(tmp_path):
    def problems(screen: dict) -> list[str]:
        spec = JobSpec.model_validate({"name": "j", "manifest": "m.parquet", "output": "o",
                                       "scoring": {"screen": screen}})  # fmt: skip
        with pytest.raises(SpecError) as err:
            check_scoring(spec)
        return err.value.problems

    (tmp_path / "bad.yaml").write_text("categories: [unclosed\n")
    (tmp_path / "allow.yaml").write_text("categories: {x: {terms: [foo]}}\nallow: 5\n")
    assert problems({"blocklist": str(tmp_path / "bad.yaml")})[0].startswith(
        f"scoring.screen.blocklist: {tmp_path / 'bad.yaml'}: not valid YAML"
    )
    assert problems({"blocklist": str(tmp_path / "allow.yaml")}) == [
        f"scoring.screen.blocklist: {tmp_path / 'allow.yaml'}: allow: expected a list of phrases"
    ]
    assert problems({"classifier": "tests.test_screen:broken_factory"}) == [
        "scoring.screen.classifier: tests.test_screen:broken_factory failed to build: ConnectionError: "
        "the moderation service is down"
    ]
    assert problems({"classifier": "json:dumps"})[0].startswith(
        "scoring.screen.classifier: json:dumps failed to build: TypeError"
    )
    assert problems({"classifier": "tests.test_screen:no_score_factory"}) == [
        "scoring.screen.classifier: tests.test_screen:no_score_factory built _NoScore, which has no score(texts)"
    ]


def test_ordinary_words_side_by_side_are_not_read_as_a_term(screen):
    # Found by a review: windows join adjacent words ("p enis"), so "men's ex-" read as "s ex", and products hit
    # two-word terms. Possessives keep their s; allowed phrases name whole products, plurals included.
    ordinary = benign_prompts()[-14:]  # the prompts the review found blocked, kept in the benign set
    assert ordinary[0].startswith("a white power bank") and ordinary[-1].startswith("coal tits")
    assert {p: [m.rule.name for m in screen.check(p)] for p in ordinary} == {p: [] for p in ordinary}
    # ... and nothing more: a second review found the first allow phrases switched terms off in unsafe prompts.
    for unsafe, rule in (("a man exposing his pen is in public", "sexual:penis"), ("pen_is erect", "sexual:penis"),
                         ("ten gore photos of dead bodies", "violence_gore:gore"), ("nine gores", "violence_gore:gore"),
                         ("white power button pin for a jacket", "extremism:white power"),
                         ("school shooting shirt with guns", "violence_gore:school shooting")):  # fmt: skip
        assert rule in [m.rule.name for m in screen.check(unsafe)], unsafe
    assert [m.rule.name for m in screen.check("the pen is blue")] == ["sexual:penis"]  # blocked, by choice
    for evasion, rule in (("pe nis", "sexual:penis"), ("s ex", "sexual:sex"), ("the white power movement",
                          "extremism:white power"), ("pօrn", "sexual:porn*"), ("ꝑorn", "sexual:porn*"),
                          ("pᴑrn", "sexual:porn*"), ("pen is sex", "sexual:sex"), ("p*rn", "sexual:porn*"),
                          ("s_x", "sexual:sex"), ("n*ked woman", "sexual:naked woman")):  # fmt: skip
        assert rule in [m.rule.name for m in screen.check(evasion)], evasion
    for plain in ("snake_case banner", "5*star hotel", "a*b testing", "sale_price_tag"):
        assert screen.check(plain) == (), plain


def test_several_masked_letters_read_as_the_term_words_they_can_stand_for(screen):
    # One `*` or `_` was read as each vowel; a run of them (`p**n`) stood for one letter and so never matched.
    for evasion, rule in (("a p**n photo", "sexual:porn*"), ("p__n", "sexual:porn*"), ("p**ns", "sexual:porn*"),
                          ("b**bs out", "sexual:boobs"), ("n**ed woman", "sexual:naked woman"),
                          ("s*lf h*rm", "self_harm:self harm"), ("s*lf-h*rm tips", "self_harm:self harm"),
                          ("k*ll mys*lf", "self_harm:kill myself"), ("su*c*de note", "self_harm:suicide")):  # fmt: skip
        assert rule in [m.rule.name for m in screen.check(evasion)], evasion
    # A mask is one letter: a run that is too long for any term word, and masks after a term's letters, match nothing.
    for plain in ("p*****n", "pet_tag", "lily_rose_dress", "item_sku_a", "pool_side"):
        assert screen.check(plain) == (), plain
