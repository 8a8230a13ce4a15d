"""The Triton model repository of the reranker: exporting a trained reranker as a new model version.

Layout (DESIGN §3; Triton's explicit model control loads what is here on `load_model`)::

    <repository>/instructrec_reranker/
        config.pbtxt              CPU config (the default)
        configs/gpu.pbtxt         GPU config: tritonserver --model-config-name=gpu
        1/model.py                the thin Python backend (committed)
        1/reranker/               the saved `Reranker` (not committed: `export_version` writes it)
        1/serving.json            its calibration, when exported with one (instructrec.serving.calibration)
        2/model.py, 2/reranker/   the next version, and so on

A version folder is written in a staging folder *outside* the model's folder (`staging_dir`: beside the
repository, on the same file system), fsynced, and renamed into place: a server never sees half a version,
and nothing but numbered version folders and config.pbtxt ever appears in the model's folder (Triton reloads
every version of a model whose folder gains anything else). Versions are immutable once exported: a changed
model is a new version number. Retiring a version (`retire_version`, rollback and pruning) is the same move
in reverse: renamed out first, deleted after.

    instructrec export RERANKER_DIR [--repository deploy/triton] [--version N] [--calibrate ARTIFACTS]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from instructrec.artifacts import VERSION_WEIGHTS_DIR as WEIGHTS_DIR
from instructrec.serving.options import CALIBRATION_FILE

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


def staging_dir(repository: str | Path) -> Path:
    """Where versions are written before they are renamed into the repository: a hidden folder beside it."""
    repository = Path(repository).resolve()
    return repository.parent / f".{repository.name}-staging"


def export_version(
    reranker_dir: str | Path,
    repository: str | Path,
    version: int | None = None,
    *,
    model: str = MODEL_NAME,
    link: bool = False,
    overwrite: bool = False,
    staging: str | Path | None = None,
    calibration: str | None = None,
) -> Path:
    """Copy a saved reranker folder into `<repository>/<model>/<version>/` beside the backend's model.py (and
    `calibration`, a calibration's JSON, as its serving.json).

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
    stage = _stage(Path(staging) if staging else staging_dir(model_dir.parent), model_dir)
    partial = stage / f"{model}-{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(source, partial / WEIGHTS_DIR, copy_function=_link_or_copy if link else shutil.copy2)
        _pin_adapter_base(partial / WEIGHTS_DIR)
        shutil.copy2(_backend_source(), partial / MODEL_FILE)
        if calibration is not None:
            (partial / CALIBRATION_FILE).write_text(calibration)
        (partial / VERSION_FILE).write_text(
            json.dumps({"version": version, "source": str(source), "exported_at": time.time()}, indent=2)
        )
        fsync_tree(partial)
        _move_into_place(partial, target, stage)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def retire_version(
    repository: str | Path, version: int, *, model: str = MODEL_NAME, staging: str | Path | None = None
) -> None:
    """Take a version out of the repository: renamed out of the model's folder at once (Triton's `latest`
    policy no longer sees it), deleted after. A crash in between leaves it in staging, never half deleted
    in the repository."""
    model_dir = Path(repository).resolve() / model
    folder = model_dir / str(version)
    if not folder.is_dir():
        return
    stage = _stage(Path(staging) if staging else staging_dir(model_dir.parent), model_dir)
    gone = stage / f"retired-{model}-{version}-{uuid.uuid4().hex[:8]}"
    folder.rename(gone)
    _fsync_dir(model_dir)
    shutil.rmtree(gone, ignore_errors=True)


def prune_versions(
    repository: str | Path, keep: int, *, protect: tuple[int, ...] = (), model: str = MODEL_NAME
) -> list[int]:
    """Retire all but the newest `keep` versions (and any in `protect`); returns the retired ones."""
    existing = versions(repository, model)
    retired = [v for v in existing[: max(0, len(existing) - keep)] if v not in protect]
    for version in retired:
        retire_version(repository, version, model=model)
    return retired


def copy_repository(source: str | Path, target: str | Path) -> Path:
    """A copy of a model repository without any exported weights: configs and backend code only.

    Tests and benchmarks serve such a copy and export versions into it, leaving the checkout untouched.
    """
    target = Path(target)
    shutil.copytree(
        source,
        target,
        ignore=shutil.ignore_patterns(WEIGHTS_DIR, "__pycache__"),
        dirs_exist_ok=True,
    )
    return target


# ----------------------------------------------------------------------------------------------- helpers


def instance_count(config_path: str | Path) -> int:
    """The backend instances a config.pbtxt asks for (the sum of its instance groups' counts; 1 without)."""
    config = Path(config_path).read_text()
    groups = re.search(r"instance_group\s*\[(.*?)\]", config, re.S)
    counts = [int(n) for n in re.findall(r"count:\s*(\d+)", groups.group(1))] if groups else []
    return sum(counts) or 1


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


def _stage(stage: Path, model_dir: Path) -> Path:
    """The staging folder, which must share the repository's file system (a rename is atomic only there)."""
    stage.mkdir(parents=True, exist_ok=True)
    if stage.stat().st_dev != model_dir.stat().st_dev:
        raise ExportError(
            f"the staging folder {stage} is on another file system than {model_dir}: a version could not be "
            "renamed into place atomically; give a staging folder on the repository's volume"
        )
    return stage


def fsync_tree(root: Path) -> None:
    """Every file and folder under `root` on disk: before a rename makes it visible, or a record points at it."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(partial: Path, target: Path, stage: Path) -> None:
    """Rename the finished version into place; an existing folder (overwrite) is first renamed out."""
    previous = None
    if target.exists():
        previous = stage / f"replaced-{target.name}-{uuid.uuid4().hex[:8]}"
        target.rename(previous)
    try:
        partial.rename(target)
    except OSError:
        if previous is not None:
            previous.rename(target)
        raise
    _fsync_dir(target.parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
