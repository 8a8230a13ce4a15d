"""What a request asks, in the catalogue's attributes: the categories it names, the period, what it rules out.

    ask = parse_ask("a gritty 1990s crime story, nothing animated", categories)
    ask.genres == {"Crime"}, (ask.year_min, ask.year_max) == (1990, 1999), ask.excluded == {"Animation"}

`parse_ask` is a deterministic rule set (the request parser of the candidate plan and the judge of
compliance): named categories are required (all of them; "horror or thriller" asks for either), a named
period bounds the year, and a category named after a negation ("nothing", "no", "without", "anything but",
...) — or described so ("nothing scary") — is excluded. Vague wishes ("something to make me laugh") name
nothing here; the plan reads them softly, by their meaning (`instructrec.candidates.GenreAffinity`).

`Ask.satisfied_by` is instruction compliance for one item; `Ask.matches` names what an item satisfies
(for reasons: "matches: 1990s, crime").
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from instructrec.instructions.vocabulary import UNWANTED, names_pattern

DECADE_WORDS = {
    "twenties": 1920,
    "thirties": 1930,
    "forties": 1940,
    "fifties": 1950,
    "sixties": 1960,
    "seventies": 1970,
    "eighties": 1980,
    "nineties": 1990,
    "noughties": 2000,
}
PART_OF_DECADE = {"early": (0, 3), "mid": (4, 6), "late": (7, 9)}  # as the synthesiser's periods
AROUND_YEARS = 2  # "from around 1995": 1993-1997

_NEGATOR = re.compile(
    r"\b(?:no|not|nothing|none|without|avoid(?:ing)?|except|skip|never|anything but|other than|"
    r"don'?t want|do not want|rather not|no more|isn'?t)\b",
    re.IGNORECASE,
)
# A negation reaches to the end of its clause; clauses break at punctuation and at these words.
_CLAUSE_BREAK = re.compile(r"[,;.!?]|\b(?:(?<!anything )but|and|with|though|although|yet)\b", re.IGNORECASE)
_DECADE = re.compile(r"\b(?:(early|mid|late)[- ]?)?'?((?:19|20)?\d0)'?s\b", re.IGNORECASE)
_DECADE_WORD = re.compile(r"\b(?:(early|mid|late)[- ]?)?(" + "|".join(DECADE_WORDS) + r")\b", re.IGNORECASE)
_YEAR = re.compile(
    r"\b(?:(around|about|circa|roughly|approximately)\s+|(before|pre-?|after|post-?|since)\s*)?((?:19|20)\d\d)\b(?!s)",
    re.IGNORECASE,
)
_BETWEEN = re.compile(r"\bbetween\s+((?:19|20)\d\d)\s+and\s+((?:19|20)\d\d)\b", re.IGNORECASE)
_OR = re.compile(r"\bor\b", re.IGNORECASE)


@dataclass(frozen=True)
class Ask:
    genres: frozenset[str] = frozenset()  # every one required (or any one, when `any_genre`)
    excluded: frozenset[str] = frozenset()
    year_min: int | None = None
    year_max: int | None = None
    any_genre: bool = False  # "horror or thriller"
    period: str | None = field(default=None, compare=False)  # how the request named the period, for reasons

    @property
    def empty(self) -> bool:
        return not (self.genres or self.excluded) and self.year_min is None and self.year_max is None

    @property
    def constrains(self) -> bool:
        """Whether it asks for something positive (categories or a period), not only exclusions."""
        return bool(self.genres) or self.year_min is not None or self.year_max is not None

    def in_period(self, year: int | None) -> bool:
        if self.year_min is None and self.year_max is None:
            return True
        if year is None:
            return False
        return (self.year_min is None or year >= self.year_min) and (
            self.year_max is None or year <= self.year_max
        )

    def satisfied_by(self, genres: Collection[str], year: int | None) -> bool:
        """Instruction compliance of one item: the categories asked for, the period, nothing excluded."""
        if self.excluded.intersection(genres):
            return False
        if self.genres:
            hit = self.genres.intersection(genres)
            if not (hit if self.any_genre else len(hit) == len(self.genres)):
                return False
        return self.in_period(year)

    def matches(self, genres: Collection[str], year: int | None) -> list[str]:
        """What of the ask an item satisfies, in words ("1990s", "crime"); excluded categories it avoids."""
        out = [g.lower() for g in sorted(self.genres.intersection(genres))]
        if (self.year_min is not None or self.year_max is not None) and self.in_period(year):
            out.insert(0, self.period or _period_words(self.year_min, self.year_max))
        out += [f"not {g.lower()}" for g in sorted(self.excluded) if g not in genres]
        return out

    def relaxed(self) -> list[tuple[str, Ask]]:
        """Looser asks to fall back on when too few items satisfy this one, loosest last; exclusions are
        promises and never relaxed."""
        steps: list[tuple[str, Ask]] = []
        ask = self
        if len(ask.genres) > 1 and not ask.any_genre:
            ask = Ask(ask.genres, ask.excluded, ask.year_min, ask.year_max, True, ask.period)
            steps.append(("any of the categories", ask))
        if ask.year_min is not None or ask.year_max is not None:
            ask = Ask(ask.genres, ask.excluded, any_genre=ask.any_genre)
            steps.append(("the period", ask))
        if ask.genres:
            ask = Ask(excluded=ask.excluded)
            steps.append(("the categories", ask))
        return steps


def parse_ask(text: str | None, categories: Sequence[str]) -> Ask:
    """The categories, period and exclusions `text` names, among the catalogue's `categories`."""
    if not text or not text.strip():
        return Ask()
    patterns = names_pattern(categories)
    unwanted = {c: re.compile(rf"\b(?:{UNWANTED[c]})\b", re.IGNORECASE) for c in categories if c in UNWANTED}
    wanted: set[str] = set()
    excluded: set[str] = set()
    for clause in _clauses(text):
        negation = _NEGATOR.search(clause)
        cut = negation.start() if negation else len(clause)
        for category, pattern in patterns.items():
            for found in pattern.finditer(clause):
                (excluded if found.start() >= cut else wanted).add(category)
        if negation:
            for category, pattern in unwanted.items():
                if pattern.search(clause, negation.end()):
                    excluded.add(category)
    wanted -= excluded
    year_min, year_max, period = _period(text)
    any_genre = len(wanted) > 1 and bool(_OR.search(text))
    return Ask(frozenset(wanted), frozenset(excluded), year_min, year_max, any_genre, period)


def _clauses(text: str) -> list[str]:
    out, start = [], 0
    for found in _CLAUSE_BREAK.finditer(text):
        out.append(text[start : found.start()])
        start = found.end()
    out.append(text[start:])
    return [c for c in out if c.strip()]


def _period(text: str) -> tuple[int | None, int | None, str | None]:
    """The year range a request names (the first period it names), and the words it used."""
    between = _BETWEEN.search(text)
    if between:
        low, high = sorted(int(y) for y in between.groups())
        return low, high, between.group(0)
    found: list[tuple[int, int | None, int | None, str]] = []  # (position, min, max, words)
    for match in _DECADE.finditer(text):
        part, digits = match.group(1), match.group(2)
        decade = (
            int(digits)
            if len(digits) == 4
            else (1900 + int(digits) if int(digits) >= 20 else 2000 + int(digits))
        )
        found.append((match.start(), *_decade_range(decade, part), match.group(0)))
    for match in _DECADE_WORD.finditer(text):
        found.append(
            (
                match.start(),
                *_decade_range(DECADE_WORDS[match.group(2).lower()], match.group(1)),
                match.group(0),
            )
        )
    for match in _YEAR.finditer(text):
        around, bound, year = match.group(1), (match.group(2) or "").lower(), int(match.group(3))
        if around:
            low, high = year - AROUND_YEARS, year + AROUND_YEARS
        elif bound.startswith(("before", "pre")):
            low, high = None, year - 1
        elif bound.startswith(("after", "post")):
            low, high = year + 1, None
        elif bound == "since":
            low, high = year, None
        else:
            low = high = year
        found.append((match.start(), low, high, match.group(0).strip()))
    if not found:
        return None, None, None
    _, low, high, words = min(found, key=lambda f: f[0])
    return low, high, words


def _decade_range(decade: int, part: str | None) -> tuple[int, int]:
    first, last = PART_OF_DECADE.get((part or "").lower(), (0, 9))
    return decade + first, decade + last


def _period_words(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        if low == high:
            return str(low)
        if low % 10 == 0 and high == low + 9:
            return f"{low}s"
        return f"{low}-{high}"
    return f"after {low - 1}" if low is not None else f"before {(high or 0) + 1}"


def compliance(
    asks: Iterable[Ask], ranked: Iterable[Sequence[tuple[Collection[str], int | None]]], k: int = 10
) -> float:
    """Mean share of each ranking's top-k that satisfies its ask (asks that ask nothing are skipped)."""
    shares = []
    for ask, items in zip(asks, ranked, strict=True):
        if ask.empty:
            continue
        top = list(items)[:k]
        if top:
            shares.append(sum(ask.satisfied_by(g, y) for g, y in top) / len(top))
    return sum(shares) / len(shares) if shares else float("nan")
