"""Datasets: loaders for MovieLens (csv) and RecBole atomic files, k-core filtering and the leave-one-out
split, all producing or consuming the one `Dataset` form."""

from __future__ import annotations

from pathlib import Path

from instructrec.data.dataset import (
    CATALOGUES,
    MOVIES,
    Dataset,
    Interaction,
    Item,
    Nouns,
    item_text,
    sort_history,
)
from instructrec.data.filtering import k_core
from instructrec.data.movielens import load_movielens
from instructrec.data.recbole import load_recbole
from instructrec.data.source import DataFormatError
from instructrec.data.split import LeaveOneOut

# Datasets known by name, with the loader for their layout; `root` is the folder holding them.
KNOWN = {"ml-latest-small": load_movielens, "ml-100k": load_recbole}

__all__ = [
    "CATALOGUES",
    "KNOWN",
    "MOVIES",
    "DataFormatError",
    "Dataset",
    "Interaction",
    "Item",
    "LeaveOneOut",
    "Nouns",
    "item_text",
    "k_core",
    "load",
    "load_movielens",
    "load_recbole",
    "sort_history",
]


def load(name_or_path: str | Path, root: str | Path | None = None, *, k: int = 5) -> Dataset:
    """Load a dataset by name (looked up under `root`) or by path, then k-core filter it (k ≤ 1: no filter).

    A path is read as MovieLens csv when it holds ratings.csv, as RecBole atomic files when it holds (or is)
    a `.inter` file.
    """
    if str(name_or_path) in KNOWN:
        if root is None:
            raise ValueError(f"pass root= (the folder that holds {name_or_path}/) to load it by name")
        path = Path(root) / str(name_or_path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist; {name_or_path} is expected under root={root}")
        dataset = KNOWN[str(name_or_path)](path)
    else:
        dataset = _load_path(Path(name_or_path))
    return k_core(dataset, k)


def _load_path(path: Path) -> Dataset:
    if path.suffix == ".inter":
        return load_recbole(path)
    inter = sorted(path.glob("*.inter")) if path.is_dir() else []
    if len(inter) == 1:
        return load_recbole(inter[0])
    if inter:
        return load_recbole(path)  # several: the one named after the folder
    if path.is_dir() and (path / "ratings.csv").is_file():
        return load_movielens(path)
    raise FileNotFoundError(
        f"{path} is neither a known dataset name {sorted(KNOWN)} nor a MovieLens csv folder (ratings.csv) "
        "nor RecBole atomic files (<name>.inter)"
    )
