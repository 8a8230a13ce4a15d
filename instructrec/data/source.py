"""Reading source files with errors a person can act on (file, line, what was expected)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class DataFormatError(ValueError):
    """A source file is missing, truncated or not in the layout its loader reads."""

    def __init__(self, path: Path, message: str, line: int | None = None) -> None:
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


def require_file(path: Path, hint: str = "") -> Path:
    if not path.is_file():
        raise DataFormatError(path, "no such file" + (f" ({hint})" if hint else ""))
    return path


def column_indices(path: Path, header: Sequence[str], wanted: Iterable[str]) -> dict[str, int]:
    """Position of each wanted column; a missing one names what the header does have."""
    missing = [name for name in wanted if name not in header]
    if missing:
        raise DataFormatError(path, f"missing column(s) {missing}; the header has {list(header)}", line=1)
    return {name: header.index(name) for name in wanted}


def parse_field(path: Path, line: int, name: str, value: str, convert: Callable[[str], T]) -> T:
    try:
        return convert(value)
    except ValueError:
        raise DataFormatError(path, f"{name} {value!r} is not a valid {convert.__name__}", line) from None


def numeric_first(source_id: str) -> tuple[int, int, str]:
    """Sort key for source ids: numbers in numeric order ("2" before "10"), then other ids alphabetically."""
    return (0, int(source_id), "") if source_id.isdigit() else (1, 0, source_id)
