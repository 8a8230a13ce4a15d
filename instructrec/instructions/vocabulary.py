"""Words for categories: how a request names one (specific), how a user describes the mood of one (vague),
and how a request rules one out (negative) — each phrasing pool split into what training sees and a held-out
part that only evaluation uses (`benchmarks/instructions.py`), so that a measured instruction-following
figure is about wordings the model never trained on.

The vocabularies are kept apart on purpose: a phrase that names a category or a period reads as a specific
intention (`intention_kind`), so the vague mood phrases here never name a genre or a year (tested). The genre
words are MovieLens's; a catalogue with other categories names them by their labels (`words_for`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from instructrec.instructions.taxonomy import Intention

Pool = Literal["train", "heldout"]


@dataclass(frozen=True, slots=True)
class GenreWords:
    modifier: str  # before another genre's noun: "a sci-fi thriller"
    noun: str  # on its own, with "{item}" for the catalogue's noun: "a thriller", "an action {item}"
    moods: tuple[str, ...]  # vague phrases a user might say: what training sees
    heldout: tuple[str, ...] = ()  # more vague phrases, for evaluation only

    def moods_in(self, pool: Pool) -> tuple[str, ...]:
        return self.moods if pool == "train" else self.heldout


GENRES: dict[str, GenreWords] = {
    "Action": GenreWords(
        "action",
        "action {item}",
        ("something fast-paced and exciting", "an adrenaline rush", "a movie with big stunts and chases"),
        ("something with explosions and car chases", "a high-octane ride", "lots of fights and stunts"),
    ),
    "Adventure": GenreWords(
        "adventure",
        "adventure {item}",
        ("an exciting journey", "something epic with a quest", "a story about explorers far from home"),
        ("a treasure hunt in faraway lands", "a daring expedition", "heroes on a long voyage"),
    ),
    "Animation": GenreWords(
        "animated",
        "animated {item}",
        ("a cartoon", "something drawn or made with computer graphics", "a cartoon for a cozy evening"),
        ("something hand-drawn", "a Pixar-style story", "colourful drawings that come to life"),
    ),
    "Children": GenreWords(
        "family-friendly",
        "family {item}",
        ("something light to watch with kids", "a film the whole family can enjoy", "something kid-friendly"),
        ("something my children would love", "fun for the little ones", "safe for young kids to watch"),
    ),
    "Comedy": GenreWords(
        "comedy",
        "comedy",
        ("something funny", "a light-hearted film", "something that will make me laugh", "a feel-good movie"),
        ("something hilarious", "a good laugh after a long day", "a silly, goofy story"),
    ),
    "Crime": GenreWords(
        "crime",
        "crime {item}",
        ("a gritty story about criminals", "something about a heist or a gang", "a tale of cops and robbers"),
        ("a story about the mob", "something with detectives chasing a killer", "a bank robbery gone wrong"),
    ),
    "Documentary": GenreWords(
        "documentary",
        "documentary",
        ("something real and informative", "a film about true events", "a movie where I learn something"),
        ("a real-life story told by the people in it", "something educational", "facts about the real world"),
    ),
    "Drama": GenreWords(
        "drama",
        "drama",
        ("something moving", "a serious, emotional film", "a story with real depth"),
        ("a tearjerker", "a heartfelt character study", "something that makes me think about life"),
    ),
    "Fantasy": GenreWords(
        "fantasy",
        "fantasy {item}",
        ("something magical", "a film set in an imaginary world", "a movie with wizards or dragons"),
        ("a fairy tale", "elves, spells and enchanted forests", "a world of myths and magic"),
    ),
    "Film-Noir": GenreWords(
        "noir",
        "film noir",
        ("a moody old detective story", "something shadowy and cynical"),
        ("a hard-boiled private eye in the rain", "femmes fatales and smoky offices"),
    ),
    "Horror": GenreWords(
        "horror",
        "horror {item}",
        ("something scary", "a film that gives me chills", "something creepy for tonight"),
        ("a story that will keep me up at night", "ghosts and haunted houses", "something terrifying"),
    ),
    "IMAX": GenreWords(
        "IMAX", "IMAX {item}", ("something spectacular for a big screen",), ("a visual spectacle",)
    ),
    "Musical": GenreWords(
        "musical",
        "musical",
        ("a film full of songs", "something with singing and dancing"),
        ("a show-tune extravaganza", "a story told through song"),
    ),
    "Mystery": GenreWords(
        "mystery",
        "mystery",
        ("a puzzle to figure out", "a whodunit", "something with a secret to uncover"),
        ("clues and a twist at the end", "an unsolved case", "something where I guess the culprit"),
    ),
    "Romance": GenreWords(
        "romantic",
        "romance",
        ("a love story", "something sweet about a couple", "a date-night movie"),
        ("two people falling in love", "something heartwarming about soulmates", "a story about a wedding"),
    ),
    "Sci-Fi": GenreWords(
        "sci-fi",
        "sci-fi {item}",
        ("something futuristic", "a film about space or the future", "something with aliens or robots"),
        ("time travel or spaceships", "life on other planets", "a story set in a high-tech future"),
    ),
    "Thriller": GenreWords(
        "suspense",
        "thriller",
        ("something suspenseful", "an edge-of-my-seat movie", "something tense"),
        ("a nail-biter", "a cat-and-mouse chase", "something with a ticking clock"),
    ),
    "War": GenreWords(
        "war",
        "war {item}",
        ("a film about soldiers", "something set on a battlefield"),
        ("a story from the trenches", "troops on a dangerous mission"),
    ),
    "Western": GenreWords(
        "western",
        "western",
        ("a cowboy movie", "something set in the Wild West"),
        ("gunslingers and saloons", "a sheriff in a dusty frontier town"),
    ),
}
ALIASES = {"Children's": "Children", "Film Noir": "Film-Noir", "Science Fiction": "Sci-Fi"}


def genre_words(genre: str) -> GenreWords | None:
    """Words for a source genre label (MovieLens and ml-100k spellings), None when unknown."""
    return GENRES.get(ALIASES.get(genre, genre))


def words_for(category: str) -> GenreWords:
    """Words for any category label: MovieLens's genre words, else the label itself ("Strategy": "a strategy
    {item}"), with no moods (a catalogue without a mood vocabulary gets vague requests from its tags)."""
    known = genre_words(category)
    if known is not None:
        return known
    word = category.lower()
    return GenreWords(word, f"{word} {{item}}", ())


# ---------------------------------------------------------------------------------------- phrasing pools


@dataclass(frozen=True, slots=True)
class Phrasings:
    """A pool of request phrasings, split into what training sees and what only evaluation sees."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]

    def __post_init__(self) -> None:
        if set(self.train) & set(self.heldout):
            raise ValueError(f"phrasings both trained and held out: {set(self.train) & set(self.heldout)}")

    def pool(self, pool: Pool) -> tuple[str, ...]:
        return self.train if pool == "train" else self.heldout


# A request around a phrase ("I'd like {}").
LEAD_INS = Phrasings(
    ("I'd like {}", "show me {}", "I'm in the mood for {}", "looking for {}", "any ideas for {}?"),
    ("can you find me {}", "recommend {}", "what about {} tonight?", "I feel like {}"),
)
# Specific requests from categories and a period. Placeholders: {one} one category's noun, {two} two
# categories ("a sci-fi thriller"), {year}, {decade} ("1990s"), {period} ("mid-90s"), {decade_words}
# ("nineties", only for the 20th century).
SPECIFIC = Phrasings(
    (
        "{a_decade} {decade} {two}",
        "{a_decade} {decade} {one}",
        "{a_one} {one} from around {year}",
        "{a_two} {two} from the {period}",
        "{a_one} {one} released in {year}",
        "{a_two} {two} from the {decade}",
    ),
    (
        "{a_one} {one} made in the {decade}",
        "{a_two} {two} from {year}",
        "some {decade_words} {one}",
        "{a_one} {one} that came out around {year}",
    ),
)
# Specific requests when an item has categories but no year, and a year but no categories.
SPECIFIC_NO_YEAR = Phrasings(("{a_two} {two}", "{a_one} {one}"), ("any good {one}",))
SPECIFIC_NO_CATEGORY = Phrasings(
    ("a {item} from {year}", "something from the {decade}", "a {item} from the {period}"),
    ("something that came out in {year}", "a {decade} {item}"),
)
# Vague requests from an item's tags.
FROM_TAGS = Phrasings(
    ("something {tag}", "{a_tag} {tag} {item}"),
    ("I want something {tag}", "a really {tag} {item}"),
)
FROM_TAG_PHRASES = Phrasings(
    ("something involving {tag}", "something people describe as '{tag}'"),
    ("a {item} about {tag}", "anything with {tag}"),
)
# Negative constraints: a category the user does not want ({noun} its noun, {modifier} its adjective).
NEGATIVE = Phrasings(
    ("nothing {modifier}", "no {noun} please", "anything but {a_noun} {noun}", "not {a_noun} {noun}"),
    ("I don't want {a_noun} {noun}", "please avoid {noun}", "skip the {modifier} stuff"),
)


def article(phrase: str) -> str:
    """The indefinite article as spoken: "an animated film", "an 80s film", "a 1990s film"."""
    return "an" if phrase[:1].lower() in "aeiou" or phrase.startswith(("8", "18")) else "a"


# ------------------------------------------------------------------------------------ the live heuristic


# Category names as people type them, per MovieLens label; a request that names one is specific.
NAMES: dict[str, str] = {
    "Action": r"action",
    "Adventure": r"adventures?",
    "Animation": r"animated|animation|anime",
    "Children": r"(?:family|kids'?|children'?s)[- ](?:film|movie|friendly)s?",
    "Comedy": r"comed(?:y|ies)|rom-?coms?",
    "Crime": r"crime",
    "Documentary": r"documentar(?:y|ies)",
    "Drama": r"dramas?",
    "Fantasy": r"fantasy",
    "Film-Noir": r"film[- ]noirs?|noirs?",
    "Horror": r"horror",
    "IMAX": r"imax",
    "Musical": r"musicals?",
    "Mystery": r"myster(?:y|ies)",
    "Romance": r"romances?|romantic|rom-?coms?",
    "Sci-Fi": r"sci-?fi|science[- ]fiction",
    "Thriller": r"thrillers?|suspense",
    "War": r"war",
    "Western": r"westerns?",
}
# Words that say what a user does NOT want, without naming the category ("nothing scary").
UNWANTED: dict[str, str] = {
    "Horror": r"scary|creepy|frightening|spooky|gory|gore|terrifying",
    "Animation": r"cartoons?",
    "Romance": r"mushy|sappy|love stor(?:y|ies)",
    "Musical": r"singing|songs",
    "Children": r"childish|kids'? stuff",
    "War": r"battles?|soldiers",
}
_GENRE_PATTERN = re.compile(r"\b(" + "|".join(NAMES.values()) + r")\b", re.IGNORECASE)
# A year ("1995"), a decade ("1990s", "90s", "'90s", "mid-90s") or a decade in words ("nineties").
_PERIOD_PATTERN = re.compile(
    r"\b(1[89]\d\d|20\d\d)s?\b|(?<![\d])'?\d0s\b|\b(twenties|thirties|forties|fifties|sixties|seventies|"
    r"eighties|nineties|noughties)\b",
    re.IGNORECASE,
)


def names_pattern(categories: Iterable[str]) -> dict[str, re.Pattern]:
    """How each category label is named in a request: MovieLens's genre words, else the label itself."""
    out = {}
    for category in categories:
        label = ALIASES.get(category, category)
        source = NAMES.get(label) or re.escape(category.lower()).replace(r"\ ", r"[- ]") + "s?"
        out[category] = re.compile(rf"\b(?:{source})\b", re.IGNORECASE)
    return out


def intention_kind(text: str | None) -> Intention:
    """I0 for no text, I2 when the text names a genre or a period, else I1.

    A cheap, predictable rule for live requests; the synthesiser's phrases obey it (tested), so training and
    serving agree on what vague and specific mean.
    """
    if not text or not text.strip():
        return Intention.I0
    if _GENRE_PATTERN.search(text) or _PERIOD_PATTERN.search(text):
        return Intention.I2
    return Intention.I1
