"""The Triton model repository of the reranker: exporting a trained reranker as a new model version.

Layout (DESIGN §3; Triton's explicit model control loads what is here on `load_model`)::

    <repository>/instructrec_reranker/
        config.pbtxt              CPU config (the default)
        configs/gpu.pbtxt         GPU config: tritonserver --model-config-name=gpu
        1/model.py                the thin Python backend (committed)
        1/reranker/               the saved `Reranker` (not committed: `export_version` writes it)
        2/model.py, 2/reranker/   the next version, and so on

A version folder is written under a temporary name and renamed into place, so a server never sees half
a version. Versions are immutable once exported: a changed model is a new version number, and the
model's `latest` version policy makes `load_model` swap to it while the old one serves until then.

    instructrec export RERANKER_DIR [--repository deploy/triton] [--version N]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from instructrec.artifacts import VERSION_WEIGHTS_DIR as WEIGHTS_DIR

MODEL_NAME = "instructrec_reranker"
MODEL_FILE = "model.py"
VERSION_FILE = "version.json"
RERANKER_CONFIG = "reranker.json"  # what a saved `Reranker` folder holds (`instructrec.model.reranker`)


class ExportError(ValueError):
    """The export cannot go ahead; the message says why and what to do."""


def default_repository() -> Path:
    """deploy/triton of this checkout (an editable install)."""
    return Path(__file__).resolve().parents[3] / "deploy" / "triton"


def versions(repository: str | Path, model: str = MODEL_NAME) -> list[int]:
    """The exported versions of `model` (numbered folders holding weights), in increasing order."""
    folder = Path(repository) / model
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / WEIGHTS_DIR).is_dir())


def export_version(
    reranker_dir: str | Path,
    repository: str | Path,
    version: int | None = None,
    *,
    model: str = MODEL_NAME,
    link: bool = False,
    overwrite: bool = False,
) -> Path:
    """Copy a saved reranker folder into `<repository>/<model>/<version>/` beside the backend's model.py.

    `version` None: one more than the highest exported version (1 for the first). A repository without the
    model's config gets the checkout's config.pbtxt and configs/ too, so any empty folder becomes a complete
    repository. `link` hard-links the weights instead of copying them where the file system allows (same
    bytes, no extra disk; never used for files that change in place: `save_pretrained` writes new files).
    Returns the version folder.
    """
    source = Path(reranker_dir).resolve()
    if not (source / RERANKER_CONFIG).is_file():
        raise ExportError(
            f"{source} is not a saved reranker folder (no {RERANKER_CONFIG}); pass the folder "
            "`Reranker.save_pretrained` wrote"
        )
    model_dir = Path(repository).resolve() / model
    _ensure_model_config(model_dir)
    if version is None:
        version = max(versions(model_dir.parent, model), default=0) + 1
    if version < 1:
        raise ExportError(f"version {version}: Triton versions are positive integers")
    target = model_dir / str(version)
    if (target / WEIGHTS_DIR).exists() and not overwrite:
        raise ExportError(
            f"{target} already holds a model; versions are immutable: export a new version "
            "(or pass overwrite=True while no server has it loaded)"
        )

    partial = model_dir / f".partial-{version}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(source, partial / WEIGHTS_DIR, copy_function=_link_or_copy if link else shutil.copy2)
        _pin_adapter_base(partial / WEIGHTS_DIR)
        shutil.copy2(_backend_source(), partial / MODEL_FILE)
        (partial / VERSION_FILE).write_text(
            json.dumps({"version": version, "source": str(source), "exported_at": time.time()}, indent=2)
        )
        _move_into_place(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def copy_repository(source: str | Path, target: str | Path) -> Path:
    """A copy of a model repository without any exported weights: configs and backend code only.

    Tests and benchmarks serve such a copy and export versions into it, leaving the checkout untouched.
    """
    target = Path(target)
    shutil.copytree(
        source,
        target,
        ignore=shutil.ignore_patterns(WEIGHTS_DIR, "__pycache__", ".partial-*"),
        dirs_exist_ok=True,
    )
    return target


# ----------------------------------------------------------------------------------------------- helpers


def set_parameters(config_path: str | Path, values: dict[str, str]) -> None:
    """Change the string values of existing `parameters` entries of a config.pbtxt."""
    config = Path(config_path).read_text()
    for key, value in values.items():
        pattern = rf'(key: "{key}"\s*value: \{{ string_value: )"[^"]*"'
        config, found = re.subn(pattern, rf'\1"{value}"', config)
        if not found:
            raise ExportError(f"{config_path} has no parameter {key!r}")
    Path(config_path).write_text(config)


def _backend_source() -> Path:
    """The committed backend file (version 1 of the checkout's repository): every version, and a model
    served under another name, runs the same."""
    path = default_repository() / MODEL_NAME / "1" / MODEL_FILE
    if not path.is_file():
        raise ExportError(f"the backend {path} is missing from this checkout")
    return path


def _ensure_model_config(model_dir: Path) -> None:
    if (model_dir / "config.pbtxt").is_file():
        return
    checkout = default_repository() / model_dir.name
    if not (checkout / "config.pbtxt").is_file():
        raise ExportError(f"{model_dir} has no config.pbtxt and this checkout has none to copy")
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(checkout / "config.pbtxt", model_dir / "config.pbtxt")
    if (checkout / "configs").is_dir():
        shutil.copytree(checkout / "configs", model_dir / "configs", dirs_exist_ok=True)


def _pin_adapter_base(weights: Path) -> None:
    """A LoRA adapter names its base checkpoint; a relative path would resolve against the server's working
    directory, so pin it to an absolute one, and fail now rather than at load time if it does not exist."""
    config_path = weights / RERANKER_CONFIG
    meta = json.loads(config_path.read_text())
    base = meta.get("base")
    if not base:
        return
    path = Path(base).expanduser()
    if path.exists():
        meta["base"] = str(path.resolve())
        config_path.write_text(json.dumps(meta))
    elif path.is_absolute() or base.startswith("."):
        raise ExportError(
            f"the adapter's base checkpoint {base} does not exist; the server must be able to "
            "read it (or export a merged, full-weights reranker)"
        )
    # Otherwise a hub name: the server resolves it (offline here, so it must be in its cache).


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: copy instead
        shutil.copy2(source, target)


def _move_into_place(partial: Path, target: Path) -> None:
    """Rename the finished version into place; an existing folder (model.py only, or overwrite) is replaced."""
    if target.exists():
        previous = target.with_name(f".replaced-{target.name}-{os.getpid()}")
        target.rename(previous)
        try:
            partial.rename(target)
        except OSError:
            previous.rename(target)
            raise
        shutil.rmtree(previous, ignore_errors=True)
    else:
        partial.rename(target)
