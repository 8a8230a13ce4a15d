"""Batch job: download a public MovieLens release (GroupLens' csv layout) for users with internet access.

Nothing in the project calls it implicitly: tests and benchmarks read ../shared/data, and `instructrec fetch`
or the demo fetch only when asked and when no local copy exists.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/{name}.zip"
# The GroupLens archives that unpack to this csv layout (ml-100k's own zip is the older u.data layout).
CSV_RELEASES = ("ml-latest-small", "ml-latest", "ml-20m", "ml-25m", "ml-32m")


def fetch_movielens(name: str = "ml-latest-small", dest: str | Path = ".") -> Path:
    """Download and unpack a GroupLens release into `dest` (unless it is there); returns the folder to pass to
    `instructrec.data.load_movielens`."""
    if name not in CSV_RELEASES:
        raise ValueError(f"unknown MovieLens release {name!r}; choose one of {CSV_RELEASES}")
    dest = Path(dest)
    target = dest / name
    if (target / "ratings.csv").is_file():
        return target
    url = GROUPLENS_URL.format(name=name)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / f"{name}.zip"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, archive.open("wb") as out:
                shutil.copyfileobj(response, out)
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(tmp)
        except (urllib.error.URLError, OSError, zipfile.BadZipFile) as error:
            raise RuntimeError(
                f"could not download {url} ({error}); fetch it by hand and unzip it into {dest}"
            ) from error
        unpacked = Path(tmp) / name
        if not (unpacked / "ratings.csv").is_file():
            raise RuntimeError(f"{url} did not contain {name}/ratings.csv")
        unpacked.rename(target)
    return target
