"""PromptScreen: blocks prompts before generation, by a normalised blocklist match and an optional text classifier.

The planner calls ``PromptScreen.from_spec(spec).screen(items)`` on each chunk of planned items: a blocked item
becomes ``status="blocked"``, ``decision="block"`` with a reason naming the rule, and is never generated.

Matching is on normalised words, so obfuscation does not get through and ordinary words are not caught:
NFKC (full-width, math alphabets, ligatures) → drop format characters (zero-width space / joiner, soft hyphen)
→ casefold → confusables (Cyrillic / Greek / small-capital look-alikes to Latin) → strip accents → leetspeak
(``0→o 1→i 3→e 4→a 5→s 7→t 8→b 9→g @→a $→s !→i |→i +→t``) → ``l`` and ``i`` folded together (``1`` stands
for either). Words are runs of ``a-z``; everything else separates. A term matches a whole word (or a plural ``-s``
/ ``-es``), ``term*`` any word starting with it, and a multi-word term its words with any separator or none.
Inserted separators are undone by matching the concatenation of up to six adjacent words exactly
(``p o r n``, ``p.o.r.n``, ``po rn``), and letters stretched out (``pooorn``) are collapsed. Because matches are
whole words, ``analog``, ``grape``, ``Essex`` and ``rapeseed`` are not touched; ``allow`` phrases
(``pussy willow``, ``Gore-Tex``) suppress a match inside them. Negative prompts are not screened: "nsfw, nude"
there asks the model to stay away from exactly that.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import yaml

from schemas.record import Item

DEFAULT_BLOCKLIST = os.path.join(os.path.dirname(__file__), "data", "blocklist.yaml")
MAX_WINDOW = 6

# Look-alikes that NFKC leaves alone (a subset of Unicode's confusables.txt that matters for Latin words).
_CONFUSABLES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "ё": "e", "г": "r", "һ": "h", "н": "h", "і": "i", "ї": "i",
    "ј": "j", "к": "k", "ӏ": "l", "м": "m", "п": "n", "о": "o", "р": "p", "ԛ": "q", "ѕ": "s", "т": "t", "у": "y",
    "ԝ": "w", "х": "x", "ь": "b", "ү": "y",
    # Greek
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "μ": "u", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j",
    # Latin look-alikes and small capitals
    "ı": "i", "ł": "l", "ø": "o", "đ": "d", "ð": "d", "ɡ": "g", "ɑ": "a", "æ": "ae", "œ": "oe",
    "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ғ": "f", "ɢ": "g", "ʜ": "h", "ɪ": "i", "ᴊ": "j", "ᴋ": "k",
    "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r", "ꜱ": "s", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w",
    "ʏ": "y", "ᴢ": "z",
})  # fmt: skip
_LEET_DIGITS = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g"})
_LEET_SYMBOLS = str.maketrans({"@": "a", "$": "s", "!": "i", "|": "i", "+": "t", "€": "e"})
_FOLD = str.maketrans({"l": "i"})
_WORD = re.compile(r"[a-z]+")
_STRETCH = re.compile(r"([a-z])\1{2,}")  # a letter three or more times: stretched on purpose (or l/i folded)
_REPEAT = re.compile(r"([a-z])\1+")


def _base(text: str) -> str:
    t = unicodedata.normalize("NFKC", text)
    t = "".join(ch for ch in t if unicodedata.category(ch) != "Cf").casefold().translate(_CONFUSABLES)
    t = "".join(ch for ch in unicodedata.normalize("NFKD", t) if not unicodedata.combining(ch))
    return t.translate(_CONFUSABLES)


def normalized_variants(text: str) -> list[list[str]]:
    """Word lists of ``text`` under each reading of digits and symbols: all as letters (``$3x``), digits only
    (``sale!`` keeps its ``!`` a separator), none. A word matches if it matches in any reading."""
    b = _base(text)
    readings = (b.translate(_LEET_DIGITS).translate(_LEET_SYMBOLS), b.translate(_LEET_DIGITS), b)
    out: list[list[str]] = []
    for r in readings:
        words = _WORD.findall(r.translate(_FOLD))
        if words not in out:
            out.append(words)
    return out


def normalize_term(term: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(_base(term).translate(_FOLD)))


def squeeze(word: str) -> str:
    """Every run of a repeated letter cut to one letter: the common form of ``pooorn`` and ``porn``."""
    return _REPEAT.sub(r"\1", word)


# --- the blocklist ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    category: str
    term: str
    action: str
    words: tuple[str, ...]
    prefix: bool

    @property
    def compact(self) -> str:
        return "".join(self.words)

    @property
    def name(self) -> str:
        return f"{self.category}:{self.term}"


@dataclass
class Blocklist:
    version: str
    rules: list[Rule]
    allow: list[tuple[str, ...]]

    @classmethod
    def load(cls, path: str = DEFAULT_BLOCKLIST) -> Blocklist:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Blocklist:
        if not isinstance(data, dict) or not isinstance(data.get("categories"), dict):
            raise ValueError(f"{source}: expected a mapping with `categories`")
        rules = []
        for category, body in data["categories"].items():
            if not isinstance(body, dict) or not isinstance(body.get("terms"), list):
                raise ValueError(f"{source}: categories.{category}: expected `terms` (a list) and `action`")
            action = body.get("action", "block")
            if action not in ("block", "review"):
                raise ValueError(f"{source}: categories.{category}.action: must be block or review, got {action!r}")
            for term in body["terms"]:
                term = str(term).strip()
                words = normalize_term(term.rstrip("*"))
                if not words:
                    raise ValueError(f"{source}: categories.{category}: term {term!r} has no letters")
                rules.append(Rule(str(category), term, action, words, term.endswith("*")))
        allow = [w for w in (normalize_term(str(p)) for p in data.get("allow") or []) if w]
        return cls(str(data.get("version", os.path.basename(source))), rules, allow)

    def extended(self, other: Blocklist) -> Blocklist:
        return Blocklist(f"{self.version}+{other.version}", self.rules + other.rules, self.allow + other.allow)


@dataclass(frozen=True)
class Match:
    rule: Rule
    matched: str
    """The normalised text that matched (``p0rn`` → ``porn``)."""


class _Matcher:
    """The blocklist compiled into lookup tables."""

    def __init__(self, blocklist: Blocklist) -> None:
        self.exact: dict[str, Rule] = {}
        self.prefix: dict[str, Rule] = {}
        self.multi_prefix: list[Rule] = []
        for r in blocklist.rules:
            if not r.prefix:
                self.exact.setdefault(r.compact, r)
            elif len(r.words) == 1:
                self.prefix.setdefault(r.compact, r)
            else:
                self.multi_prefix.append(r)
        # Stretched words (``pooorn``, ``seeelf harm``) are compared in squeezed form with squeezed terms. Only
        # words with a letter three times in a row take this path, so ``bobs`` never meets ``boobs``.
        self.sq_exact = {squeeze(k): r for k, r in self.exact.items()}
        self.sq_prefix = {squeeze(k): r for k, r in self.prefix.items()}
        self.prefix_lengths = sorted({len(p) for p in self.prefix})
        self.sq_prefix_lengths = sorted({len(p) for p in self.sq_prefix})
        self.allow = blocklist.allow
        self.rules = blocklist.rules

    def _exact(self, cand: str) -> Rule | None:
        table = self.exact
        if _STRETCH.search(cand):
            cand, table = squeeze(cand), {**self.sq_exact, **self.exact}
        for c in (cand, cand[:-1] if cand.endswith("s") else "", cand[:-2] if cand.endswith("es") else ""):
            if c and c in table:
                return table[c]
        return None

    def _word_prefix(self, word: str) -> Rule | None:
        table, lengths = self.prefix, self.prefix_lengths
        if _STRETCH.search(word):
            word, table, lengths = squeeze(word), self.sq_prefix, self.sq_prefix_lengths
        for n in lengths:
            if len(word) >= n and word[:n] in table:
                return table[word[:n]]
        return None

    def _whole_prefix(self, cand: str) -> Rule | None:
        """A one-word ``term*`` split across words must be matched whole (``blow job``), never as a prefix of the
        joined words, which would read ``hen tail`` as ``hentai*``."""
        table = self.prefix
        if _STRETCH.search(cand):
            cand, table = squeeze(cand), self.sq_prefix
        for c in (cand, cand[:-1] if cand.endswith("s") else ""):
            if c in table:
                return table[c]
        return None

    def find(self, words: list[str]) -> list[tuple[Match, int, int]]:
        """Matches with their word spans ``[start, end)``."""
        found: list[tuple[Match, int, int]] = []
        n = len(words)
        for s in range(n):
            w = words[s]
            rule = self._exact(w) or self._word_prefix(w)
            if rule:
                found.append((Match(rule, w), s, s + 1))
            cat, head = words[s], ""
            for end in range(s + 2, min(n, s + MAX_WINDOW) + 1):
                head, cat = cat, cat + words[end - 1]
                rule = self._exact(cat) or self._whole_prefix(cat)
                if rule:
                    found.append((Match(rule, cat), s, end))
                stretched = bool(_STRETCH.search(cat))
                for r in self.multi_prefix:  # the prefix must end inside the window's last word
                    c, h, p = map(squeeze, (cat, head, r.compact)) if stretched else (cat, head, r.compact)
                    if c.startswith(p) and len(h) < len(p):
                        found.append((Match(r, cat), s, end))
        found += self._spelled_out(words)
        return found

    def _spelled_out(self, words: list[str]) -> list[tuple[Match, int, int]]:
        """Runs of three or more one-letter words (``p o r n o``): any term inside the joined run."""
        out: list[tuple[Match, int, int]] = []
        s = 0
        while s < len(words):
            e = s
            while e < len(words) and len(words[e]) == 1:
                e += 1
            if e - s >= 3:
                run = "".join(words[s:e])
                stretched = squeeze(run) if _STRETCH.search(run) else None
                for r in self.rules:
                    sq = squeeze(r.compact)
                    if r.compact in run or (stretched and len(sq) >= 3 and sq in stretched):
                        out.append((Match(r, run), s, e))
            s = max(e, s + 1)
        return out

    def allowed_spans(self, words: list[str]) -> list[tuple[int, int]]:
        spans = []
        for phrase in self.allow:
            k = len(phrase)
            spans += [(s, s + k) for s in range(len(words) - k + 1) if tuple(words[s : s + k]) == phrase]
        return spans


# --- the text-classifier hook -----------------------------------------------------------------------------------


class TextClassifier(Protocol):
    """What ``scoring.screen.classifier: module:factory`` must build: ``score`` returns, per prompt, the
    probability in [0, 1] that it asks for disallowed content."""

    name: str
    version: str

    def score(self, texts: list[str]) -> list[float]: ...


def load_classifier(ref: str) -> TextClassifier:
    module, _, attr = ref.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    clf = factory()
    if not callable(getattr(clf, "score", None)):
        raise TypeError(f"scoring.screen.classifier: {ref} built {type(clf).__name__}, which has no score(texts)")
    return clf


# --- the screen -------------------------------------------------------------------------------------------------


class PromptScreen:
    """``check(text)`` → the rules a prompt hits; ``screen(items)`` → the items, blocked ones marked."""

    def __init__(
        self,
        blocklist: Blocklist | None = None,
        classifier: TextClassifier | None = None,
        classifier_threshold: float = 0.5,
        classifier_action: str = "block",
    ) -> None:
        self.blocklist = blocklist or Blocklist.load()
        self._matcher = _Matcher(self.blocklist)
        self.classifier, self.classifier_threshold = classifier, classifier_threshold
        self.classifier_action = classifier_action
        self.check = functools.lru_cache(maxsize=4096)(self._check)  # samples of one row share their prompt

    @classmethod
    def from_spec(cls, spec: Any) -> PromptScreen | None:
        """The screen a job spec asks for, or None when ``scoring.screen.enabled`` is false."""
        s = spec.scoring.screen
        if not s.enabled:
            return None
        blocklist = Blocklist.load()
        if s.blocklist:
            own = Blocklist.load(s.blocklist)
            blocklist = blocklist.extended(own) if s.extend_default else own
        classifier = load_classifier(s.classifier) if s.classifier else None
        return cls(blocklist, classifier, s.classifier_threshold, s.classifier_action)

    def _check(self, text: str) -> tuple[Match, ...]:
        hits: dict[str, Match] = {}
        for words in normalized_variants(text):
            allowed = self._matcher.allowed_spans(words)
            for m, s, e in self._matcher.find(words):
                if not any(a <= s and e <= b for a, b in allowed):
                    hits.setdefault(m.rule.name, m)
        return tuple(hits.values())

    def screen(self, items: Iterable[Item]) -> list[Item]:
        """Mark pending items whose prompt is blocked (status ``blocked``, decision ``block``) or held for review
        (decision ``review``, still generated, never published). Other items pass through untouched."""
        items = list(items)
        todo = [it for it in items if it.status == "pending"]
        for it in todo:
            for m in self.check(it.prompt):
                self._flag(it, {
                    "code": "prompt_blocklist", "stage": "screen", "rule": m.rule.name, "category": m.rule.category,
                    "term": m.rule.term, "matched": m.matched, "field": "prompt",
                    "version": self.blocklist.version, "action": m.rule.action,
                })  # fmt: skip
        if self.classifier is not None:
            self._classify([it for it in todo if it.status == "pending"])
        return items

    def _classify(self, items: list[Item]) -> None:
        name = getattr(self.classifier, "name", type(self.classifier).__name__)
        version = getattr(self.classifier, "version", None)
        prompts = list(dict.fromkeys(it.prompt for it in items))
        if not prompts:
            return
        try:
            scores = dict(zip(prompts, (float(s) for s in self.classifier.score(prompts)), strict=True))
        except Exception as exc:  # fail closed: generate, but hold for review
            for it in items:
                self._flag(it, {"code": "screen_error", "stage": "screen", "classifier": name, "version": version,
                                "error": f"{type(exc).__name__}: {exc}"[:500], "action": "review"})  # fmt: skip
            return
        for it in items:
            score = scores[it.prompt]
            if not 0.0 <= score <= 1.0 or score >= self.classifier_threshold:
                self._flag(it, {
                    "code": "prompt_classifier", "stage": "screen", "classifier": name, "version": version,
                    "score": score, "threshold": self.classifier_threshold, "field": "prompt",
                    "action": self.classifier_action if 0.0 <= score <= 1.0 else "review",
                })  # fmt: skip

    @staticmethod
    def _flag(item: Item, reason: dict[str, Any]) -> None:
        item.reasons.append(reason)
        if reason["action"] == "block":
            item.status, item.decision, item.pixels = "blocked", "block", None
        elif item.decision != "block":
            item.decision = "review"
