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
(``pussy willow``, ``Gore-Tex``) suppress a match inside them. Numbers are not leetspeak: a match most of whose
letters were read from tokens of digits without letters (``1011`` → ``ioii``, ``7175 S``, ``SKU-1011``, ``1,011``)
is dropped, and a spelled-out run only when all of its characters are digits (``1 0 1 1``), so SKUs and prices
pass while ``l0li``, ``t1ts``, ``n4ked``, ``t1 75`` and ``5 3 x`` still block. Negative prompts are not screened:
"nsfw, nude" there asks the model to stay away from exactly that.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import os
import re
import unicodedata
from collections.abc import Callable, Iterable
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
    "ʏ": "y", "ᴢ": "z", "ᴑ": "o", "ꝑ": "p", "ꝓ": "p", "ꝗ": "q",
    # Armenian
    "օ": "o", "ս": "u", "ո": "n", "հ": "h", "ց": "g", "ք": "p", "զ": "q",
})  # fmt: skip
_LEET_DIGITS = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g"})
_LEET_SYMBOLS = str.maketrans({"@": "a", "$": "s", "!": "i", "|": "i", "+": "t", "€": "e"})
_FOLD = str.maketrans({"l": "i"})
# The three readings in one table each (no table's output is another's input, so one pass equals the chain).
_READ_ALL = {**_LEET_DIGITS, **_LEET_SYMBOLS, **_FOLD}
_READ_DIGITS = {**_LEET_DIGITS, **_FOLD}
_WORD = re.compile(r"[a-z]+")
_STRETCH = re.compile(r"([a-z])\1{2,}")  # a letter three or more times: stretched on purpose (or l/i folded)
_REPEAT = re.compile(r"([a-z])\1+")
_LEETABLE = re.compile(r"[0-9@$!|+€]")  # without one of these the three readings are the same
# A number: a token (a run of what the all-leet reading turns into letters) with a digit and no letter.
_NUMBER = re.compile(r"(?<![a-z01345789@$!|+€])[@$!|+€]*[01345789][01345789@$!|+€]*(?![a-z01345789@$!|+€])")


def _base(text: str) -> str:
    if text.isascii():  # NFKC, NFKD, the Cf filter and the confusables are identities on ASCII; casefold is lower
        return text.lower()
    t = unicodedata.normalize("NFKC", text)
    t = "".join(ch for ch in t if unicodedata.category(ch) != "Cf").casefold().translate(_CONFUSABLES)
    t = "".join(ch for ch in unicodedata.normalize("NFKD", t) if not unicodedata.combining(ch))
    return t.translate(_CONFUSABLES)


#: "men's", "it's": the s stays on its word, so no window reads "men s ex-display" as "sex".
_APOSTROPHE_S = re.compile(r"(?<=[a-z])['’ʼ]s\b")


#: A ``*`` or ``_`` between letters stands for a letter someone did not want to write (``p*rn``, ``s_x``).
_MASKED = re.compile(r"(?<=[a-z])[*_]+(?=[a-z])")
#: A word with masked letters: letters, then runs of masks and letters (``p**n``, ``s*lf``).
_MASKED_WORD = re.compile(r"(?<![a-z*_])[a-z]+(?:[*_]+[a-z]+)+")
_MAX_UNMASKED = 64  # readings from masked words, at most (their combinations multiply)


def _readings(text: str, unmask: Callable[[str], list[str]] | None = None) -> list[tuple[list[str], list[bool] | None]]:
    """``normalized_variants`` with, per word, whether it was read from a number: a token (a run of letters, digits
    and leet symbols) with digits and no letter — ``1011``, ``$1011``, the ``7175`` of ``SKU-7175``. The flags are
    None when no word was. A masked letter (``p*rn``) is read as each vowel in turn, as well as as a separator;
    ``unmask`` (a masked word → the words it can stand for, one letter per mask) adds those readings (``p**n``)."""
    b = _APOSTROPHE_S.sub("s", _base(text))
    if _MASKED.search(b):
        texts = [b, *(_MASKED.sub(v, b) for v in "aeiou")]
        if unmask is not None:
            texts += _unmasked_texts(b, unmask)
        out: list[tuple[list[str], list[bool] | None]] = []
        for reading in texts:
            out += [r for r in _unmasked_readings(reading) if r not in out]
        return out
    return _unmasked_readings(b)


def _unmasked_texts(b: str, unmask: Callable[[str], list[str]]) -> list[str]:
    """``b`` with its masked words replaced by what they can stand for, every combination (up to a cap)."""
    spans = [(m.span(), unmask(m.group())) for m in _MASKED_WORD.finditer(b)]
    spans = [(span, words) for span, words in spans if words]
    texts: list[str] = []
    for choice in itertools.islice(itertools.product(*(words for _, words in spans)), _MAX_UNMASKED):
        parts, pos = [], 0
        for ((a, z), _), word in zip(spans, choice, strict=True):
            parts += [b[pos:a], word]
            pos = z
        texts.append("".join(parts) + b[pos:])
    return texts if spans else []


def _unmasked_readings(b: str) -> list[tuple[list[str], list[bool] | None]]:
    if not _LEETABLE.search(b):
        return [(_WORD.findall(b.replace("l", "i")), None)]
    numbers = [m.span() for m in _NUMBER.finditer(b)]
    out: list[tuple[list[str], list[bool] | None]] = []
    for r in (b.translate(_READ_ALL), b.translate(_READ_DIGITS), None):
        if r is None or not numbers:  # the last reading has no digits as letters, so no number's words
            words, flags = _WORD.findall(b.replace("l", "i") if r is None else r), None
        else:  # words never cross a token's edge, so the text splits at the numbers
            words, flags, pos = [], [], 0
            for a, z in numbers:
                before, inside = _WORD.findall(r, pos, a), _WORD.findall(r, a, z)
                words += before + inside
                flags += [False] * len(before) + [True] * len(inside)
                pos = z
            rest = _WORD.findall(r, pos)
            words += rest
            flags += [False] * len(rest)
        if (words, flags) not in out:
            out.append((words, flags))
    return out


def normalized_variants(text: str) -> list[list[str]]:
    """Word lists of ``text`` under each reading of digits and symbols: all as letters (``$3x``), digits only
    (``sale!`` keeps its ``!`` a separator), none. A word matches if it matches in any reading."""
    out: list[list[str]] = []
    for words, _ in _readings(text):
        if words not in out:
            out.append(words)
    return out


def normalize_term(term: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(_base(term).translate(_FOLD)))


def squeeze(word: str) -> str:
    """Every run of a repeated letter cut to one letter: the common form of ``pooorn`` and ``porn``."""
    return _REPEAT.sub(r"\1", word)


def _prefixes(strings: Iterable[str]) -> frozenset[str]:
    return frozenset(s[:k] for s in strings for k in range(1, len(s) + 1))


def _from_numbers(words: list[str], numeric: list[bool], s: int, e: int) -> bool:
    """Whether most of the letters of the words ``[s, e)`` were read from numbers."""
    num = sum(len(words[i]) for i in range(s, e) if numeric[i])
    return 2 * num > sum(len(words[i]) for i in range(s, e))


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
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text") from None
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
        phrases = data.get("allow") or []
        if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
            raise ValueError(f"{source}: allow: expected a list of phrases")
        allow = [w for w in (normalize_term(p) for p in phrases) if w]
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
        self.sq_exact_any = {**self.sq_exact, **self.exact}  # what a stretched candidate is looked up in
        self.sq_prefix = {squeeze(k): r for k, r in self.prefix.items()}
        self.prefix_lengths = sorted({len(p) for p in self.prefix})
        self.sq_prefix_lengths = sorted({len(p) for p in self.sq_prefix})
        self.multi = [(r, r.compact, squeeze(r.compact)) for r in self.multi_prefix]
        self.allow = blocklist.allow
        self.allow_by_first: dict[str, list[tuple[str, ...]]] = {}
        for phrase in self.allow:
            self.allow_by_first.setdefault(phrase[0], []).append(phrase)
        self.rules = blocklist.rules
        self.spelled = [(r, r.compact, squeeze(r.compact)) for r in self.rules]
        # Window pruning: a concatenation of words can only match (now or once extended) if it is a prefix of
        # something a window can match — plainly, or squeezed when stretched (squeeze(a) is a prefix of
        # squeeze(a + b), so a squeezed prefix stays one). Ordinary words start no window at all.
        self.window_prefixes = _prefixes(
            [t + x for t in self.exact for x in ("", "s", "es")]
            + [p + x for p in self.prefix for x in ("", "s")]
            + [c for _, c, _ in self.multi]
        )
        self.sq_window_prefixes = _prefixes(
            [t + x for t in self.sq_exact_any for x in ("", "s", "es")]
            + [p + x for p in self.sq_prefix for x in ("", "s")]
            + [sq for _, _, sq in self.multi]
        )
        self._word = functools.lru_cache(maxsize=1 << 14)(self._word_uncached)
        self.vocab_by_first: dict[str, list[str]] = {}  # every word of every term, for masked words
        for w in sorted({w for r in self.rules for w in r.words}):
            self.vocab_by_first.setdefault(w[0], []).append(w)

    def unmask(self, token: str) -> list[str]:
        """What a word with masked letters (``p**n``, ``s*lf``; each ``*`` or ``_`` one letter) reads as: each term
        word its start matches, with at least one mask inside, followed by the word's unmasked rest."""
        token = token.translate(_FOLD)  # term words are folded (l → i)
        out = []
        for w in self.vocab_by_first.get(token[0], ()):
            head, rest = token[: len(w)], token[len(w) :]
            if (
                len(head) == len(w)
                and "*" not in rest
                and "_" not in rest
                and any(c in "*_" for c in head)
                and all(c == t or c in "*_" for c, t in zip(head, w, strict=True))
            ):
                out.append(w + rest)
        return out

    def _may_extend(self, cat: str, sq: str | None = None) -> bool:
        return cat in self.window_prefixes or (sq if sq is not None else squeeze(cat)) in self.sq_window_prefixes

    def _word_uncached(self, w: str) -> tuple[Rule | None, bool]:
        """A word on its own: the rule it matches, and whether a window can start with it."""
        stretched = _STRETCH.search(w) is not None
        return self._exact(w, stretched) or self._word_prefix(w, stretched), self._may_extend(w)

    def _exact(self, cand: str, stretched: bool, sq: str | None = None) -> Rule | None:
        table = self.exact
        if stretched:
            cand, table = sq if sq is not None else squeeze(cand), self.sq_exact_any
        for c in (cand, cand[:-1] if cand.endswith("s") else "", cand[:-2] if cand.endswith("es") else ""):
            if c and c in table:
                return table[c]
        return None

    def _word_prefix(self, word: str, stretched: bool) -> Rule | None:
        table, lengths = self.prefix, self.prefix_lengths
        if stretched:
            word, table, lengths = squeeze(word), self.sq_prefix, self.sq_prefix_lengths
        for n in lengths:
            if len(word) >= n and word[:n] in table:
                return table[word[:n]]
        return None

    def _whole_prefix(self, cand: str, stretched: bool, sq: str | None = None) -> Rule | None:
        """A one-word ``term*`` split across words must be matched whole (``blow job``), never as a prefix of the
        joined words, which would read ``hen tail`` as ``hentai*``."""
        table = self.prefix
        if stretched:
            cand, table = sq if sq is not None else squeeze(cand), self.sq_prefix
        for c in (cand, cand[:-1] if cand.endswith("s") else ""):
            if c in table:
                return table[c]
        return None

    def find(self, words: list[str], numeric: list[bool] | None = None) -> list[tuple[Match, int, int]]:
        """Matches with their word spans ``[start, end)``. ``numeric`` (per word: read from a number) drops the
        matches most of whose letters come from numbers, and spelled-out runs made only of digits."""
        found: list[tuple[Match, int, int]] = []
        n = len(words)
        word = self._word
        for s in range(n):
            w = words[s]
            rule, extend = word(w)
            if rule:
                found.append((Match(rule, w), s, s + 1))
            if not extend:
                continue
            cat, last = w, min(n, s + MAX_WINDOW)
            for end in range(s + 2, last + 1):
                head, cat = cat, cat + words[end - 1]
                stretched = _STRETCH.search(cat) is not None
                sq = squeeze(cat) if stretched else None
                rule = self._exact(cat, stretched, sq) or self._whole_prefix(cat, stretched, sq)
                if rule:
                    found.append((Match(rule, cat), s, end))
                for r, p, sp in self.multi:  # the prefix must end inside the window's last word
                    if stretched:
                        if sq.startswith(sp) and len(squeeze(head)) < len(sp):  # type: ignore[union-attr]
                            found.append((Match(r, cat), s, end))
                    elif cat.startswith(p) and len(head) < len(p):
                        found.append((Match(r, cat), s, end))
                if end < last and not self._may_extend(cat, sq):
                    break
        if numeric is not None:
            found = [f for f in found if not _from_numbers(words, numeric, f[1], f[2])]
        found += self._spelled_out(words, numeric)
        return found

    def _spelled_out(self, words: list[str], numeric: list[bool] | None = None) -> list[tuple[Match, int, int]]:
        """Runs of three or more one-letter words (``p o r n o``): any term inside the joined run."""
        out: list[tuple[Match, int, int]] = []
        s, n = 0, len(words)
        while s < n:
            if len(words[s]) != 1:
                s += 1
                continue
            e = s
            while e < n and len(words[e]) == 1:
                e += 1
            if e - s >= 3:
                run = "".join(words[s:e])
                stretched = squeeze(run) if _STRETCH.search(run) else None
                digits = numeric[s:e] if numeric is not None and any(numeric[s:e]) else None
                for r, c, sq in self.spelled:
                    hit = c in run or (stretched and len(sq) >= 3 and sq in stretched)
                    if hit and (digits is None or _spelled_with_a_letter(run, stretched, c, sq, digits)):
                        out.append((Match(r, run), s, e))
            s = e
        return out

    def allowed_spans(self, words: list[str]) -> list[tuple[int, int]]:
        """Where an allowed phrase stands in ``words``; its last word may take a plural s / es, as terms do
        ("paint strippers" for "paint stripper")."""
        spans = []
        by_first = self.allow_by_first
        for s, w in enumerate(words):
            for phrase in by_first.get(w, ()):
                e = s + len(phrase)
                got = words[s:e]
                if len(got) == len(phrase) and tuple(got[:-1]) == phrase[:-1] and got[-1] in _plurals(phrase[-1]):
                    spans.append((s, e))
        return spans


def _plurals(word: str) -> tuple[str, ...]:
    return (word, word + "s", word + "es")


def _spelled_with_a_letter(run: str, stretched: str | None, c: str, sq: str, digits: list[bool]) -> bool:
    """Whether the term ``c`` occurs in the spelled-out ``run`` (or ``sq`` in its squeezed form) with at least
    one of its characters a letter, not a digit: ``5 3 x`` is ``sex``, ``1 0 1 1`` is a number."""
    i = run.find(c)
    while i >= 0:
        if not all(digits[i : i + len(c)]):
            return True
        i = run.find(c, i + 1)
    if stretched and len(sq) >= 3:
        starts = [m.start() for m in re.finditer(r"([a-z])\1*", run)]  # where each squeezed letter begins
        starts.append(len(run))
        i = stretched.find(sq)
        while i >= 0:
            if not all(digits[starts[i] : starts[i + len(sq)]]):
                return True
            i = stretched.find(sq, i + 1)
    return False


# --- the text-classifier hook -----------------------------------------------------------------------------------


class TextClassifier(Protocol):
    """What ``scoring.screen.classifier: module:factory`` must build: ``score`` returns, per prompt, the
    probability in [0, 1] that it asks for disallowed content."""

    name: str
    version: str

    def score(self, texts: list[str]) -> list[float]: ...


@functools.lru_cache(maxsize=8)
def load_classifier(ref: str) -> TextClassifier:
    """The classifier ``module:factory`` builds (once per process: the pre-launch check and the run share it);
    ``ValueError`` naming ``scoring.screen.classifier`` when it cannot be built or has no ``score``."""
    module, _, attr = ref.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
        clf = factory()
    except Exception as exc:  # a user's hook: any failure is the spec's problem, said in one line
        raise ValueError(f"scoring.screen.classifier: {ref} failed to build: {type(exc).__name__}: {exc}") from None
    if not callable(getattr(clf, "score", None)):
        raise ValueError(f"scoring.screen.classifier: {ref} built {type(clf).__name__}, which has no score(texts)")
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
        for words, numeric in _readings(text, self._matcher.unmask):
            found = self._matcher.find(words, numeric)
            if not found:
                continue
            allowed = self._matcher.allowed_spans(words)
            for m, s, e in found:
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
