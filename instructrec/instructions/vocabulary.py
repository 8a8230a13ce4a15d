"""Words for genres: how a request names one (specific) and how a user describes the mood of one (vague).

The two vocabularies are kept apart on purpose: a phrase that names a genre or a period reads as a specific
intention (`intention_kind`), so the vague mood phrases here never use a genre word or a year.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from instructrec.instructions.taxonomy import Intention


@dataclass(frozen=True, slots=True)
class GenreWords:
    modifier: str  # before another genre's noun: "a sci-fi thriller"
    noun: str  # on its own: "a thriller"
    moods: tuple[str, ...]  # vague phrases a user might say


GENRES: dict[str, GenreWords] = {
    "Action": GenreWords(
        "action",
        "action movie",
        ("something fast-paced and exciting", "an adrenaline rush", "a movie with big stunts and chases"),
    ),
    "Adventure": GenreWords(
        "adventure",
        "adventure film",
        ("an exciting journey", "something epic with a quest", "a story about explorers far from home"),
    ),
    "Animation": GenreWords(
        "animated",
        "animated film",
        ("a cartoon", "something drawn or made with computer graphics", "a cartoon for a cozy evening"),
    ),
    "Children": GenreWords(
        "family",
        "family film",
        ("something light to watch with kids", "a film the whole family can enjoy", "something kid-friendly"),
    ),
    "Comedy": GenreWords(
        "comedy",
        "comedy",
        ("something funny", "a light-hearted film", "something that will make me laugh", "a feel-good movie"),
    ),
    "Crime": GenreWords(
        "crime",
        "crime film",
        ("a gritty story about criminals", "something about a heist or a gang", "a tale of cops and robbers"),
    ),
    "Documentary": GenreWords(
        "documentary",
        "documentary",
        ("something real and informative", "a film about true events", "a movie where I learn something"),
    ),
    "Drama": GenreWords(
        "drama", "drama", ("something moving", "a serious, emotional film", "a story with real depth")
    ),
    "Fantasy": GenreWords(
        "fantasy",
        "fantasy film",
        ("something magical", "a film set in an imaginary world", "a movie with wizards or dragons"),
    ),
    "Film-Noir": GenreWords(
        "noir", "film noir", ("a moody old detective story", "something shadowy and cynical")
    ),
    "Horror": GenreWords(
        "horror",
        "horror movie",
        ("something scary", "a film that gives me chills", "something creepy for tonight"),
    ),
    "IMAX": GenreWords("IMAX", "IMAX film", ("something spectacular for a big screen",)),
    "Musical": GenreWords(
        "musical", "musical", ("a film full of songs", "something with singing and dancing")
    ),
    "Mystery": GenreWords(
        "mystery", "mystery", ("a puzzle to figure out", "a whodunit", "something with a secret to uncover")
    ),
    "Romance": GenreWords(
        "romantic", "romance", ("a love story", "something sweet about a couple", "a date-night movie")
    ),
    "Sci-Fi": GenreWords(
        "sci-fi",
        "sci-fi film",
        ("something futuristic", "a film about space or the future", "something with aliens or robots"),
    ),
    "Thriller": GenreWords(
        "suspense", "thriller", ("something suspenseful", "an edge-of-my-seat movie", "something tense")
    ),
    "War": GenreWords("war", "war film", ("a film about soldiers", "something set on a battlefield")),
    "Western": GenreWords("western", "western", ("a cowboy movie", "something set in the Wild West")),
}
ALIASES = {"Children's": "Children", "Film Noir": "Film-Noir", "Science Fiction": "Sci-Fi"}


def genre_words(genre: str) -> GenreWords | None:
    """Words for a source genre label (MovieLens and ml-100k spellings), None when unknown."""
    return GENRES.get(ALIASES.get(genre, genre))


# Genre names as people type them; a request that names one is specific.
_GENRE_PATTERN = re.compile(
    r"\b(action|adventures?|animated|animation|anime|comed(?:y|ies)|crime|documentar(?:y|ies)|"
    r"dramas?|fantasy|film[- ]noir|noir|horror|musicals?|myster(?:y|ies)|romance|romantic|rom-?com|"
    r"sci-?fi|science[- ]fiction|thrillers?|war|westerns?|imax)\b",
    re.IGNORECASE,
)
# A year ("1995"), a decade ("1990s", "90s", "'90s", "mid-90s") or a decade in words ("nineties").
_PERIOD_PATTERN = re.compile(
    r"\b(1[89]\d\d|20\d\d)s?\b|(?<![\d])'?\d0s\b|\b(twenties|thirties|forties|fifties|sixties|seventies|"
    r"eighties|nineties)\b",
    re.IGNORECASE,
)


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
