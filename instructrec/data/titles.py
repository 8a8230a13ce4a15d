"""Movie titles as MovieLens writes them, made readable: "Matrix, The (1999)" → ("The Matrix", 1999).

MovieLens moves leading articles behind a comma for alphabetical sorting, in English and in the alternative
titles it keeps in parentheses ("City of Lost Children, The (Cité des enfants perdus, La)"). A language
model reads the natural order far better, and users type it that way.
"""

from __future__ import annotations

import re

# Articles MovieLens moves behind a comma (found in ml-latest-small and ml-100k); case-sensitive so that
# lowercase words inside a title ("Good, the Bad and the Ugly") stay where they are.
_ARTICLES = (
    "The",
    "A",
    "An",
    "La",
    "Le",
    "Les",
    "L'",
    "El",
    "Los",
    "Las",
    "Il",
    "I",
    "Lo",
    "Gli",
    "Das",
    "Der",
    "Die",
    "Den",
    "Det",
    "Da",
    "Un",
    "Une",
    "O",
    "Os",
)
_MOVED_ARTICLE = re.compile(r"([^()]+?), (" + "|".join(re.escape(a) for a in _ARTICLES) + r")(?=\s*\(|\)|$)")
# "(1995)" or a series' "(2006–2007)" at the very end; the first year is the release year.
_TRAILING_YEAR = re.compile(r"\s*\((\d{4})(?:\s*[–-]\s*\d{4})?\)\s*$")


def restore_articles(title: str) -> str:
    """Put moved articles back in front, in the main title and in parenthesised alternative titles."""

    def front(match: re.Match) -> str:
        head, article = match.group(1), match.group(2)
        space = head[: len(head) - len(head.lstrip())]  # keep the gap before a later "(...) X, The"
        gap = "" if article.endswith("'") else " "  # "L'Avventura"
        return f"{space}{article}{gap}{head.strip()}"

    return _MOVED_ARTICLE.sub(front, title)


def split_year(title: str) -> tuple[str, int | None]:
    """ "Toy Story (1995)" → ("Toy Story", 1995); titles without a year keep their text and get None."""
    match = _TRAILING_YEAR.search(title)
    if not match:
        return title.strip(), None
    return title[: match.start()].strip(), int(match.group(1))


def parse_title(raw: str) -> tuple[str, int | None]:
    """MovieLens title → (readable title, year)."""
    title, year = split_year(raw)
    return restore_articles(title), year
